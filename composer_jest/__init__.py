"""composer_jest: JEST (multimodal contrastive learning with joint example selection) for Composer."""

from composer_jest.core.losses import SoftmaxScorer, sigmoid_pair_loss, softmax_set_loss
from composer_jest.core.scoring import Features, Selection, jest_select
from composer_jest.core.selection import independent_sample, joint_sample, score_matrix
from composer_jest.core.step import SelectionSettings, select_step
from composer_jest.jest.algorithm import JEST, jest_first
from composer_jest.jest.reference import load_reference
from composer_jest.jest.reference_features import ReferenceFeatures
from composer_jest.models.clip import CLIPModel, CLIPTowers, build_clip

__version__ = '0.1.0'

__all__ = [
    'JEST',
    'CLIPModel',
    'ReferenceFeatures',
    'CLIPTowers',
    'Features',
    'Selection',
    'SelectionSettings',
    'SoftmaxScorer',
    'build_clip',
    'independent_sample',
    'jest_first',
    'jest_select',
    'joint_sample',
    'load_reference',
    'score_matrix',
    'select_step',
    'sigmoid_pair_loss',
    'softmax_set_loss',
]

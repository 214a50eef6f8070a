"""The batch keys a run reads (track_keys, label, cached reference columns) are checked before training."""

from __future__ import annotations

import pytest
from convert_helpers import QUIET, _make_folder, _write_csv
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest.data.convert import convert_folder
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config

SHAPES_KEYS = r"\['clean', 'image', 'index', 'label', 'text'\]"


def _quickstart(*overrides: str):
    return load_config('yamls/quickstart.yaml', ['algorithms.jest.reference=cached', 'max_duration=1ba',
                                                 'progress_bar=false', *overrides])


def test_track_keys_and_cached_columns_are_checked_against_the_demo_batches_at_build():
    with pytest.raises(ValueError, match=r"algorithms.jest.track_keys needs batch key\(s\) \['dirty'\], but the "
                                         rf'train_loader batches carry only {SHAPES_KEYS}: .*--keep-columns'):
        build_trainer(_quickstart('algorithms.jest.track_keys=[dirty]'))
    with pytest.raises(ValueError, match=r"reference: cached needs batch key\(s\) \['ref_image_features', .*"
                                         r'embed-reference'):
        build_trainer(_quickstart())


def test_a_steered_loss_without_cached_columns_fails_at_build_naming_the_loss():
    # distillation: the loss itself reads the reference columns (checked before JEST's cached-reference check)
    with pytest.raises(ValueError, match=r"model.loss \{'name': 'distill'.*\} needs batch key\(s\) "
                                         r"\['ref_image_features', .*\], but the train_loader batches carry only "
                                         rf'{SHAPES_KEYS}: .*embed-reference'):
        build_trainer(_quickstart('algorithms={}', 'model.loss={name: distill, form: sigmoid}'))


def _folder_shards(tmp_path, name: str, **kwargs) -> str:
    root = tmp_path / name
    rows = _make_folder(root, n=4)
    for i, row in enumerate(rows):
        row['clean'] = str(i % 2)
    _write_csv(root / 'captions.csv', rows, fields=('file_name', 'caption', 'label', 'clean'))
    out = str(root / 'mds')
    convert_folder(root / 'captions.csv', out, options=QUIET, **kwargs)
    return out


def test_mds_columns_are_checked_at_build_naming_the_convert_option(tmp_path, streaming_shm):  # noqa: F811
    plain = _folder_shards(tmp_path, 'plain')  # converted as the README's literal command: no label, clean in meta
    no_label_eval = ['eval_loader.source=mds', f'eval_loader.local={plain}', 'algorithms.jest.track_keys=[]',
                     'algorithms.jest.reference=null', 'algorithms.jest.score=hard_learner']
    with pytest.raises(ValueError, match=r"model.classnames \(zero-shot accuracy\) needs batch key\(s\) \['label'\], "
                                         r"but the eval_loader batches carry only \['image', 'index', 'text'\]: "
                                         r'.*--label-column'):
        build_trainer(_quickstart(*no_label_eval))
    with pytest.raises(ValueError, match=r"track_keys needs batch key\(s\) \['clean'\], but the train_loader "
                                         r"batches carry only \['image', 'index', 'text'\]: .*--keep-columns.*meta"):
        build_trainer(_quickstart('train_loader.source=mds', f'train_loader.local={plain}',
                                  'algorithms.jest.reference=null', 'algorithms.jest.score=hard_learner'))


def test_a_missing_track_key_at_the_first_step_lists_the_batch_keys(tokenizer):
    from composer import Trainer
    from model_helpers import make_model

    from composer_jest import JEST
    from composer_jest.data import shapes_dataloader

    trainer = Trainer(model=make_model(), train_dataloader=shapes_dataloader(tokenizer, 64, 32, seed=0),
                      algorithms=[JEST(score='hard_learner', track_keys=['dirty'])], max_duration='1ba',
                      progress_bar=False, log_to_console=False)
    with pytest.raises(KeyError, match=rf"'dirty' is not a batch key \(the batch has {SHAPES_KEYS}\).*--keep-columns"):
        trainer.fit()

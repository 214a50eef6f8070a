"""JEST among Composer's own algorithms, callbacks and loggers (the README's "Combining with Composer" table).

Every Composer algorithm the yaml registry offers either trains beside JEST and shows its effect, or is refused at
``Event.INIT`` (while the Trainer is built) with the conflict named. Then: the ``jest/*`` metrics under Composer's
callbacks and loggers, what ``sp``/``ep`` durations count, the errors for batches JEST cannot read and for a loader
sized at ``b`` instead of ``N = b / (1 - f)``, and Composer's generic algorithm-resumption comparison on JEST.
CPU, jest-tiny, ``N = 16`` streamed and ``b = 8`` trained per step, two to four steps per run.
"""

from __future__ import annotations

import collections
import copy
import os

import numpy as np
import open_clip
import pytest
import torch
from composer import Callback, Trainer
from composer.algorithms.sam import SAMOptimizer
from composer.callbacks import LRMonitor, OptimizerMonitor, RuntimeEstimator, SpeedMonitor
from composer.loggers import FileLogger, InMemoryLogger
from composer.optim import DecoupledAdamW
from model_helpers import make_model, series
from torch.utils.data import DataLoader
from torchvision.datasets import VisionDataset

from composer_jest import JEST, jest_first
from composer_jest.data import ShapesDataset, shapes_dataloader
from composer_jest.run import registry

N, B, F = 16, 8, 0.5  # super-batch, trained batch, filter ratio
JEST_METRICS = {'jest/examples_seen', 'jest/examples_trained', 'jest/scoring_time', 'jest/flops_scoring',
                'jest/flops_train', 'jest/learnability_superbatch', 'jest/learnability_selected',
                'jest/superbatch/clean', 'jest/selected/clean'}


def _jest(**kwargs) -> JEST:
    return JEST(**{'score': 'hard_learner', 'filter_ratio': F, 'n_chunks': 2, 'seed': 0, **kwargs})


def _trainer(algorithms, model=None, loader=None, duration='2ba', microbatch=B, **kwargs) -> Trainer:
    model = model if model is not None else make_model()
    loader = loader if loader is not None else shapes_dataloader(model.tokenizer, 2 * N, N, seed=0)
    return Trainer(model=model, train_dataloader=loader, max_duration=duration, algorithms=list(algorithms),
                   optimizers=DecoupledAdamW(model.parameters(), lr=1e-3), algorithm_passes=[jest_first],
                   device='cpu', device_train_microbatch_size=microbatch, progress_bar=False, log_to_console=False,
                   seed=0, **{'loggers': [], **kwargs})


class _Record(Callback):
    """The trained batch of every step (BEFORE_FORWARD) and the gradient norm after the algorithms'
    ``AFTER_TRAIN_BATCH`` (callbacks run after the algorithms on each event, so after gradient clipping)."""

    def __init__(self):
        self.images, self.indices, self.grad_norms = [], [], []

    def before_forward(self, state, logger):
        self.images.append(state.batch['image'].clone())
        self.indices.append(state.batch['index'].clone())

    def after_train_batch(self, state, logger):
        grads = [p.grad.norm() for p in state.model.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.stack(grads).norm()))


def _towers(model) -> collections.Counter:
    return collections.Counter(type(m).__name__ for m in model.towers.modules())


def _ema(trainer, alg, before, record):  # the averaged weights differ from the model's and from the start
    ema, now = alg.ema_model.named_parameters_dict, dict(trainer.state.model.named_parameters())
    moved = [k for k in ema if not torch.equal(before[k], now[k])]
    assert moved and all(not torch.equal(ema[k], now[k]) and not torch.equal(ema[k], before[k]) for k in moved)


def _clipped(trainer, alg, before, record):
    assert len(record.grad_norms) == 2 and all(abs(n - 1e-2) < 1e-6 for n in record.grad_norms), record.grad_norms


def _channels_last(trainer, alg, before, record):
    assert trainer.state.model.towers.clip.visual.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert not before['towers.clip.visual.conv1.weight'].is_contiguous(memory_format=torch.channels_last)


def _standardized(trainer, alg, before, record):
    assert torch.nn.utils.parametrize.is_parametrized(trainer.state.model.towers.clip.visual.conv1)


def _frozen(trainer, alg, before, record):  # frozen at the first epoch end (one batch per epoch)
    frozen = [n for n, p in trainer.state.model.named_parameters() if not p.requires_grad]
    assert frozen and len(frozen) < len(before)


def _sam(trainer, alg, before, record):
    assert isinstance(trainer.state.optimizers[0], SAMOptimizer)


def _swa(trainer, alg, before, record):  # the model ends on the averaged weights
    assert alg.swa_completed
    averaged = alg.swa_model.module.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in trainer.state.model.state_dict().items())


def _cut(trainer, alg, before, record):  # holes (zeros) in the trained images; the loader's have none
    assert all(float((images == 0).all(dim=1).float().mean()) > 0.1 for images in record.images)


TRAINS = {  # yaml name: (kwargs, effect); 2 steps, one batch per epoch
    'ema': (dict(half_life=None, smoothing=0.5, update_interval='1ba'), _ema),
    'gradient_clipping': (dict(clipping_type='norm', clipping_threshold=1e-2), _clipped),
    'channels_last': ({}, _channels_last),
    'weight_standardization': ({}, _standardized),
    'layer_freezing': (dict(freeze_start=0.0), _frozen),
    'sam': ({}, _sam),
    'swa': (dict(swa_start='0.25dur', swa_end='0.75dur'), _swa),
    'cutout': (dict(input_key='image', length=0.5), _cut),
}
# Model surgery that finds nothing to replace in open_clip's ViT at its default settings (strided convs, BatchNorm,
# Dropout, ResNet blocks, layers of >= 256 features, AMP-only norms on an fp32 CPU run): it trains, unchanged.
NOTHING_TO_REPLACE = {'blurpool': {}, 'factorize': {}, 'ghost_batchnorm': {}, 'gyro_dropout': {}, 'squeeze_excite': {},
                      'stochastic_depth': dict(target_layer_name='ResNetBottleneck'), 'low_precision_layernorm': {},
                      'low_precision_groupnorm': {}}


def _train_beside_jest(algorithms, steps=2):
    model, jest, record = make_model(), _jest(), _Record()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainer = _trainer([jest, *algorithms], model=model, loader=shapes_dataloader(model.tokenizer, N, N, seed=0),
                       duration=f'{steps}ba', callbacks=[record])
    trainer.fit()
    assert (jest.examples_seen, jest.examples_trained) == (N * steps, B * steps)
    assert all(len(i) == B for i in record.indices)  # every step trained JEST's selection
    now = dict(trainer.state.model.named_parameters())
    assert any(not torch.equal(before[k], now[k]) for k in before if k in now)  # it trained
    return trainer, before, record


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('name', list(TRAINS))
def test_algorithm_trains_beside_jest_and_shows_its_effect(name):
    kwargs, effect = TRAINS[name]
    alg = registry.algorithms.get(name)(**kwargs)
    trainer, before, record = _train_beside_jest([alg])
    effect(trainer, alg, before, record)


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_surgery_with_nothing_to_replace_in_the_vit_trains_unchanged():
    algorithms = [registry.algorithms.get(name)(**kwargs) for name, kwargs in NOTHING_TO_REPLACE.items()]
    towers = _towers(make_model())
    trainer, _, _ = _train_beside_jest(algorithms)
    assert _towers(trainer.state.model) == towers


class _VisionShapes(VisionDataset):
    """Shapes as a torchvision ``VisionDataset`` (what AugMix/RandAugment insert their transform into)."""

    def __init__(self, n: int, tokenizer):
        super().__init__(root='', transform=open_clip.image_transform(32, is_train=False))
        self.shapes, self.batch_keys = ShapesDataset(n, tokenizer=tokenizer), ShapesDataset.batch_keys

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        return {**self.shapes[i], 'image': self.transform(self.shapes[i]['image'])}


@pytest.mark.parametrize('name', ['augmix', 'randaugment'])
def test_dataset_augmentation_trains_on_a_vision_dataset(name, tokenizer):
    """AugMix/RandAugment augment in the dataset, before JEST scores: they need a torchvision VisionDataset
    (Composer says so at fit start for composer_jest's own loaders)."""
    np.random.seed(0)  # Composer's augmentations draw from numpy's global generator
    record, dataset = _Record(), _VisionShapes(2 * N, tokenizer)
    plain = _VisionShapes(2 * N, tokenizer)
    loader = DataLoader(dataset, batch_size=N, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    trainer = _trainer([_jest(), registry.algorithms.get(name)()], loader=loader, callbacks=[record])
    trainer.fit()
    for images, indices in zip(record.images, record.indices):
        clean = torch.stack([plain[int(i)]['image'] for i in indices])
        assert (images - clean).abs().amax(dim=(1, 2, 3)).gt(1e-3).float().mean() > 0.5  # augmented
    with pytest.raises(TypeError, match='must be a'):
        _trainer([_jest(), registry.algorithms.get(name)()]).fit()


REFUSED = {  # yaml name: (kwargs, what the error says)
    'selective_backprop': ({}, r"second example selector.*JEST\(score='hard_learner'\)"),
    'mixup': ({}, 'class targets.*wrong pair'),
    'cutmix': ({}, 'class targets.*wrong pair'),
    'label_smoothing': ({}, 'class targets'),
    'colout': ({}, 'resizing them: the ViT learner and the reference take images of one fixed size'),
    'progressive_resizing': ({}, 'after JEST has selected: the ViT learner and the reference take images of one'),
    'alibi': (dict(max_sequence_length=16), 'truncates the batch.s sequences .*HuggingFace'),
    'seq_length_warmup': ({}, 'truncates the batch.s sequences'),
    'no_op_model': ({}, 'no-op one, and JEST scores with the learner'),
    'cutout': ({}, r"batch\[0\].*pass CutOut\(input_key='image'\)"),
    'jest': (dict(score='hard_learner'), 'a second JEST would select again'),
}


@pytest.mark.parametrize('name', list(REFUSED))
def test_conflicting_algorithm_is_refused_at_init(name):
    kwargs, reason = REFUSED[name]
    alg = registry.algorithms.get(name)(**kwargs)
    with pytest.raises(ValueError, match=rf'JEST cannot run beside {type(alg).__name__} \(yaml: algorithms.{name}\): '
                                         rf'.*{reason}'):
        _trainer([_jest(), alg])  # Event.INIT runs while the Trainer is built: no step, no fit


def test_gated_linear_units_is_refused_by_composer_at_init():
    with pytest.raises(TypeError, match='only has a surgery policy defined for subclasses of transformers.Bert'):
        _trainer([_jest(), registry.algorithms.get('gated_linear_units')()])


def test_callbacks_and_loggers_see_every_jest_metric(tmp_path, tokenizer):
    """Composer's monitors, checkpointing, file logging and eval during fit beside JEST (learnability, with a
    reference and track_keys: all nine ``jest/*`` metrics); Composer's sample counts are the streamed examples."""
    memory = InMemoryLogger()
    jest = _jest(score='learnability', reference=make_model(seed=1), track_keys=['clean'])
    callbacks = [LRMonitor(), OptimizerMonitor(batch_log_interval=1), SpeedMonitor(window_size=1), RuntimeEstimator()]
    trainer = _trainer([jest], loader=shapes_dataloader(tokenizer, 2 * N, N, noise=0.5, seed=0), duration='2ba',
                       callbacks=callbacks, loggers=[memory, FileLogger(str(tmp_path / 'log.txt'))],
                       eval_dataloader=shapes_dataloader(tokenizer, N, N, seed=5, shuffle=False),
                       eval_interval='2ba', save_folder=str(tmp_path / 'ckpt'), save_interval='1ba',
                       save_filename='ba{batch}.pt')
    trainer.fit()
    trainer.close()
    assert JEST_METRICS <= set(memory.data)
    assert series(memory, 'jest/examples_seen') == [N, 2 * N]  # N x steps
    assert series(memory, 'jest/examples_trained') == [B, 2 * B]  # b x steps
    assert int(trainer.state.timestamp.sample) == 2 * N  # Composer (and the SpeedMonitor) count what streamed
    assert all(0 <= v <= 1 for v in series(memory, 'jest/selected/clean'))
    assert {'lr-DecoupledAdamW/group0', 'l2_norm/grad/global', 'throughput/samples_per_sec'} <= set(memory.data)
    assert any(k.startswith('metrics/eval/') for k in memory.data)
    assert sorted(os.listdir(tmp_path / 'ckpt')) == ['ba1.pt', 'ba2.pt', 'latest-rank0.pt']
    assert 'jest/examples_trained' in (tmp_path / 'log.txt').read_text()


@pytest.mark.parametrize('duration', [f'{3 * N}sp', '1ep'])
def test_durations_count_streamed_examples_in_sp_and_ep(duration, tokenizer):
    """48 examples, N = 16: ``48sp`` and ``1ep`` are 3 steps (``3ba``) of b = 8 trained examples."""
    jest = _jest()
    trainer = _trainer([jest], loader=shapes_dataloader(tokenizer, 3 * N, N, seed=0), duration=duration)
    trainer.fit()
    assert (int(trainer.state.timestamp.batch), int(trainer.state.timestamp.sample)) == (3, 3 * N)
    assert (jest.examples_seen, jest.examples_trained) == (3 * N, 3 * B)


def test_two_fit_calls_continue_the_counts(tokenizer):
    jest = _jest()
    trainer = _trainer([jest], loader=shapes_dataloader(tokenizer, 3 * N, N, seed=0), duration=None)
    trainer.fit(duration='1ba')
    trainer.fit(duration='2ba')
    assert int(trainer.state.timestamp.batch) == 3 and (jest.examples_seen, jest.examples_trained) == (3 * N, 3 * B)


class _Renamed(torch.utils.data.Dataset):
    """Shapes with its image/text under Hugging Face names; ``declared`` gives it ``batch_keys``."""

    def __init__(self, tokenizer, declared: bool):
        self.shapes = ShapesDataset(2 * N, tokenizer=tokenizer, transform=open_clip.image_transform(32, False))
        if declared:
            self.batch_keys = ('clean', 'index', 'input_ids', 'label', 'pixel_values')

    def __len__(self):
        return len(self.shapes)

    def __getitem__(self, i):
        item = self.shapes[i]
        return {'pixel_values': item.pop('image'), 'input_ids': item.pop('text'), **item}


def _fails_before_the_first_step(trainer, error, match):
    before = copy.deepcopy(trainer.state.model.state_dict())
    with pytest.raises(error, match=match):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0
    assert all(torch.equal(v, trainer.state.model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize('declared', [True, False])
def test_a_batch_without_the_keys_fails_at_fit_start_with_its_keys(declared, tokenizer):
    loader = DataLoader(_Renamed(tokenizer, declared), batch_size=N, drop_last=True)
    where = 'the train loader declares \\(dataset.batch_keys\\)' if declared else 'the first batch has'
    _fails_before_the_first_step(
        _trainer([_jest()], loader=loader), ValueError,
        rf"JEST reads batch key\(s\) \['image', 'text'\], but {where} only \['clean', 'index', 'input_ids', 'label', "
        r"'pixel_values'\]; JEST\(image_key='image', text_key='text'\), model CLIPModel\(image_key='image', "
        r"text_key='text'\)")


def test_a_non_dict_batch_fails_with_the_key_settings(tokenizer):
    shapes = ShapesDataset(2 * N, tokenizer=tokenizer, transform=open_clip.image_transform(32, False))
    loader = DataLoader([(shapes[i]['image'], shapes[i]['text']) for i in range(2 * N)], batch_size=N)
    _fails_before_the_first_step(
        _trainer([_jest()], loader=loader), TypeError,
        r"JEST needs dict batches with image and text keys \(JEST\(image_key='image', text_key='text'\), model "
        r"CLIPModel\(image_key='image', text_key='text'\)\); the train loader yields a (list|tuple) of 2 entries")


def test_jest_and_model_keys_that_disagree_fail_at_fit_start():
    _fails_before_the_first_step(
        _trainer([_jest(image_key='pixel_values', text_key='input_ids')]), ValueError,
        r"JEST and the model read different batch keys: JEST\(image_key='pixel_values', text_key='input_ids'\), "
        r"model CLIPModel\(image_key='image', text_key='text'\)")


@pytest.mark.parametrize('sized', [True, False])
def test_a_loader_sized_at_b_fails_with_n_b_f_and_the_fix(sized, tokenizer):
    """A loader of b = 8 with f = 0.5 would train 4 a step; ``sized=False``: a loader with no batch_size (checked on
    its first batch)."""
    loader = shapes_dataloader(tokenizer, 4 * B, B, seed=0)
    what = "the train loader's batch_size" if sized else 'the first super-batch'
    _fails_before_the_first_step(
        _trainer([_jest()], loader=loader if sized else list(loader)), ValueError,
        rf'{what} is 8 examples, but device_train_microbatch_size=8 with filter_ratio=0.5 needs a super-batch of '
        r'N = b / \(1 - f\) = 16: JEST would train 4 examples a step, not 8. Size the loader.s batch with '
        r'composer_jest.core.batch.superbatch_size \(b=8, f=0.5\): N = superbatch_size\(8, 0.5\) = 16. If 8 is the '
        r'super-batch you meant, set device_train_microbatch_size to at most 4, or leave it unset.')


@pytest.mark.parametrize('sized', [True, False])
def test_a_final_partial_batch_of_an_epoch_still_trains(sized, tokenizer):
    """40 examples, N = 16, no drop_last: batches of 16, 16 and 8; the last trains round(8 x 0.5) = 4."""
    loader = DataLoader(ShapesDataset(40, tokenizer=tokenizer, transform=open_clip.image_transform(32, False)),
                        batch_size=N, drop_last=False)
    jest = _jest()
    _trainer([jest], loader=loader if sized else list(loader), duration='1ep').fit()
    assert (jest.examples_seen, jest.examples_trained) == (40, 2 * B + 4)


def test_repr_shows_the_settings():
    jest = JEST(reference=make_model(seed=1), filter_ratio=0.8, n_chunks=4, learner_patch_size=16, seed=3)
    shown = repr(jest)
    for part in ('JEST(', 'filter_ratio=0.8', 'n_chunks=4', "score='learnability'", "selection='joint'",
                 'learner_patch_size=16', "scope='local'", 'seed=3', "image_key='image'", 'reference=<CLIPModel>'):
        assert part in shown, shown
    assert '0x' not in shown and "reference='cached'" in repr(JEST(reference='cached'))


def _deep_compare(a, b, path='state'):
    assert type(a) is type(b), f'{path}: {type(a)} != {type(b)}'
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f'{path}: keys {sorted(a)} != {sorted(b)}'
        for k in a:
            _deep_compare(a[k], b[k], f'{path}.{k}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f'{path}: length {len(a)} != {len(b)}'
        for i, (x, y) in enumerate(zip(a, b)):
            _deep_compare(x, y, f'{path}[{i}]')
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f'{path}: tensors differ'
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f'{path}: arrays differ'
    else:
        assert a == b, f'{path}: {a!r} != {b!r}'


def _load(path):
    ckpt = torch.load(path, weights_only=False)
    for key in ('total_wct', 'iteration_wct', 'epoch_wct', 'batch_wct'):  # wall clock
        del ckpt['state']['timestamp']['Timestamp'][key]
    del ckpt['state']['run_name']
    del ckpt['state']['callbacks']['CheckpointSaver']['all_saved_checkpoints_to_timestamp']
    # Composer's own test drops entries named by a memory address: JEST's must be named by its settings
    assert not any('0x' in entry[1]['repr'] for entry in ckpt['state']['algorithms'])
    return ckpt


def test_composer_algorithm_resumption_comparison_on_jest(tmp_path, tokenizer):
    """Composer's tests/algorithms/test_algorithm_resumption.py pattern: train 4 batches saving every 2, resume a
    second run from the batch-2 checkpoint, and compare every state entry of the two batch-4 checkpoints."""
    reference, model = make_model(seed=1), make_model(seed=0)
    copied = copy.deepcopy(model)
    runs = {}
    for run, learner, load in (('first', model, None), ('resumed', copied, str(tmp_path / 'first' / 'ba2.pt'))):
        jest = _jest(score='learnability', reference=reference)
        _trainer([jest], model=learner, loader=shapes_dataloader(tokenizer, 4 * N, N, noise=0.5, seed=0),
                 duration='4ba', save_folder=str(tmp_path / run), save_interval='2ba', save_filename='ba{batch}.pt',
                 load_path=load).fit()
        runs[run] = jest
    first, resumed = _load(tmp_path / 'first' / 'ba4.pt'), _load(tmp_path / 'resumed' / 'ba4.pt')
    _deep_compare(first['rng'], resumed['rng'], 'rng')
    _deep_compare(first['state'], resumed['state'])
    (name, entry), = first['state']['algorithms']
    assert name == 'JEST' and entry['repr'] == repr(runs['first']) and 'rng' in entry
    assert entry['examples_trained'] == 4 * B
    with pytest.raises(AssertionError):  # the model did train between the checkpoints
        _deep_compare(_load(tmp_path / 'first' / 'ba2.pt')['state']['model'], first['state']['model'])

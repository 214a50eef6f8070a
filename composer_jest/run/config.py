"""What a yaml run may say: a structured config validated by omegaconf (unknown keys fail).

Field names follow the constructor arguments they feed (``CLIPModel``, ``Trainer``, ``JEST``) so a
yaml reads like the Python API. ``variables:`` holds values for ``${variables.x}`` interpolation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

__all__ = ['RECIPES', 'ModelConfig', 'TwoStageConfig', 'DataConfig', 'TrainConfig', 'load_config',
           'batches_for_examples']

#: The packaged recipes (``composer_jest/run/yamls``): ``composer-jest train RECIPE`` and the quickstart read them.
RECIPES = Path(__file__).parent / 'yamls'


@dataclass
class ModelConfig:
    name: Any = 'jest-tiny'  # open_clip model name, or an open_clip CLIP config dict
    loss: Any = 'sigmoid'  # a loss spec: sigmoid | softmax | dcl | hcl | triplet | npair, or {name: ..., params}
    classnames: Any = 'shapes'  # zero-shot classes: shapes | fashion_mnist | a list | null
    class_templates: list[str] = field(default_factory=lambda: ['a {name}', 'a picture of a {name}'])
    low_res_fraction: Optional[float] = None  # multi-resolution training; default 0.5 with low_res_patch_size
    low_res_patch_size: Optional[int] = None
    checkpoint: Optional[str] = None  # initial weights (Composer checkpoint or open_clip state_dict)
    pretrained: Optional[str] = None  # initial weights through open_clip: a tag of `name` (downloads) or a local file


@dataclass
class TwoStageConfig:
    """Two-stage decoding of a JEST train loader (``two_stage: {}`` turns it on; composer_jest.data.two_stage)."""

    scoring_image_size: Optional[int] = None  # default: image side * native patch / algorithms.jest.learner_patch_size
    decode_threads: int = 4  # full-resolution decode of the selected examples
    decode_device: str = 'cpu'  # cpu | cuda (torchvision decode_jpeg) | auto
    augment: bool = False  # random resized crop + flip of the selected examples (seeded, checkpointed)
    augment_scale: list[float] = field(default_factory=lambda: [0.9, 1.0])
    augment_ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    augment_flip: float = 0.5
    augment_seed: int = 0


@dataclass
class DataConfig:
    source: str = 'shapes'  # a registered data source: shapes (procedural demo) | mds (shards, local or s3://)
    # shapes
    num_samples: int = 4096
    noise: float = 0.0
    seed: int = 0
    label: str = 'shape'  # what the `label` column holds: shape | color | position
    # mds
    remote: Optional[str] = None
    local: Optional[str] = None
    shuffle: bool = True
    shuffle_seed: int = 0
    cache_limit: Optional[str] = None
    predownload: Optional[int] = None
    # both
    num_workers: int = 0
    prefetch_factor: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)  # more keyword arguments for the dataset
    two_stage: Optional[TwoStageConfig] = None  # mds + JEST: score low-res decodes, decode only the selected


@dataclass
class TrainConfig:
    run_name: Optional[str] = None
    seed: int = 17
    model: ModelConfig = field(default_factory=ModelConfig)
    train_loader: DataConfig = field(default_factory=DataConfig)
    eval_loader: Optional[DataConfig] = None
    global_train_batch_size: int = 64  # the trained (selected) batch, summed over ranks
    device_eval_batch_size: int = 128
    device_train_microbatch_size: Optional[Any] = None
    max_duration: str = '100ba'  # in batches (ba): equal trained examples for uniform and JEST (README)
    max_examples_trained: Optional[int] = None  # if set: max_duration = this / global_train_batch_size batches
    eval_interval: str = '50ba'
    precision: Optional[str] = None
    optimizer: dict[str, Any] = field(
        default_factory=lambda: {'name': 'decoupled_adamw', 'lr': 1e-3, 'weight_decay': 1e-4},
    )
    scheduler: Optional[dict[str, Any]] = field(
        default_factory=lambda: {'name': 'linear_decay_with_warmup', 't_warmup': '20ba', 'alpha_f': 0.1},
    )
    algorithms: dict[str, Any] = field(default_factory=dict)  # name -> kwargs; `jest` runs first
    callbacks: dict[str, Any] = field(default_factory=dict)
    loggers: dict[str, Any] = field(default_factory=dict)
    parallelism_config: Optional[dict[str, Any]] = None  # e.g. {fsdp: {...}}; FSDP2 with FSDP_VERSION=2
    compile_config: Optional[dict[str, Any]] = None  # torch.compile kwargs ({} = defaults); null: eager
    save_folder: Optional[str] = None
    save_interval: str = '1ep'
    save_filename: str = 'ep{epoch}-ba{batch}-rank{rank}.pt'
    save_latest_filename: Optional[str] = 'latest-rank{rank}.pt'
    save_overwrite: bool = False
    save_num_checkpoints_to_keep: int = -1
    load_path: Optional[str] = None
    autoresume: bool = False
    dist_timeout: float = 300.0
    progress_bar: Optional[bool] = None  # Composer's progress bar; null: only when stderr is a terminal
    log_to_console: bool = False  # Composer's metric dump on the console, every console_log_interval
    console_log_interval: str = '10ba'
    eval_summary: bool = True  # one line per evaluation (composer_jest.run.console.EvalSummary)
    metrics_file: Optional[str] = 'runs/{run_name}/metrics-rank{rank}.txt'  # every metric, every step; null: none
    print_metrics: bool = True  # print a summary table after fit
    variables: dict[str, Any] = field(default_factory=dict)


def load_config(path: Optional[str | os.PathLike] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Yaml + ``key=value`` overrides, merged onto :class:`TrainConfig` and resolved.

    Raises:
        ValueError: an unknown or misspelled key, or a value of the wrong type, naming the key.
    """
    schema = OmegaConf.structured(TrainConfig)
    layers = [OmegaConf.load(path)] if path is not None else []
    layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        cfg = OmegaConf.merge(schema, *layers)
        OmegaConf.resolve(cfg)
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, 'full_key', None) or getattr(e, 'key', None)
        raise ValueError(f'invalid config key {key!r} in {path or "<defaults>"}: {e.msg}') from None
    _check(cfg)
    if cfg.max_examples_trained is not None:
        cfg.max_duration = f'{batches_for_examples(cfg.max_examples_trained, cfg.global_train_batch_size)}ba'
    return cfg


def batches_for_examples(examples: int, global_train_batch_size: int) -> int:
    """Steps that train exactly ``examples`` examples: every step trains ``global_train_batch_size`` examples
    (with JEST, the selected sub-batches; Composer's ``sp`` counts the streamed super-batches instead).

    Example:
        >>> batches_for_examples(4800, 32)
        150
    """
    if examples < 1 or examples % global_train_batch_size:
        raise ValueError(f'max_examples_trained={examples} must be a positive multiple of global_train_batch_size='
                         f'{global_train_batch_size} (every step trains that many examples)')
    return examples // global_train_batch_size


def _check(cfg: DictConfig) -> None:
    from composer_jest.run import registry  # noqa: PLC0415  (imports Composer: only once a config is checked)

    for name in ('train_loader', 'eval_loader'):
        loader = cfg.get(name)
        if loader is None:
            continue
        registry.get(registry.data_sources, loader.source, 'data source', f'{name}.source')
        if loader.source == 'mds' and not (loader.remote or loader.local):
            raise ValueError(f'{name}: source=mds needs remote (e.g. s3://bucket/path) and/or local')
        if loader.two_stage is not None and (name != 'train_loader' or loader.source != 'mds'):
            raise ValueError(f'{name}.two_stage: two-stage decoding is for a train_loader with source: mds '
                             f'(JEST selects between the stages), got {name} with source {loader.source!r}')
    from composer_jest.core.objectives import build_objective  # noqa: PLC0415

    build_objective(OmegaConf.to_container(cfg.model.loss) if isinstance(cfg.model.loss, DictConfig)
                    else cfg.model.loss, 'model.loss')
    if cfg.global_train_batch_size < 1:
        raise ValueError(f'global_train_batch_size must be >= 1, got {cfg.global_train_batch_size}')
    if cfg.optimizer is None or 'name' not in cfg.optimizer:
        raise ValueError('optimizer needs a name (e.g. decoupled_adamw)')
    _check_trainer_args(cfg)


def _check_trainer_args(cfg: DictConfig) -> None:
    """The Trainer arguments that would otherwise fail only once the run starts (or deep inside Composer)."""
    import dataclasses

    from composer.core import Precision, Time
    from composer.utils.parallelism import FSDP2Config, FSDPConfig

    precisions = [p.value for p in Precision]
    if cfg.precision is not None and cfg.precision not in precisions:
        raise ValueError(f'precision must be one of {precisions} or null (Composer picks), got {cfg.precision!r}')
    for key in ('max_duration', 'eval_interval', 'save_interval', 'console_log_interval'):
        try:
            Time.from_timestring(str(cfg[key]))
        except ValueError:
            raise ValueError(
                f"{key} must be a Composer time string such as '100ba', '2ep', '51200sp', got {cfg[key]!r}",
            ) from None
    parallelism = cfg.parallelism_config or {}
    unknown = set(parallelism) - {'fsdp', 'tp'}
    if unknown:
        raise ValueError(f"parallelism_config takes keys 'fsdp' and 'tp', got unknown {sorted(unknown)}")
    fsdp = parallelism.get('fsdp') or {}
    # FSDP_VERSION=2 maps FSDP1 names onto FSDP2Config, so either spelling is accepted here.
    valid = {f.name for f in dataclasses.fields(FSDPConfig) if not f.name.startswith('_')}
    valid |= set(FSDP2Config.settable_attrs())
    unknown = sorted(set(fsdp) - valid)
    if unknown:
        raise ValueError(f'parallelism_config.fsdp has unknown keys {unknown}; valid keys: {sorted(valid)}')

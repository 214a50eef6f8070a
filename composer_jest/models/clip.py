"""ComposerModel around any open_clip CLIP, with zero-shot and retrieval metrics.

Every call into the network (training, reduced-resolution scoring, class-prompt embeddings) goes
through ``CLIPTowers.forward``: Composer's FSDP wraps each direct child of the ComposerModel, and a
call that bypassed the wrapped child's forward would see sharded parameters.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import torch
import torch.nn.functional as F
from composer.models import ComposerModel
from composer.utils import dist
from open_clip.transformer import VisionTransformer
from torch import nn
from torchmetrics import Metric

from composer_jest.core.batch import IMAGE_KEY, LABEL_KEY, TEXT_KEY
from composer_jest.core.objectives import Objective, build_objective
from composer_jest.models import packed
from composer_jest.models.flexi import check_patch_size, vit_head, vit_tokens
from composer_jest.models.negatives import NegativesQueue
from composer_jest.models.preprocess import eval_transform
from composer_jest.models.text_buckets import (
    DEFAULT_TEXT_BUCKET_OVERHEAD,
    DEFAULT_TEXT_BUCKETS,
    Plan,
    bucket_plan,
    caption_lengths,
    length_histogram,
)

__all__ = ['CLIPTowers', 'CLIPModel', 'ZeroShotAccuracy', 'RetrievalRecall', 'build_clip', 'model_config_dir']

ModelSpec = Union[str, dict, nn.Module]


def model_config_dir() -> Path:
    """Folder of the tiny open_clip configs shipped with the package (registered on import)."""
    return Path(__file__).parent / 'model_configs'


open_clip.add_model_config(model_config_dir())


def build_clip(spec: ModelSpec, pretrained: Optional[str] = None, field: str = 'pretrained') -> nn.Module:
    """An open_clip CLIP from a registered model name, a config dict, or an existing module.

    Models are created with ``nonscalar_logit_scale=True`` (FSDP2 rejects scalar parameters). ``pretrained``
    (with a model name only): an open_clip tag or a local weights file, loaded by open_clip
    (:func:`composer_jest.models.pretrained.create_pretrained`; errors name ``field``).
    """
    if pretrained is not None and not isinstance(spec, str):
        raise ValueError(f'{field}={pretrained!r} needs an open_clip model name (open_clip tags and weights files '
                         f'are per named architecture), got a {type(spec).__name__}')
    if isinstance(spec, nn.Module):
        return spec
    if isinstance(spec, str):
        if spec not in open_clip.list_models():
            raise ValueError(
                f'model {spec!r} is not an open_clip model name; shipped tiny configs: '
                f'{sorted(p.stem for p in model_config_dir().glob("*.json"))}; or pass a config dict',
            )
        if pretrained is not None:
            from composer_jest.models.pretrained import create_pretrained  # noqa: PLC0415

            return create_pretrained(spec, pretrained, field, nonscalar_logit_scale=True)
        return open_clip.create_model(spec, nonscalar_logit_scale=True, pretrained=None)
    if isinstance(spec, dict):
        cfg = dict(spec)
        cfg.setdefault('nonscalar_logit_scale', True)
        return open_clip.CLIP(**cfg)
    raise TypeError(f'model must be an open_clip model name, a config dict or an nn.Module, got {type(spec)}')


def eval_image_transform(clip: nn.Module) -> Callable:
    """open_clip's eval transform from the image tower's own ``preprocess_cfg`` (size, mean/std, resize)."""
    return eval_transform(clip.visual.preprocess_cfg)


def tokenizer_for(spec: ModelSpec, clip: nn.Module):
    """open_clip's tokenizer for a model name; a bundled-vocab SimpleTokenizer otherwise."""
    context_length = getattr(clip, 'context_length', 77)
    if isinstance(spec, str):
        return open_clip.get_tokenizer(spec, context_length=context_length)
    return open_clip.SimpleTokenizer(context_length=context_length)


class CLIPTowers(nn.Module):
    """The trained network: both towers plus logit scale/bias, behind one ``forward``.

    ``forward(image, text, patch_size=None)`` returns L2-normalised features (``None`` for a missing
    input), ``logit_scale`` (the scale itself, ``exp`` of the parameter) and ``logit_bias``.
    ``patch_size`` encodes the image at another patch size (FlexiViT) for cheap scoring; the first
    ``low_res`` images of the batch can be encoded at ``low_res_patch_size`` (multi-resolution).

    Every returned tensor owns its storage: none aliases a parameter or buffer (FSDP frees the unsharded
    parameters after the forward, so an alias read later is a use-after-free on CUDA).

    Captions are encoded in length buckets (``text_buckets``, ``text_bucket_overhead``; see ``encode_text``).
    Several groups of sequences -- the buckets, the two resolutions of a multi-resolution batch -- go through
    one packed transformer call (:mod:`composer_jest.models.packed`) when the tower is open_clip's plain transformer.
    """

    # Most length buckets ``encode_text`` splits a batch of captions into (1: one trim to the longest caption),
    # and what one more bucket (one more text-transformer call) must save, in encoded positions.
    text_buckets: int = DEFAULT_TEXT_BUCKETS
    text_bucket_overhead: int = DEFAULT_TEXT_BUCKET_OVERHEAD
    # Run multi-group encodes as one packed transformer call (False: one call per group; for A/B benchmarks).
    pack: bool = True

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip
        # Packed calls need open_clip's plain blocks; otherwise (None) every group runs its own call.
        self._text_layout = packed.install(clip.transformer) if self._text_trimmable() else None
        visual = getattr(clip, 'visual', None)
        self._image_layout = packed.install(visual.transformer) if isinstance(visual, VisionTransformer) else None

    def encode_image(self, image: torch.Tensor, patch_size: Optional[int] = None) -> torch.Tensor:
        if patch_size is None:
            features = self.clip.encode_image(image)
        else:
            from composer_jest.models.flexi import encode_image_at  # noqa: PLC0415

            features = encode_image_at(self.clip.visual, image, patch_size)
        return F.normalize(features, dim=-1)

    def text_plan(self, text: torch.Tensor) -> Optional[Plan]:
        """The length-bucket plan ``encode_text`` runs for ``text`` (``None``: the tower cannot be trimmed).

        Reading the length histogram is the forward's one host copy: a sync on CUDA, which waits for every
        kernel queued before it. ``forward`` therefore plans before it queues the image tower, so the text
        tower's host-side dispatch (one call per bucket) overlaps the image tower's GPU time.
        """
        if not self._text_trimmable():
            return None
        return bucket_plan(length_histogram(caption_lengths(text), text.shape[1]), self.text_buckets,
                           self.text_bucket_overhead)

    def encode_text(self, text: torch.Tensor, plan: Optional[Plan] = None) -> torch.Tensor:
        """open_clip's ``encode_text``, in caption-length buckets when that is exact.

        With a causal mask and EOT (argmax) pooling, no token after a caption's EOT reaches its pooled
        output (:mod:`composer_jest.models.text_buckets`). The captions are grouped by length into at most
        ``text_buckets`` buckets (the plan minimising encoded positions + ``text_bucket_overhead`` per extra
        bucket) and each bucket runs the transformer up to its own longest caption, so a caption costs close
        to its own length instead of the batch maximum or the context length. The token and positional
        embeddings are looked up once for the whole batch (one embedding gradient, not one per bucket). The
        features (and gradients) equal the untrimmed ones, in the input order. ``plan``: from ``text_plan(text)``
        (computed here when not given; reading the length histogram is one host copy).
        """
        clip = self.clip
        if plan is None:
            plan = self.text_plan(text)
        if not plan:  # not trimmable, or no captions
            return clip.encode_text(text)
        text = text[:, :plan[-1][0]]  # no bucket needs a position after the longest caption's EOT
        cast_dtype = clip.transformer.get_cast_dtype()
        x = clip.token_embedding(text).to(cast_dtype) + clip.positional_embedding[:text.shape[1]].to(cast_dtype)
        lengths, order = caption_lengths(text), None
        if len(plan) > 1:  # bucket g = the next n_g captions in length order
            order = torch.argsort(lengths, stable=True)
            x, lengths = x.index_select(0, order), lengths.index_select(0, order)
        counts = [n for _, n in plan]
        groups = [part[:, :length] for part, (length, _) in zip(x.split(counts), plan)]
        if self.pack and self._text_layout is not None:  # every bucket in one packed, causal call
            out = packed.run(clip.transformer, self._text_layout, groups, causal=True)
        else:
            out = [clip.transformer(g, attn_mask=clip.attn_mask[:g.shape[1], :g.shape[1]]) for g in groups]
        # each caption's EOT output (position ℓ - 1), then ln_final: a per-token op, so pooling first is exact
        pooled = clip.ln_final(torch.cat([o[torch.arange(o.shape[0], device=o.device), ell - 1]
                                          for o, ell in zip(out, lengths.split(counts))]))
        if order is not None:
            pooled = pooled.index_select(0, torch.argsort(order))  # back to the input order
        projection = clip.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def _encode_image_packed(self, image: torch.Tensor, low_res: int, low_res_patch_size: Optional[int],
                             patch_size: Optional[int]) -> torch.Tensor:
        """The first ``low_res`` images at ``low_res_patch_size``, the rest at ``patch_size`` (``None``: native), in
        one packed transformer call."""
        visual = self.clip.visual
        native = visual.conv1.kernel_size[0]
        tokens = [vit_tokens(visual, image[:low_res], low_res_patch_size or native),
                  vit_tokens(visual, image[low_res:], patch_size or native)]
        out = packed.run(visual.transformer, self._image_layout, tokens, causal=False)
        return F.normalize(torch.cat([vit_head(visual, o) for o in out]), dim=-1)

    def _text_trimmable(self) -> bool:
        """Whether the text tower is open_clip's inline causal, EOT-pooled one (the trim is then exact)."""
        clip = self.clip
        return (isinstance(clip, open_clip.CLIP) and getattr(clip, 'text_pool_type', None) == 'argmax'
                and getattr(clip, 'attn_mask', None) is not None)

    def forward(
        self,
        image: Optional[torch.Tensor] = None,
        text: Optional[torch.Tensor] = None,
        patch_size: Optional[int] = None,
        low_res: int = 0,
        low_res_patch_size: Optional[int] = None,
    ) -> dict[str, Any]:
        image_features = text_features = None
        # Plan the text buckets (a host sync) before queueing any image-tower kernel: see ``text_plan``.
        plan = self.text_plan(text) if text is not None else None
        if image is not None:
            if 0 < low_res < image.shape[0] and self.pack and self._image_layout is not None:
                image_features = self._encode_image_packed(image, low_res, low_res_patch_size, patch_size)
            elif low_res > 0:
                parts = [self.encode_image(image[:low_res], low_res_patch_size)]
                if low_res < image.shape[0]:  # round(f * n) can be n (e.g. a microbatch of 1)
                    parts.append(self.encode_image(image[low_res:], patch_size))
                image_features = torch.cat(parts)
            else:
                image_features = self.encode_image(image, patch_size)
        if text is not None:
            text_features = F.normalize(self.encode_text(text, plan), dim=-1)
        bias = getattr(self.clip, 'logit_bias', None)
        # Nothing returned here may alias a parameter: under FSDP mixed precision a parameter seen inside the
        # forward is the unsharded low-precision copy, whose storage FSDP frees right after the forward.
        # ``exp`` already allocates; the bias is cloned (still differentiable, so it trains).
        return {
            'image_features': image_features,
            'text_features': text_features,
            'logit_scale': self.clip.logit_scale.exp(),
            'logit_bias': bias.clone() if bias is not None else None,
        }


class CLIPModel(ComposerModel):
    """Composer wrapper of an open_clip CLIP for contrastive training on dict batches ``{image, text}``.

    Args:
        model: open_clip model name (e.g. ``'jest-tiny'``, shipped), config dict, or module.
        loss: a loss spec (:mod:`composer_jest.core.objectives`): a registered name (``'sigmoid'``: SigLIP, needs a
            model with ``init_logit_bias``; ``'softmax'``: CLIP; ``'dcl'``, ``'hcl'``, ``'triplet'``, ``'npair'``)
            or ``{'name': ..., <parameters>, 'false_negatives': {...}}``. ``loss_name`` holds its canonical spec.
            The reference in the loss (:mod:`composer_jest.core.steering`): ``{'name': 'drrho', 'form': 'sigmoid',
            'tau': 1.0, 'distill': λ}`` (DRRho steering) or ``{'name': 'distill', 'form': 'sigmoid', 'distill': λ}``
            (SigLIP/CLIP plus reference distillation); both read the batch's cached ``ref_*`` columns
            (``composer-jest embed-reference``) and fail on the first batch that lacks them.
        classnames: zero-shot class names; enables the ``ZeroShotAccuracy`` eval metric (batches then
            need a ``label`` key).
        class_templates: prompt templates with ``{name}``; embeddings averaged over templates.
        image_key, text_key: batch keys.
        low_res_fraction: multi-resolution training: this fraction of every training batch is encoded
            at ``low_res_patch_size`` (FlexiViT), the rest at the native patch size; the loss covers all.
            Default: one half (the paper's) when ``low_res_patch_size`` is set, else 0.
        low_res_patch_size: patch size of the low-resolution part.
        tokenizer: captions/prompts -> token ids; defaults to open_clip's tokenizer for ``model``.
        pretrained: initial weights through open_clip's own loading (``model`` a name): one of its open_clip
            tags (downloaded when online) or a local weights file (:mod:`composer_jest.models.pretrained`).

    Example:
        >>> import torch
        >>> model = CLIPModel('jest-tiny')
        >>> batch = {'image': torch.randn(4, 3, 32, 32), 'text': model.tokenizer(['a red circle'] * 4)}
        >>> out = model(batch)
        >>> out['image_features'].shape
        torch.Size([4, 64])
    """

    def __init__(
        self,
        model: ModelSpec = 'jest-tiny',
        loss: Union[str, dict, Objective] = 'sigmoid',
        classnames: Optional[Sequence[str]] = None,
        class_templates: Sequence[str] = ('a {name}',),
        image_key: str = IMAGE_KEY,
        text_key: str = TEXT_KEY,
        low_res_fraction: Optional[float] = None,
        low_res_patch_size: Optional[int] = None,
        tokenizer: Optional[Callable[[Sequence[str]], torch.Tensor]] = None,
        pretrained: Optional[str] = None,
    ):
        super().__init__()
        objective = build_objective(loss)
        if low_res_fraction is None:
            low_res_fraction = 0.5 if low_res_patch_size is not None else 0.0
        if not (isinstance(low_res_fraction, (int, float)) and 0.0 <= low_res_fraction < 1.0):
            raise ValueError(f'low_res_fraction must be in [0, 1), got {low_res_fraction!r}')
        if low_res_fraction > 0 and low_res_patch_size is None:
            raise ValueError('low_res_fraction > 0 needs low_res_patch_size (e.g. twice the native patch size)')
        clip = build_clip(model, pretrained, field='model.pretrained')
        if objective.needs_bias and getattr(clip, 'logit_bias', None) is None:
            raise ValueError(f'loss={objective.name!r} needs a model with a logit bias (open_clip init_logit_bias)')
        # The open_clip name or config this model was built from (a bare reference checkpoint loads into it).
        self.spec: Optional[ModelSpec] = model if not isinstance(model, nn.Module) else None
        self.towers = CLIPTowers(clip)
        self.objective = objective
        # Parameters the loss never reads get no gradient, hence no optimizer state, which a resume would look for.
        if not objective.needs_bias and getattr(clip, 'logit_bias', None) is not None:
            clip.logit_bias.requires_grad_(False)
        if not objective.uses_model_scale:
            clip.logit_scale.requires_grad_(False)
        # a negatives queue (loss spec `negatives: {queue_size: K}`): momentum towers + their embeddings, checkpointed
        self.negatives = NegativesQueue(self.towers, objective.negatives) if objective.negatives is not None else None
        self.loss_name = objective.spec()  # the contract's loss spec (JEST scores with it unless told otherwise)
        self.image_key, self.text_key = image_key, text_key
        self.tokenizer = tokenizer if tokenizer is not None else tokenizer_for(model, clip)
        self.classnames = list(classnames) if classnames else None
        self.class_templates = list(class_templates)
        self._class_features: Optional[torch.Tensor] = None
        self._loss_fn: Optional[nn.Module] = None
        check_patch_size(clip.visual, low_res_patch_size if low_res_fraction > 0 else None, 'low_res_patch_size')
        self.low_res_fraction = float(low_res_fraction)
        self.low_res_patch_size = low_res_patch_size

    # -- training -------------------------------------------------------------------------------------
    def image_transform(self) -> Callable:
        """The eval-time PIL -> tensor transform the image tower expects (size, mean/std, resize mode)."""
        return eval_image_transform(self.towers.clip)

    def preprocess_cfg(self) -> dict[str, Any]:
        """open_clip's preprocessing settings of the image tower (size, mean/std, interpolation, resize mode)."""
        return dict(self.towers.clip.visual.preprocess_cfg)

    def scoring_image_size(self, patch_size: Optional[int]) -> int:
        """The image side whose native-patch token grid is that of a full-size image at ``patch_size`` (two-stage
        decoding scores such images: :func:`composer_jest.models.flexi.scoring_image_size`)."""
        from composer_jest.models.flexi import scoring_image_size  # noqa: PLC0415

        visual = self.towers.clip.visual
        size, native = visual.preprocess_cfg['size'], getattr(visual, 'patch_size', None)
        if native is None:
            raise ValueError('two-stage decoding needs a ViT image tower (a native patch size)')
        native = native[0] if isinstance(native, (tuple, list)) else native
        return scoring_image_size(size[0] if isinstance(size, (tuple, list)) else size, native, patch_size)

    def forward(self, batch: dict, patch_size: Optional[int] = None) -> dict[str, Any]:
        image, text = batch[self.image_key], batch[self.text_key]
        low_res = 0
        if self.training and patch_size is None and self.low_res_fraction > 0:
            low_res = int(round(self.low_res_fraction * image.shape[0]))
        if self.training:
            self._class_features = None  # weights change: class embeddings go stale
        return self.towers(image, text, patch_size=patch_size, low_res=low_res,
                           low_res_patch_size=self.low_res_patch_size)

    def _build_loss(self) -> Optional[nn.Module]:
        """open_clip's loss for plain ``sigmoid`` / ``softmax``; ``None``: the objective's own (gathered) loss."""
        rank, world = dist.get_global_rank(), dist.get_world_size()
        if self.loss_name == 'sigmoid':
            return open_clip.loss.SigLipLoss(rank=rank, world_size=world)
        if self.loss_name == 'softmax':
            return open_clip.loss.ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=world)
        return None

    def loss(self, outputs: dict[str, Any], batch: Any, *args, **kwargs) -> torch.Tensor:
        if self._loss_fn is None:  # built lazily: rank/world size are known only once dist is up
            self._loss_fn = self._build_loss() or self._objective_loss
        o = outputs
        if self.loss_name == 'sigmoid':
            return self._loss_fn(o['image_features'], o['text_features'], o['logit_scale'], o['logit_bias'])
        if self.loss_name == 'softmax':
            return self._loss_fn(o['image_features'], o['text_features'], o['logit_scale'])
        return self._loss_fn(o, batch)

    def _objective_loss(self, outputs: dict[str, Any], batch: Any) -> torch.Tensor:
        """The objective's ``L(B) / |B|`` over every rank's batch (features gathered with their gradients, as
        open_clip's ``ClipLoss(local_loss=False, gather_with_grad=True)``), false negatives masked."""
        rank, world = dist.get_global_rank(), dist.get_world_size()
        features = dict(outputs)
        features.update(self._reference_columns(batch, world))  # steered losses (core/steering): cached ref_* columns
        fn = self.objective.false_negatives
        signature = fn.signature(batch) if fn is not None else None
        if world > 1:
            features['image_features'], features['text_features'] = open_clip.loss.gather_features(
                outputs['image_features'], outputs['text_features'], local_loss=False, gather_with_grad=True,
                rank=rank, world_size=world)
            if signature is not None:
                signature = torch.cat(dist.all_gather(signature.to(features['image_features'].device)))
        mask = fn.mask(signature.to(features['image_features'].device)) if signature is not None else None
        if self.negatives is None:
            return self.objective.training_loss(features, mask)
        loss = self.objective.training_loss({**features, **self.negatives.features()}, mask)
        self.negatives.update(self.towers, batch[self.image_key], batch[self.text_key])  # for the next steps
        return loss

    def _reference_columns(self, batch: Any, world: int) -> dict[str, torch.Tensor]:
        """The cached reference columns a steered loss reads (``reference_keys``), of every rank's batch."""
        keys = self.objective.reference_keys
        if not keys:
            return {}
        from composer_jest.core.steering import check_reference_columns  # noqa: PLC0415

        check_reference_columns(batch, self.objective.family)
        cols = {k: torch.as_tensor(batch[k]).to(batch[self.image_key].device) for k in keys}
        return {k: torch.cat(dist.all_gather(v)) for k, v in cols.items()} if world > 1 else cols

    # -- the scoring contract (composer_jest.core.contract.ScoringModel): what JEST calls -----------------------
    def score_features(self, batch: dict, patch_size: Optional[int] = None) -> dict[str, Any]:
        """Features of the whole batch for JEST: through ``forward`` (the FSDP-wrapped path), in eval mode (no
        dropout, no multi-resolution split), at ``patch_size`` (FlexiViT) or the native one."""
        was_training = self.training
        self.eval()
        try:
            features = dict(self(batch, patch_size=patch_size))
        finally:
            self.train(was_training)
        if self.negatives is not None:  # the training loss's queued negatives count in the scores too
            features.update(self.negatives.features())
        return features

    def check_scoring_patch_size(self, patch_size: Optional[int]) -> None:
        check_patch_size(self.towers.clip.visual, patch_size, 'learner_patch_size')

    def step_flops(self, **kwargs: Any) -> Optional[dict[str, float]]:
        """Analytic FLOPs of a JEST step on this model (:func:`composer_jest.models.flops.step_flops`, with this
        model's multi-resolution and text-bucket settings); ``None`` for towers it cannot estimate."""
        from composer_jest.models.flops import step_flops  # noqa: PLC0415

        try:
            return step_flops(self, low_res_fraction=self.low_res_fraction, low_res_patch_size=self.low_res_patch_size,
                              text_buckets=self.towers.text_buckets,
                              text_bucket_overhead=self.towers.text_bucket_overhead, **kwargs)
        except NotImplementedError:  # non-ViT / non-open_clip towers
            return None

    # -- evaluation -----------------------------------------------------------------------------------
    def class_features(self, device: torch.device) -> torch.Tensor:
        """``[num_classes, dim]`` normalised class-prompt embeddings (template-averaged), cached per eval."""
        if self._class_features is None:
            prompts = [t.format(name=n) for n in self.classnames for t in self.class_templates]
            tokens = self.tokenizer(prompts).to(device)
            with torch.no_grad():
                feats = self.towers(text=tokens)['text_features']
            feats = feats.view(len(self.classnames), len(self.class_templates), -1).mean(1)
            self._class_features = F.normalize(feats, dim=-1)
        return self._class_features

    def eval_forward(self, batch: dict, outputs: Optional[Any] = None) -> dict[str, Any]:
        if outputs is not None:
            return outputs
        out = dict(self.towers(batch[self.image_key], batch[self.text_key]))
        if self.classnames is not None:
            out['class_logits'] = out['image_features'] @ self.class_features(out['image_features'].device).T
        return out

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        metrics: dict[str, Metric] = {
            f'{name}@{k}': RetrievalRecall(direction, k)
            for name, direction in (('ImageToTextRecall', 'image_to_text'), ('TextToImageRecall', 'text_to_image'))
            for k in (1, 5)
        }
        if self.classnames is not None:
            metrics['ZeroShotAccuracy'] = ZeroShotAccuracy()
        return metrics

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        if isinstance(metric, ZeroShotAccuracy):
            metric.update(outputs['class_logits'], batch[LABEL_KEY])
        elif isinstance(metric, RetrievalRecall):  # identical captions (token ids) are one retrieval target
            metric.update(outputs['image_features'], outputs['text_features'], caption_groups(batch[self.text_key]))
        else:
            raise TypeError(f'unexpected metric {type(metric).__name__}')

    # -- reference use ----------------------------------------------------------------------------------
    def frozen_copy(self) -> CLIPTowers:
        """A detached, eval-mode copy of the towers (e.g. to use this model as a JEST reference)."""
        return copy.deepcopy(self.towers).eval().requires_grad_(False)


class ZeroShotAccuracy(Metric):
    """Top-1 accuracy of ``argmax`` over class-prompt logits."""

    full_state_update = False

    def __init__(self):
        super().__init__()
        self.add_state('correct', default=torch.tensor(0.0), dist_reduce_fx='sum')
        self.add_state('total', default=torch.tensor(0.0), dist_reduce_fx='sum')

    def update(self, class_logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.correct += (class_logits.argmax(-1) == labels.to(class_logits.device)).sum().float()
        self.total += labels.numel()

    def compute(self) -> torch.Tensor:
        return self.correct / self.total.clamp(min=1)


class RetrievalRecall(Metric):
    """Recall@k of image→text or text→image retrieval over the whole eval set, with repeated captions as one target.

    Each example carries a caption group (``groups``: :func:`caption_groups` of its token ids, so examples with
    identical captions share one; ``None``: every example its own group). With ``g(i)`` the group of example
    ``i`` and ``s`` the similarity of a query to a candidate:

    - image→text: candidate captions are the *distinct* captions (a group scores its best member), and image
      ``i`` is a hit when fewer than ``k`` other captions score strictly above its own caption group;
    - text→image: caption ``j`` is a hit when fewer than ``k`` images of *other* captions score strictly above
      the best image whose caption is identical to it (``g(c) = g(j)``).

    With all captions distinct this is the usual per-pair recall (a tie with the positive counts as a hit). On
    templated captions ("a photo of a dog" for many images) exact-index recall would ask the model to tell
    identical captions apart, i.e. ~1 / repeats for any model; this rule scores what can be retrieved.

    Example:
        >>> import torch
        >>> image, text = torch.eye(3), torch.eye(3)[[0, 0, 2]]   # captions 0 and 1 are the same text
        >>> r = RetrievalRecall('text_to_image', 1)
        >>> r.update(image, text, groups=torch.tensor([7, 7, 9]))  # caption 1 finds image 0: a hit
        >>> float(r.compute())
        1.0
    """

    full_state_update = False

    def __init__(self, direction: str, k: int):
        super().__init__()
        if direction not in ('image_to_text', 'text_to_image'):
            raise ValueError(f"direction must be 'image_to_text' or 'text_to_image', got {direction!r}")
        self.direction, self.k = direction, k
        self.add_state('image_features', default=[], dist_reduce_fx='cat')
        self.add_state('text_features', default=[], dist_reduce_fx='cat')
        self.add_state('groups', default=[], dist_reduce_fx='cat')

    def update(self, image_features: torch.Tensor, text_features: torch.Tensor,
               groups: Optional[torch.Tensor] = None) -> None:
        self.image_features.append(image_features.float())
        self.text_features.append(text_features.float())
        if groups is None:  # -1: a group of its own (ids from caption_groups are >= 0)
            groups = torch.full((image_features.shape[0],), -1, dtype=torch.long, device=image_features.device)
        self.groups.append(groups.to(image_features.device, torch.long))

    def compute(self) -> torch.Tensor:
        img, txt, groups = _cat(self.image_features), _cat(self.text_features), _cat(self.groups)
        groups = torch.where(groups < 0, -1 - torch.arange(groups.numel(), device=groups.device), groups)
        distinct, group = torch.unique(groups, return_inverse=True)  # group: [n] in 0..G-1
        if self.direction == 'image_to_text':
            sim = img @ txt.T
            # best score of each distinct caption for each image query
            best = sim.new_full((sim.shape[0], distinct.numel()), -math.inf)
            best = best.scatter_reduce(1, group.expand_as(sim), sim, 'amax')
            rank = (best > best.gather(1, group[:, None])).sum(1)
        else:
            sim = txt @ img.T
            same = group[:, None] == group[None, :]
            positive = sim.masked_fill(~same, -math.inf).amax(1, keepdim=True)
            rank = (sim.masked_fill(same, -math.inf) > positive).sum(1)
        return (rank < self.k).float().mean()


# Two polynomial hashes of the token ids modulo primes below 2**31: every product and sum fits in int64.
_HASH_PRIMES, _HASH_BASES = (2_147_483_647, 2_147_483_629), (1_000_003, 999_983)


def caption_groups(text: torch.Tensor) -> torch.Tensor:
    """``[n]`` int64 ids, equal for captions with identical token ids (padding length ignored), else distinct.

    Two position-weighted sums ``sum_t ids_t * a^t mod p`` (primes ``p < 2^31``) joined into one id in
    ``[0, 2^62)``: distinct captions collide with probability ~``n^2 / 2^62``. On the device, no host sync.

    Example:
        >>> import torch
        >>> ids = torch.tensor([[1, 5, 2, 0], [1, 5, 2, 0], [1, 2, 5, 0]])
        >>> g = caption_groups(ids)
        >>> bool(g[0] == g[1]), bool(g[0] == g[2]), bool(caption_groups(ids[:, :3])[0] == g[0])
        (True, False, True)
    """
    ids = []
    for p, a in zip(_HASH_PRIMES, _HASH_BASES):
        powers = torch.tensor([pow(a, t, p) for t in range(text.shape[-1])], device=text.device)
        ids.append(((text.long() % p) * powers % p).sum(-1) % p)
    return ids[0] * _HASH_PRIMES[1] + ids[1]


def _cat(x: Union[torch.Tensor, list]) -> torch.Tensor:
    return torch.cat(x) if isinstance(x, list) else x


def checkpoint_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """open_clip-style weights (``visual.*``, ``transformer.*``…) from a Composer checkpoint of
    :class:`CLIPModel` (``state.model``) or a plain open_clip ``state_dict``, loaded with ``weights_only=True``
    (:func:`composer_jest.models.checkpoint.load_checkpoint`: a file holding other Python objects is refused)."""
    from composer_jest.models.checkpoint import load_checkpoint  # safe: tensors and Composer metadata only

    obj = load_checkpoint(path)
    if isinstance(obj, dict) and 'state' in obj and 'model' in obj['state']:
        sd = obj['state']['model']
    elif isinstance(obj, dict) and 'state_dict' in obj:
        sd = obj['state_dict']
    elif isinstance(obj, dict):
        sd = obj
    else:
        raise ValueError(f'{path}: not a Composer checkpoint or a state_dict (got {type(obj).__name__})')
    for prefix in ('module.', 'towers.clip.'):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd

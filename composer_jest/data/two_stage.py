"""Two-stage decoding: decode every example of a super-batch cheaply for scoring, and only the selected ones in full.

With filter ratio ``f`` the loader delivers ``N = b / (1 - f)`` examples per step of which JEST trains on ``b``;
the other ``N - b`` are only scored, by a learner at a coarser patch size (FlexiViT). Decoding and transforming
all ``N`` at the training resolution costs ``1 / (1 - f)`` times uniform training's CPU (5x at ``f = 0.8``).

Stage 1 (the loader workers, every example): the JPEG is decoded in draft mode — libjpeg's DCT scaling, which
reconstructs the image at ``1/2``, ``1/4`` or ``1/8`` scale for a fraction of a full decode — and transformed at
the *scoring resolution* ``S_low = S p_native / p_learner`` (:func:`scoring_image_size`), the side at which
the learner's native patch gives the same token grid as its scoring patch ``p_learner`` on the full ``S``-pixel
image. The encoded bytes travel along under :data:`~composer_jest.core.batch.ENCODED_IMAGE_KEY`.

Stage 2 (the algorithm, after selection, only the ``b`` selected examples): :class:`FullResDecoder` decodes
the bytes at full resolution with the eval transform the loader uses in one-stage mode (bit for bit the same
tensor), in a thread pool (PIL releases the GIL while it decodes and resizes), or on the GPU with
``torchvision.io.decode_jpeg(device='cuda')``; optionally with training augmentations
(:class:`RandomResizedCropFlip`) drawn from a seeded, checkpointed ``torch.Generator``.

Why the low-resolution scores match. FlexiViT scoring at patch ``p = k p_n`` embeds each ``p x p`` patch ``x``
of the full image as ``<x, ŵ>`` with ``ŵ = pinv(B)ᵀ w`` (``B``: resize ``p_n -> p``), i.e. as
``<pinv(B) x, w>``: the native filter applied to a least-squares ``k``-fold downsample of the patch. Stage 1
applies the native filter to a ``k``-fold smaller image made by DCT scaling + bicubic resizing instead; both
are low-pass downsamples of the same pixels on the same token grid with the same interpolated position
embeddings, so the features agree up to the difference of the two filters (measured in
``tests/data/test_two_stage.py``).

Example:
    >>> scoring_image_size(224, native_patch_size=16, learner_patch_size=32)
    112
    >>> import io
    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new('RGB', (384, 256), (200, 30, 30)).save(buf, 'JPEG'); data = buf.getvalue()
    >>> open_rgb(data).size, open_rgb(data, draft=64).size  # draft: the smallest DCT scale >= 64 on each side
    ((384, 256), (96, 64))
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from composer_jest.models.flexi import scoring_image_size, scoring_patch_size  # noqa: F401  (re-exported)
from composer_jest.models.preprocess import eval_transform  # re-exported: the loaders' one-stage transform

__all__ = ['open_rgb', 'scoring_image_size', 'scoring_patch_size', 'eval_transform', 'scoring_thumbnail',
           'ScoringTransform', 'RandomResizedCropFlip', 'FullResDecoder', 'DECODE_DEVICES', 'SCORING_COLUMN']

DECODE_DEVICES = ('cpu', 'cuda', 'auto')
# MDS column of optional stored scoring thumbnails (`composer-jest convert --scoring-side S`): stage 1 decodes this
# small JPEG instead of the full file (a draft decode still entropy-decodes the whole file).
SCORING_COLUMN = 'image_scoring'


def open_rgb(data: bytes, draft: Optional[int] = None) -> Image.Image:
    """The RGB image of encoded ``data``; with ``draft``, a JPEG is decoded at the smallest DCT scale (1, 1/2,
    1/4, 1/8) that keeps both sides ``>= draft`` (other formats decode in full)."""
    image = Image.open(io.BytesIO(data))
    if draft is not None and image.format == 'JPEG':
        image.draft('RGB', (draft, draft))
    return image if image.mode == 'RGB' else image.convert('RGB')


def scoring_thumbnail(image: Image.Image, side: int, quality: int = 90) -> bytes:
    """A JPEG of ``image`` with its shortest side resized to ``side`` (bicubic): the :data:`SCORING_COLUMN` value.

    Example:
        >>> open_rgb(scoring_thumbnail(Image.new('RGB', (300, 200)), 112)).size
        (168, 112)
    """
    image = image if image.mode == 'RGB' else image.convert('RGB')
    k = side / min(image.size)
    if k < 1:
        size = (max(side, round(image.size[0] * k)), max(side, round(image.size[1] * k)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, 'JPEG', quality=quality)
    return buf.getvalue()


class ScoringTransform:
    """Stage 1's PIL -> tensor transform: open_clip's eval geometry (shortest side -> ``size``, centre crop) in
    one PIL resize of the crop box, with a cheaper filter (``bilinear``, antialiased by PIL) than the eval
    transform's bicubic, then to float and normalised.

    On the scoring images the filter matters little: the learner's features differ from FlexiViT's by 1.6% of the
    between-example spread with ``bilinear`` or ``bicubic``, 2.1% with ``box`` (``tests/data/test_two_stage.py``); it
    is the larger part of stage 1's cost after the draft decode (``benchmarks/streaming_throughput.py``).

    Example:
        >>> t = ScoringTransform({'size': (224, 224), 'mean': (0.5,) * 3, 'std': (0.5,) * 3}, 112)
        >>> t(Image.new('RGB', (192, 128), (255, 0, 0))).shape
        torch.Size([3, 112, 112])
    """

    RESAMPLE = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
                'box': Image.Resampling.BOX}

    def __init__(self, preprocess: dict[str, Any], size: int, resample: str = 'bilinear'):
        if resample not in self.RESAMPLE:
            raise ValueError(f'resample must be one of {sorted(self.RESAMPLE)}, got {resample!r}')
        if preprocess.get('resize_mode', 'shortest') != 'shortest':
            raise ValueError(f"two-stage scoring supports resize_mode 'shortest' (open_clip's default), "
                             f"got {preprocess.get('resize_mode')!r}")
        self.size, self.resample = size, self.RESAMPLE[resample]
        self.mean = torch.tensor(preprocess['mean'], dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(preprocess['std'], dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        s = self.size
        width, height = image.size
        k = s / min(width, height)  # resize factor of the shortest side; then the centre s x s
        left, top = (max(s, round(width * k)) - s) // 2, (max(s, round(height * k)) - s) // 2
        image = image.resize((s, s), self.resample, box=(left / k, top / k, (left + s) / k, (top + s) / k))
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
        return x.sub_(self.mean).div_(self.std)


@dataclass(frozen=True)
class RandomResizedCropFlip:
    """Training augmentation of the selected examples: a random crop of area fraction ``U(scale)`` of the image and
    aspect ratio ``exp(U(log ratio))`` (resized to the training side by :class:`FullResDecoder`), mirrored with
    probability ``flip``.

    Every draw comes from the caller's ``torch.Generator`` (:meth:`boxes`), so a run resumed with the generator's
    saved state draws the same crops.

    Example:
        >>> aug = RandomResizedCropFlip()
        >>> box, flipped = aug.boxes([(64, 48)], torch.Generator().manual_seed(0))[0]
        >>> 0 <= box[0] < box[2] <= 64 and 0 <= box[1] < box[3] <= 48
        True
    """

    scale: tuple[float, float] = (0.9, 1.0)  # open_clip's training default
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5

    def __post_init__(self) -> None:
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f'augment scale must be (lo, hi) with 0 < lo <= hi <= 1, got {self.scale}')
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f'augment ratio must be (lo, hi) with 0 < lo <= hi, got {self.ratio}')
        if not 0 <= self.flip <= 1:
            raise ValueError(f'augment flip must be a probability in [0, 1], got {self.flip}')

    def boxes(self, sizes: Sequence[tuple[int, int]], generator: torch.Generator
              ) -> list[tuple[tuple[int, int, int, int], bool]]:
        """One ``((left, top, right, bottom), flipped)`` per ``(width, height)``: five uniform draws each (area,
        log aspect, x, y, flip; the box is clamped to the image)."""
        u = torch.rand(len(sizes), 5, generator=generator, dtype=torch.float64).tolist()
        out = []
        for (width, height), (ua, ur, ux, uy, uf) in zip(sizes, u):
            area = width * height * (self.scale[0] + ua * (self.scale[1] - self.scale[0]))
            log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
            aspect = math.exp(log_lo + ur * (log_hi - log_lo))
            w = min(width, max(1, round(math.sqrt(area * aspect))))
            h = min(height, max(1, round(math.sqrt(area / aspect))))
            left, top = int((width - w + 1) * ux), int((height - h + 1) * uy)  # uniform over valid offsets
            out.append(((left, top, left + w, top + h), uf < self.flip))
        return out


class FullResDecoder:
    """Stage 2: the selected examples' encoded images -> the training batch ``[b, 3, S, S]``.

    Args:
        preprocess: the image tower's open_clip ``preprocess_cfg`` (``CLIPModel.preprocess_cfg()``): size,
            mean/std, interpolation, resize mode.
        threads: decode threads (PIL releases the GIL in decode and resize).
        device: ``cpu`` (PIL, bit for bit the loader's one-stage images), ``cuda`` (``torchvision.io.decode_jpeg``
            on the GPU; resize in float on the GPU, so within resampling differences of PIL's), or ``auto``
            (``cuda`` when available).
        augment: :class:`RandomResizedCropFlip` for training augmentation, ``None`` for the eval transform.
        seed: seed of the augmentation generator (offset by ``rank``); its state is :meth:`state_dict`.
        rank: the global rank (distinct augmentations per rank).

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new('RGB', (96, 64), (10, 200, 30)).save(buf, 'JPEG')
        >>> cfg = {'size': (32, 32), 'mean': (0.5, 0.5, 0.5), 'std': (0.5, 0.5, 0.5)}
        >>> FullResDecoder(cfg, threads=1)([buf.getvalue()] * 2).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, preprocess: dict[str, Any], threads: int = 4, device: str = 'cpu',
                 augment: Optional[RandomResizedCropFlip] = None, seed: int = 0, rank: int = 0):
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f'two_stage.decode_threads must be an int >= 1, got {threads!r}')
        if device not in DECODE_DEVICES:
            raise ValueError(f'two_stage.decode_device must be one of {DECODE_DEVICES}, got {device!r}')
        self.preprocess = {'mode': 'RGB', 'interpolation': 'bicubic', 'resize_mode': 'shortest', 'fill_color': 0,
                           **dict(preprocess)}
        size = self.preprocess['size']
        self.image_size = int(size if isinstance(size, int) else size[0])
        if augment is not None and not isinstance(augment, RandomResizedCropFlip):
            raise ValueError(f'augment must be a RandomResizedCropFlip or None, got {augment!r}')
        self.transform = eval_transform(self.preprocess)
        self.threads, self.device, self.augment = threads, device, augment
        self.generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))
        self._pool: Optional[ThreadPoolExecutor] = None

    def __call__(self, encoded: Sequence[bytes]) -> torch.Tensor:
        """Decode and transform ``encoded`` (one ``bytes`` per example) into ``[len(encoded), 3, S, S]``."""
        if self._on_gpu():
            return self._tensor_decode(encoded, 'cuda')
        if self.augment is None:
            jobs = [(data, None) for data in encoded]
        else:  # draws in order, on this thread: the decode threads only consume them
            images = [Image.open(io.BytesIO(data)) for data in encoded]  # header only: sizes
            jobs = list(zip(encoded, self.augment.boxes([im.size for im in images], self.generator)))
        if self.threads == 1 or len(jobs) < 2:
            return torch.stack([self._one(job) for job in jobs])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix='jest-decode')
        return torch.stack(list(self._pool.map(self._one, jobs)))

    def _one(self, job: tuple[bytes, Any]) -> torch.Tensor:
        data, aug = job
        image = open_rgb(data)
        if aug is None:
            return self.transform(image)
        box, flipped = aug
        image = image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box)
        if flipped:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.transform(image)  # resize/crop are identities at S x S; then to tensor + normalise

    def _on_gpu(self) -> bool:
        return self.device == 'cuda' or (self.device == 'auto' and torch.cuda.is_available())

    def _tensor_decode(self, encoded: Sequence[bytes], device: str) -> torch.Tensor:
        """``torchvision.io.decode_jpeg`` on ``device`` (``cuda``: nvJPEG), then resize (shortest side, bicubic,
        antialiased), crop or augment, and normalise there (``tests/data/test_two_stage.py`` runs it on the CPU too)."""
        import torch.nn.functional as F  # noqa: PLC0415
        from torchvision.io import ImageReadMode, decode_jpeg  # noqa: PLC0415

        raw = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in encoded]
        images = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        sizes = [(int(im.shape[2]), int(im.shape[1])) for im in images]
        augs = self.augment.boxes(sizes, self.generator) if self.augment is not None else [None] * len(images)
        s, out = self.image_size, []
        for image, (width, height), aug in zip(images, sizes, augs):
            if aug is None:  # shortest side -> S, then the centre S x S
                scale = s / min(width, height)
                w, h = max(s, round(width * scale)), max(s, round(height * scale))
                left, top = (w - s) // 2, (h - s) // 2
                x = F.interpolate(image[None].float(), size=(h, w), mode='bicubic', antialias=True,
                                  align_corners=False)[..., top:top + s, left:left + s]
            else:
                (left, top, right, bottom), flipped = aug
                x = F.interpolate(image[None, :, top:bottom, left:right].float(), size=(s, s), mode='bicubic',
                                  antialias=True, align_corners=False)
                x = x.flip(-1) if flipped else x
            out.append(x)
        x = torch.cat(out).clamp_(0, 255).div_(255)
        mean = torch.tensor(self.preprocess['mean'], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.preprocess['std'], device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    # -- checkpointing -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {'rng': self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if 'rng' in state:
            self.generator.set_state(state['rng'])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_pool': None}  # a thread pool does not pickle or deep-copy

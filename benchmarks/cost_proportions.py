"""Per-example FLOP proportions of the compute study's models against ViT-B/16 (issue 26, item 2).

All numbers come from :mod:`composer_jest.models.flops` (the accounting JEST logs): a forward is counted by its
matmuls, training = 3x forward. Per trained example, with the reference's embeddings cached (no reference forward):

- ``text_image``: text-tower forward / image-tower forward (one caption, one image);
- ``scoring_training``: the learner's no-grad scoring forward of one example / its training cost (≈ 1/3 whatever
  the shape); ``flexi_scoring_training``: the same with the image scored at twice the patch size;
- ``multires_training``: a multi-resolution training step (half the images at twice the patch) / a plain one;
- ``step_f<f>``: one all-savings JEST step (``N = b/(1-f)`` scored at twice the patch, multi-resolution training,
  cached reference, selection) / one uniform step on ``b`` -- the ratio that decides FLOPs-to-match.

ViT-B/16 (open_clip ``ViT-B-16``: 224 px, 197 image tokens at width 768; text width 512) is costed at 18-token
captions (CC3M-like: ~10 words, plus start and end tokens); the tiny models at the Fashion-web pool's own
caption-length histogram, in length buckets as ``CLIPTowers`` runs them.

    python benchmarks/cost_proportions.py   # writes benchmarks/results/compute_study/proportions.{json,md}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))

from composer_jest.models.flops import step_flops, vit_forward_flops  # noqa: E402

B16_CAPTION_TOKENS = 18


def ratios(clip: Any, image_size: int, patch: int, text_tokens: Optional[int] = None,
           counts: Optional[Sequence[float]] = None, b: int = 64) -> dict[str, float]:
    """The proportions of the module docstring for one model (``counts``: caption-length histogram of ``b``)."""
    kw = dict(image_size=image_size, reference_cached=True)
    if counts is not None:
        scale = b / sum(counts)
        kw['text_length_counts'] = [c * scale for c in counts]
    else:
        kw['text_tokens'] = text_tokens
    plain = step_flops(clip, superbatch=b, subbatch=b, uses_reference=False, **kw)
    flexi = step_flops(clip, superbatch=b, subbatch=b, learner_patch_size=2 * patch, uses_reference=False, **kw)
    multires = step_flops(clip, superbatch=b, subbatch=b, low_res_fraction=0.5, low_res_patch_size=2 * patch,
                          uses_learner=False, uses_reference=False, **kw)
    image = vit_forward_flops(clip.visual, image_size)
    text = plain['learner_scoring'] / b - image
    out = {'image_forward': image, 'text_forward': text, 'text_image': text / image,
           'scoring_training': plain['learner_scoring'] / plain['uniform_train'],
           'flexi_scoring_training': flexi['learner_scoring'] / flexi['uniform_train'],
           'multires_training': multires['train'] / multires['uniform_train']}
    for f in (0.5, 0.8, 0.9):
        n = int(round(b / (1 - f)))
        kw_n = dict(kw)
        if counts is not None:
            kw_n['text_length_counts'] = [c * n / sum(counts) for c in counts]
        step = step_flops(clip, superbatch=n, subbatch=b, learner_patch_size=2 * patch, low_res_fraction=0.5,
                          low_res_patch_size=2 * patch, **kw_n)
        out[f'step_f{f}'] = step['ratio']
    return out


def compute(pool_text: Optional[torch.Tensor] = None) -> dict[str, Any]:
    """Proportions of ViT-B/16, the proportional tiny model and today's benchmark model."""
    import compute_study as cs
    import learning_efficiency as le
    import open_clip

    with torch.device('meta'):  # shapes only: the FLOP counter reads module attributes, never weights
        b16 = open_clip.CLIP(**open_clip.get_model_config('ViT-B-16'))
    s = cs.study_settings()
    if pool_text is None:  # captions of a fresh small dev pool (the histogram, not the exact pool)
        data = le.build_data(le.Settings(pool_size=2000, curated_size=100, eval_size=100), Path('/tmp/c2_props'))
        pool_text = data['pool']['text']
    counts = le.text_counts(pool_text)
    out = {'ViT-B/16 @224, 18-token captions': ratios(b16, 224, 16, text_tokens=B16_CAPTION_TOKENS)}
    for name in ('proportional', 'benchmark'):
        clip = open_clip.CLIP(**{**cs.model_config(name, s), 'nonscalar_logit_scale': True})
        out[f'{name} (Fashion-web captions)'] = ratios(clip, 32, cs.native_patch(name, s), counts=counts)
    return out


def markdown(res: dict[str, Any]) -> str:
    ref = res['ViT-B/16 @224, 18-token captions']
    keys = [('text_image', 'text fwd / image fwd'), ('scoring_training', 'scoring / training (native)'),
            ('flexi_scoring_training', 'scoring at 2x patch / training'),
            ('multires_training', 'multi-res training / training'),
            ('step_f0.5', 'all-savings step f=0.5 / uniform step'), ('step_f0.8', 'all-savings step f=0.8 / uniform'),
            ('step_f0.9', 'all-savings step f=0.9 / uniform')]
    lines = ['| per example | ' + ' | '.join(res) + ' |', '|---|' + '---:|' * len(res)]
    lines.append('| image fwd GFLOPs | ' + ' | '.join(f"{r['image_forward'] / 1e9:.4g}" for r in res.values()) + ' |')
    lines.append('| text fwd GFLOPs | ' + ' | '.join(f"{r['text_forward'] / 1e9:.4g}" for r in res.values()) + ' |')
    for key, label in keys:
        cells = []
        for r in res.values():
            rel = '' if r is ref else f' ({r[key] / ref[key] - 1:+.0%})'
            cells.append(f'{r[key]:.3f}{rel}')
        lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


if __name__ == '__main__':
    torch.set_num_threads(1)
    result = compute()
    out = ROOT / 'benchmarks' / 'results' / 'compute_study'
    out.mkdir(parents=True, exist_ok=True)
    (out / 'proportions.json').write_text(json.dumps(result, indent=1))
    (out / 'proportions.md').write_text(markdown(result) + '\n')
    print(markdown(result))

"""``composer-jest embed-reference``: precompute the frozen reference's embeddings into the shards.

The reference never changes during training, so its image and text embeddings can be computed once
and stored as columns (float16, L2-normalised) beside every sample, with the reference's logit scale
and bias per sample. JEST then reads them from the batch (``CACHED_REFERENCE_KEYS``) and runs no
reference forward at all. A ``reference.json`` beside the shards records the model identity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from streaming import MDSWriter, StreamingDataset

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.data.progress import show_progress
from composer_jest.jest.reference import load_reference
from composer_jest.models.clip import eval_image_transform, tokenizer_for

__all__ = ['embed_reference', 'main']


def _weights_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def embed_reference(
    model: Any,
    checkpoint: Optional[str],
    out: str,
    *,
    remote: Optional[str] = None,
    local: Optional[str] = None,
    batch_size: int = 256,
    device: str = 'cpu',
    compression: Optional[str] = 'zstd',
    hashes: Sequence[str] = ('xxh64',),
    progress: Optional[bool] = None,
    pretrained: Optional[str] = None,
) -> dict[str, Any]:
    """Write a copy of an MDS dataset with the reference's embeddings added as columns.

    Args:
        model: the reference architecture (open_clip name or config dict).
        checkpoint: its weights (Composer checkpoint or open_clip state_dict); ``None``: as initialised (or
            ``pretrained``).
        out: output directory or ``s3://`` prefix.
        remote, local: the input dataset (as for streaming).
        batch_size: reference forward batch.
        progress: a progress bar on stderr; ``None``: only when stderr is a terminal (none in a log file).
        device: where the reference runs.
        pretrained: instead of ``checkpoint``, open_clip's pretrained weights of ``model``: a tag (downloaded when
            online) or a local weights file (:mod:`composer_jest.models.pretrained`).

    Returns:
        The metadata written to ``reference.json``.
    """
    towers = load_reference({'model': model, 'checkpoint': checkpoint, 'pretrained': pretrained}).to(device)
    dataset, columns = _open_input(towers, tokenizer_for(model, towers.clip), remote, local)
    scale, bias = _scale_and_bias(towers.clip)
    writer, written, dim = None, 0, None
    for raw, image, text in _embedded_batches(dataset, towers, batch_size, device, progress):
        if writer is None:
            dim = image.shape[1]
            encodings = (f'ndarray:float16:{dim}', f'ndarray:float16:{dim}', 'float32', 'float32')
            writer = MDSWriter(out=out, columns={**columns, **dict(zip(CACHED_REFERENCE_KEYS, encodings))},
                               compression=compression, hashes=list(hashes))
        for k, sample in enumerate(raw):
            values = (image[k], text[k], np.float32(scale), np.float32(bias))
            writer.write({**{c: sample[c] for c in columns}, **dict(zip(CACHED_REFERENCE_KEYS, values))})
            written += 1
    if writer is None:
        raise ValueError(f'the input dataset {remote or local} has no samples')
    writer.finish()
    if written != dataset.num_samples:
        raise RuntimeError(f'wrote {written} of {dataset.num_samples} samples')
    meta = {
        'model': model, 'checkpoint': checkpoint, 'pretrained': pretrained,
        'weights_sha256_16': _weights_digest(towers),
        'logit_scale': scale, 'logit_bias': bias, 'embedding_dim': dim, 'num_samples': written,
        'source': remote or local, 'columns': list(CACHED_REFERENCE_KEYS),
    }
    _write_json(out, 'reference.json', meta)
    return meta


def _open_input(towers: Any, tokenizer: Any, remote: Optional[str], local: Optional[str]) -> tuple[Any, dict]:
    """The input MDS dataset (decoded as the reference expects) and its columns ``{name: encoding}``; refuses an
    input that already carries reference columns."""
    from composer_jest.data.streaming import ImageTextStreamingDataset

    cache = local or tempfile.mkdtemp(prefix='embed-reference-')
    dataset = ImageTextStreamingDataset(remote=remote, local=cache, tokenizer=tokenizer,
                                        transform=eval_image_transform(towers.clip), shuffle=False, extra_columns=[])
    shard = dataset.shards[0]
    columns = dict(zip(shard.column_names, shard.column_encodings))
    clash = [k for k in CACHED_REFERENCE_KEYS if k in columns]
    if clash:
        raise ValueError(f'the input already has reference columns {clash}; embed the original dataset instead')
    return dataset, columns


def _scale_and_bias(clip: torch.nn.Module) -> tuple[float, float]:
    """The reference's logit scale ``t = exp(logit_scale)`` and bias ``b`` (0 without one), as floats."""
    with torch.no_grad():
        scale = clip.logit_scale.exp().float().reshape(-1)[0].item()
        bias = getattr(clip, 'logit_bias', None)
        return scale, (bias.float().reshape(-1)[0].item() if bias is not None else 0.0)


def _embedded_batches(dataset: Any, towers: Any, batch_size: int, device: str, progress: Optional[bool]):
    """``(raw samples, image features, text features)`` per batch of ``batch_size``, in dataset order; the
    features L2-normalised float16 numpy arrays (what the cached columns hold)."""
    n = dataset.num_samples
    starts = range(0, n, batch_size)
    if show_progress(progress):
        from tqdm import tqdm

        starts = tqdm(starts, desc='embed-reference', unit='batch')
    for start in starts:
        raw = [StreamingDataset.get_item(dataset, i) for i in range(start, min(start + batch_size, n))]
        decoded = [dataset.decode_sample(dict(r)) for r in raw]
        image = torch.stack([d['image'] for d in decoded]).to(device)
        text = torch.stack([d['text'] for d in decoded]).to(device)
        with torch.no_grad():
            feats = towers(image, text)
        yield raw, feats['image_features'].half().cpu().numpy(), feats['text_features'].half().cpu().numpy()


def _write_json(out: str, name: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=str)
    if out.startswith('s3://'):
        from composer_jest.data.remote import s3_client, split_s3_url

        bucket, prefix = split_s3_url(out)
        s3_client().put_object(Bucket=bucket, Key=f'{prefix.rstrip("/")}/{name}', Body=text.encode())
    else:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, name), 'w', encoding='utf-8') as f:
            f.write(text)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='composer-jest embed-reference', description=__doc__.split('\n')[0])
    parser.add_argument('--model', required=True, help='reference architecture: open_clip model name')
    parser.add_argument('--checkpoint', default=None, help='reference weights (Composer checkpoint or state_dict)')
    parser.add_argument('--pretrained', default=None,
                        help="instead of --checkpoint: open_clip's pretrained weights of --model, a tag (downloaded "
                             'when online) or a local weights file')
    parser.add_argument('--remote', default=None, help='input dataset remote (s3://...)')
    parser.add_argument('--local', default=None, help='input dataset local dir (or cache dir for --remote)')
    parser.add_argument('--out', required=True, help='output directory or s3:// prefix')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                        help='progress bar on stderr (default: only when stderr is a terminal)')
    args = parser.parse_args(argv)
    if args.remote is None and args.local is None:
        parser.error('give --remote and/or --local for the input dataset')
    meta = embed_reference(args.model, args.checkpoint, args.out, remote=args.remote, local=args.local,
                           batch_size=args.batch_size, device=args.device, progress=args.progress,
                           pretrained=args.pretrained)
    print(json.dumps(meta, indent=2, default=str))
    return 0

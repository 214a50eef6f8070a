"""``composer-jest filter``: offline reference filtering of a converted pool, the baseline to run before JEST.

Scores every example of an MDS pool once with a frozen reference (:mod:`composer_jest.core.filtering`: the CLIP
score, the cosine similarity of the pair, as DataComp and DFN filter; or ``--score sigmoid``), keeps the top
``--keep`` fraction (ties: the lower pool index first) or every example scoring at least ``--threshold``, and writes
the kept rows -- every column as it was, plus ``filter_score`` -- as a new MDS dataset through the same atomic
writer as ``composer-jest convert`` (local or ``s3://``). Train on it uniformly, or run JEST on it.

The reference is one of

- ``--cached``: the ``ref_*`` columns that ``composer-jest embed-reference`` wrote (no model runs at all);
- ``--model NAME --checkpoint ref.pt``: a reference trained with this package (or an open_clip state_dict);
- ``--model NAME --pretrained TAG|FILE``: open_clip's pretrained weights.

A model's features are scored in float32; the cached columns hold float16 features, so the two references agree to
~1e-3 in score and may order near-ties differently.

The pool is read twice: the first pass scores every example (a top fraction needs all scores), the second copies
the kept rows in pool order. The report -- pool size, kept count and fraction, the lowest kept score, score
quantiles and histogram, and for each ``--track-keys`` column its sum and mean over the pool and over the kept
rows -- is written as ``filter_report.json`` and ``filter_scores.png`` into the output dataset (or ``--report
DIR``), and under ``filter`` in the output's ``convert_summary.json``.

Example::

    composer-jest embed-reference --model ViT-B-32 --pretrained openai --local pool --out pool-ref
    composer-jest filter --data pool-ref --cached --keep 0.3 --track-keys clean --out pool-top30
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import numpy as np
import torch
from streaming import StreamingDataset

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.filtering import SCORE_COLUMN, SCORES, keep_count, keep_indices, reference_scores
from composer_jest.data.convert import ConversionError, MDSOptions, write_rows
from composer_jest.data.progress import show_progress
from composer_jest.data.remote import (
    RemoteAccessError,
    check_s3_prefix,
    is_remote,
    remote_errors,
    s3_client,
    split_s3_url,
)
from composer_jest.data.streaming import ImageTextStreamingDataset
from composer_jest.jest.reference import load_reference
from composer_jest.models.clip import eval_image_transform, tokenizer_for

__all__ = ['REPORT_FILE', 'HISTOGRAM_FILE', 'filter_pool', 'main']

REPORT_FILE, HISTOGRAM_FILE = 'filter_report.json', 'filter_scores.png'
_HISTOGRAM_BINS = 40
_SCALAR_ENCODINGS = ('int', 'float64', 'float32', 'float16', 'int8', 'int16', 'int32', 'int64', 'uint8', 'uint16',
                     'uint32', 'uint64', 'str_int', 'str_float')


def filter_pool(
    data: str,
    out: str,
    *,
    keep: Optional[float] = None,
    threshold: Optional[float] = None,
    cached: bool = False,
    model: Optional[str] = None,
    checkpoint: Optional[str] = None,
    pretrained: Optional[str] = None,
    score: str = 'clip',
    track_keys: Sequence[str] = (),
    report_dir: Optional[str] = None,
    cache: Optional[str] = None,
    batch_size: int = 256,
    device: str = 'cpu',
    options: Optional[MDSOptions] = None,
    progress: Optional[bool] = None,
) -> dict[str, Any]:
    """Score the MDS pool at ``data`` with a reference, keep the best, write them to ``out``; return the report.

    Args:
        data: the pool, an MDS dataset directory or ``s3://`` prefix (``composer-jest convert``'s output).
        out: the filtered dataset's directory or ``s3://`` prefix; written atomically (``options.overwrite`` to
            replace a dataset there).
        keep, threshold: exactly one: the top fraction in ``(0, 1]``, or the lowest score kept
            (:func:`~composer_jest.core.filtering.keep_indices`).
        cached: score from the ``ref_*`` columns of ``embed-reference`` instead of running a model.
        model, checkpoint, pretrained: otherwise the reference: an open_clip model name and exactly one of its
            weights (a checkpoint file, or open_clip pretrained tag / weights file).
        score: ``'clip'`` (cosine) or ``'sigmoid'`` (:data:`~composer_jest.core.filtering.SCORES`).
        track_keys: numeric columns to count over the pool and the kept rows (e.g. ``('clean',)``).
        report_dir: where ``filter_report.json`` / ``filter_scores.png`` go (default: into ``out``).
        cache: local cache directory of an ``s3://`` pool (default: a temporary one, removed at the end).
        batch_size: examples scored at a time; device: where the reference runs.
        options: output shards (:class:`~composer_jest.data.convert.MDSOptions`: compression, overwrite...).
        progress: progress bars on stderr; ``None``: only when stderr is a terminal.
    """
    options = options or MDSOptions(progress=show_progress(progress))
    _check_arguments(keep, threshold, score, cached, model, checkpoint, pretrained, batch_size)
    _check_locations(data, out, options.overwrite)
    _check_columns(_pool_columns(data), data, cached, track_keys)
    towers = None if cached else load_reference(
        {'model': model, 'checkpoint': checkpoint, 'pretrained': pretrained}).to(device)
    own_cache = tempfile.mkdtemp(prefix='composer-jest-filter-') if is_remote(data) and cache is None else None
    try:
        dataset = _open_pool(data, cache or own_cache, towers, model)
        start = time.perf_counter()
        scores, tracked, logits = _score_pool(dataset, towers, score, track_keys, batch_size, device, progress)
        kept = keep_indices(scores, keep=keep, threshold=threshold)
        if kept.numel() == 0:
            raise ValueError(f'threshold={threshold} keeps no example of {data}: its scores range from '
                             f'{scores.min().item():.4g} to {scores.max().item():.4g} (score={score!r})')
        reference = {'cached': cached, 'model': model, 'checkpoint': checkpoint, 'pretrained': pretrained, **logits}
        report = _report(scores, kept, tracked, data=data, out=out, reference=reference, score=score, keep=keep,
                         threshold=threshold, score_seconds=time.perf_counter() - start)
        columns = {**dataset.column_encodings, SCORE_COLUMN: dataset.column_encodings.get(SCORE_COLUMN, 'float64')}
        summary = write_rows(_kept_rows(dataset, kept, scores), out, columns, options=options, total=kept.numel(),
                             summary_extra={'filter': report}, label='filter')
    finally:  # the downloaded shards of an s3:// pool, unless --cache keeps them
        if own_cache is not None:
            shutil.rmtree(own_cache, ignore_errors=True)
    report['written'] = summary.written
    _write_report(report, scores, kept, report_dir or out)
    return report


# -- checks before any heavy work ----------------------------------------------------------------------------
def _check_arguments(keep: Optional[float], threshold: Optional[float], score: str, cached: bool,
                     model: Optional[str], checkpoint: Optional[str], pretrained: Optional[str],
                     batch_size: int) -> None:
    if (keep is None) == (threshold is None):
        raise ValueError('give exactly one of keep (--keep, a fraction in (0, 1]) and threshold (--threshold, the '
                         f'lowest score kept), got keep={keep!r} and threshold={threshold!r}')
    if keep is not None:
        keep_count(1, keep)  # raises naming keep and (0, 1]
    elif isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ValueError(f'threshold (--threshold) must be a finite number, got {threshold!r}')
    if score not in SCORES:
        raise ValueError(f'score (--score) must be one of {SCORES}, got {score!r}')
    if cached and (model or checkpoint or pretrained):
        raise ValueError('give either cached (--cached: the ref_* columns embed-reference wrote) or a reference '
                         'model (--model with --checkpoint or --pretrained), not both')
    if not cached and (not model or (checkpoint is None) == (pretrained is None)):
        raise ValueError('give the reference: --cached (the ref_* columns `composer-jest embed-reference` wrote), '
                         'or --model NAME with exactly one of --checkpoint FILE and --pretrained TAG|FILE; got '
                         f'model={model!r}, checkpoint={checkpoint!r}, pretrained={pretrained!r}')
    if checkpoint is not None and not is_remote(checkpoint) and not os.path.isfile(checkpoint):
        raise FileNotFoundError(f'--checkpoint {checkpoint}: no such file')
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f'batch_size (--batch-size) must be a positive int, got {batch_size!r}')


def _check_locations(data: str, out: str, overwrite: bool) -> None:
    """The pool exists (with its ``index.json``); ``out`` is not the pool and is free, or ``overwrite``."""
    if data.startswith('s3://'):
        if not check_s3_prefix(data, for_write=False):
            raise FileNotFoundError(f'{data} holds no MDS dataset (no index.json); write one with '
                                    '`composer-jest convert`')
    elif not os.path.isdir(data):
        raise FileNotFoundError(f'the pool {data} does not exist (an MDS dataset directory or s3:// prefix, '
                                'written by `composer-jest convert`)')
    elif not os.path.isfile(os.path.join(data, 'index.json')):
        raise FileNotFoundError(f'{data} has no index.json: not an MDS dataset; write one with '
                                '`composer-jest convert`')
    same = out.rstrip('/') == data.rstrip('/') if is_remote(out) or is_remote(data) else \
        os.path.abspath(out) == os.path.abspath(data)
    if same:
        raise ValueError(f'--out {out} is the pool itself; write the filtered dataset elsewhere')
    hint = 'pass overwrite=True / --overwrite to replace it'
    if out.startswith('s3://'):
        if check_s3_prefix(out, for_write=True) and not overwrite:
            raise FileExistsError(f'{out} already holds an MDS dataset (index.json); {hint}')
    elif not is_remote(out) and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) \
            and not overwrite:
        raise FileExistsError(f'{out} exists and is not empty; {hint}')


def _pool_columns(data: str) -> dict[str, str]:
    """``{column: MDS encoding}`` of the pool, from its ``index.json`` (read before any shard or model)."""
    if data.startswith('s3://'):
        bucket, prefix = split_s3_url(data)
        with remote_errors(data, 'read'):
            body = s3_client().get_object(Bucket=bucket, Key=f'{prefix.rstrip("/")}/index.json'.lstrip('/'))['Body']
            index = json.loads(body.read())
    else:
        with open(os.path.join(data, 'index.json'), encoding='utf-8') as f:
            index = json.load(f)
    shard = index['shards'][0] if index.get('shards') else None
    if shard is None:
        raise ValueError(f'{data}: its index.json lists no shards (an empty dataset)')
    return dict(zip(shard['column_names'], shard['column_encodings']))


def _check_columns(encodings: dict[str, str], data: str, cached: bool, track_keys: Sequence[str]) -> None:
    missing = [k for k in CACHED_REFERENCE_KEYS if k not in encodings]
    if cached and missing:
        raise ValueError(f'--cached: {data} has no cached reference columns {missing} (columns: {sorted(encodings)}); '
                         '`composer-jest embed-reference` writes them, or score with --model and --checkpoint / '
                         '--pretrained instead')
    for key in track_keys:
        if encodings.get(key) not in _SCALAR_ENCODINGS:
            raise ValueError(f'--track-keys {key!r}: not a numeric column of {data} (numeric columns: '
                             f'{sorted(k for k, e in encodings.items() if e in _SCALAR_ENCODINGS)})')


# -- the two passes ------------------------------------------------------------------------------------------
def _no_tokenizer(texts: Any) -> Any:
    raise RuntimeError('--cached scoring decodes no caption')


def _open_pool(data: str, cache: str, towers: Optional[torch.nn.Module],
               model: Optional[str]) -> ImageTextStreamingDataset:
    """The pool, read in order; it decodes samples with the reference's preprocessing when a model scores."""
    remote, local = (data, cache) if is_remote(data) else (None, data)
    if towers is None:
        return ImageTextStreamingDataset(remote=remote, local=local, tokenizer=_no_tokenizer,
                                         transform=lambda image: image, shuffle=False, extra_columns=[])
    return ImageTextStreamingDataset(remote=remote, local=local, tokenizer=tokenizer_for(model, towers.clip),
                                     transform=eval_image_transform(towers.clip), shuffle=False, extra_columns=[])


def _score_pool(dataset: ImageTextStreamingDataset, towers: Optional[torch.nn.Module], score: str,
                track_keys: Sequence[str], batch_size: int, device: str,
                progress: Optional[bool]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, float]]:
    """Pass 1: every example's score ``[N]``, the tracked columns ``{key: [N]}`` and the reference's logits."""
    from tqdm import tqdm

    n = dataset.num_samples
    scores = torch.empty(n, dtype=torch.float32)
    tracked = {key: torch.empty(n, dtype=torch.float64) for key in track_keys}
    logits: dict[str, float] = {}
    with tqdm(total=n, desc='filter: scoring', unit=' samples', disable=not show_progress(progress),
              file=sys.stderr) as bar:
        for start in range(0, n, batch_size):
            raw = [StreamingDataset.get_item(dataset, i) for i in range(start, min(start + batch_size, n))]
            features = _cached_features(raw) if towers is None else _model_features(dataset, towers, raw, device)
            logits = logits or {'logit_scale': features['logit_scale'], 'logit_bias': features['logit_bias']}
            scores[start:start + len(raw)] = reference_scores(**features, score=score)
            for key in track_keys:
                tracked[key][start:start + len(raw)] = torch.tensor([float(r[key]) for r in raw], dtype=torch.float64)
            bar.update(len(raw))
    return scores, tracked, logits


def _cached_features(raw: list[dict]) -> dict[str, Any]:
    """The reference features and logits of a batch of rows from their ``ref_*`` columns."""
    image, text, scale, bias = CACHED_REFERENCE_KEYS
    scales, biases = {float(r[scale]) for r in raw}, {float(r[bias]) for r in raw}
    if len(scales) > 1 or len(biases) > 1:
        raise ValueError(f'the rows hold different {scale}/{bias} values ({sorted(scales)}, {sorted(biases)}): '
                         'the pool mixes references; embed it once with `composer-jest embed-reference`')
    return {'image_features': torch.from_numpy(np.stack([r[image] for r in raw])),
            'text_features': torch.from_numpy(np.stack([r[text] for r in raw])),
            'logit_scale': scales.pop(), 'logit_bias': biases.pop()}


def _model_features(dataset: ImageTextStreamingDataset, towers: torch.nn.Module, raw: list[dict],
                    device: str) -> dict[str, Any]:
    """The reference forward on a batch of rows, decoded as ``embed-reference`` decodes them."""
    decoded = [dataset.decode_sample(dict(r)) for r in raw]
    image = torch.stack([d['image'] for d in decoded]).to(device)
    text = torch.stack([d['text'] for d in decoded]).to(device)
    with torch.no_grad():
        features = towers(image, text)
    bias = features.get('logit_bias')
    return {'image_features': features['image_features'].float().cpu(),
            'text_features': features['text_features'].float().cpu(),
            'logit_scale': float(features['logit_scale'].float().reshape(-1)[0]),
            'logit_bias': float(bias.float().reshape(-1)[0]) if bias is not None else 0.0}


def _kept_rows(dataset: ImageTextStreamingDataset, kept: torch.Tensor, scores: torch.Tensor) -> Iterator[dict]:
    """Pass 2: the kept rows in pool order, every column as read, plus the score.

    A ``'jpeg'`` column is copied byte for byte: its stored file is opened from disk, which streaming's JPEG
    encoding copies as it is (re-encoding the decoded image would lose quality at every filter).
    """
    jpeg = [c for c, encoding in dataset.column_encodings.items() if encoding == 'jpeg']
    with tempfile.TemporaryDirectory(prefix='composer-jest-filter-') as scratch:
        for i in kept.tolist():
            row = dict(StreamingDataset.get_item(dataset, i))
            if jpeg:
                row.update(_stored_jpegs(dataset, i, jpeg, scratch))
            row[SCORE_COLUMN] = float(scores[i])
            yield row


def _stored_jpegs(dataset: ImageTextStreamingDataset, sample_id: int, names: list[str],
                  scratch: str) -> dict[str, Any]:
    """The ``'jpeg'`` columns ``names`` of a sample as their stored files, opened from ``scratch``."""
    from PIL import Image

    shard_id, index = dataset.spanner[sample_id]
    shard = dataset.shards[shard_id]
    data = shard.get_sample_data(index)  # MDS: the sizes of the variable-size columns, then every column
    sizes, offset = [], 0
    for size in shard.column_sizes:
        if not size:
            size, offset = int(np.frombuffer(data[offset:offset + 4], np.uint32)[0]), offset + 4
        sizes.append(size)
    out = {}
    for name, size in zip(shard.column_names, sizes):
        if name in names:
            path = os.path.join(scratch, f'{name}.jpg')
            with open(path, 'wb') as f:
                f.write(data[offset:offset + size])
            out[name] = Image.open(path)
        offset += size
    return out


# -- the report ------------------------------------------------------------------------------------------------
def _report(scores: torch.Tensor, kept: torch.Tensor, tracked: dict[str, torch.Tensor], *, data: str, out: str,
            reference: dict, score: str, keep: Optional[float], threshold: Optional[float],
            score_seconds: float) -> dict[str, Any]:
    values = scores.double().numpy()
    counts, edges = np.histogram(values, bins=_HISTOGRAM_BINS)
    kept_counts, _ = np.histogram(values[kept.numpy()], bins=edges)
    quantiles = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    mask[kept] = True
    track = {key: {'pool_sum': float(v.sum()), 'kept_sum': float(v[mask].sum()), 'pool_mean': float(v.mean()),
                   'kept_mean': float(v[mask].mean())} for key, v in tracked.items()}
    return {
        'data': data, 'out': out, 'reference': reference, 'score': score, 'keep': keep, 'threshold': threshold,
        'pool': int(scores.numel()), 'kept': int(kept.numel()), 'kept_fraction': kept.numel() / scores.numel(),
        'lowest_kept_score': float(scores[kept].min()),
        'score_quantiles': {str(q): float(np.quantile(values, q)) for q in quantiles},
        'histogram': {'edges': edges.tolist(), 'pool': counts.tolist(), 'kept': kept_counts.tolist()},
        'track_keys': track, 'score_seconds': round(score_seconds, 3),
    }


def _histogram_png(report: dict) -> bytes:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    hist = report['histogram']
    edges = np.asarray(hist['edges'])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.stairs(hist['pool'], edges, fill=True, alpha=0.35, label=f'pool ({report["pool"]})')
    ax.stairs(hist['kept'], edges, fill=True, alpha=0.7, label=f'kept ({report["kept"]})')
    ax.axvline(report['lowest_kept_score'], color='k', lw=1, ls='--', label='lowest kept score')
    ax.set_xlabel(f'reference score ({report["score"]})')
    ax.set_ylabel('examples')
    ax.set_title(f'composer-jest filter: kept {report["kept_fraction"]:.1%}')
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png', dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _write_report(report: dict, scores: torch.Tensor, kept: torch.Tensor, target: str) -> None:
    """``filter_report.json`` and ``filter_scores.png`` into ``target`` (a directory or ``s3://`` prefix)."""
    files = {REPORT_FILE: json.dumps(report, indent=1, default=str).encode(), HISTOGRAM_FILE: _histogram_png(report)}
    if target.startswith('s3://'):
        bucket, prefix = split_s3_url(target)
        client = s3_client()
        for name, body in files.items():
            client.put_object(Bucket=bucket, Key=f'{prefix.rstrip("/")}/{name}'.lstrip('/'), Body=body)
        return
    os.makedirs(target, exist_ok=True)
    for name, body in files.items():
        with open(os.path.join(target, name), 'wb') as f:
            f.write(body)


# -- command line ------------------------------------------------------------------------------------------------
def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float('nan')
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f'must be a fraction in (0, 1] (e.g. 0.3 keeps the top 30%), got {text!r}')
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """An option's help ends with its default when it has one, with ``(required)`` when it is required."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required and action.option_strings:
            return f'{action.help} (required)'
        if action.default in (None, False, '') or action.default is argparse.SUPPRESS:
            return action.help or ''
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='composer-jest filter', formatter_class=_HelpFormatter,
        description='Score a converted pool with a reference (CLIP score), keep the top fraction or everything at '
                    'or above a threshold, and write the kept rows (+ filter_score) as a new MDS dataset.')
    parser.add_argument('--data', required=True, help='the pool: MDS dataset directory or s3://bucket/prefix')
    parser.add_argument('--out', required=True, help='the filtered dataset: directory or s3://bucket/prefix')
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument('--keep', type=_fraction, default=None, help='keep this top fraction of the pool, in (0, 1]')
    rule.add_argument('--threshold', type=float, default=None, help='keep every example scoring at least this')
    parser.add_argument('--cached', action='store_true',
                        help='score from the ref_* columns `composer-jest embed-reference` wrote (no model run)')
    parser.add_argument('--model', default=None, help='reference architecture: open_clip model name')
    parser.add_argument('--checkpoint', default=None, help='reference weights (Composer checkpoint or state_dict)')
    parser.add_argument('--pretrained', default=None,
                        help="instead of --checkpoint: open_clip's pretrained weights of --model (tag or file)")
    parser.add_argument('--score', default='clip', choices=SCORES,
                        help="'clip': cosine of the pair; 'sigmoid': log sigmoid(t cos + b) with the reference's "
                             'logit scale t and bias b')
    parser.add_argument('--track-keys', default='', metavar='KEY,...',
                        help='numeric columns to count over the pool and the kept rows (e.g. clean)')
    parser.add_argument('--report', default=None, metavar='DIR',
                        help='where filter_report.json and filter_scores.png go (default: into --out)')
    parser.add_argument('--cache', default=None,
                        help='local cache directory of an s3:// pool (default: a temporary one, removed at the end)')
    parser.add_argument('--batch-size', type=int, default=256, help='examples scored at a time')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='where the reference runs')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing dataset at --out')
    parser.add_argument('--compression', default='zstd', help="shard compression ('none' to disable)")
    parser.add_argument('--size-limit', default='64mb', help='shard size limit before compression')
    parser.add_argument('--progress', action=argparse.BooleanOptionalAction, default=None,
                        help='progress bars on stderr (default: only when stderr is a terminal)')
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    """``composer-jest filter --data POOL --out OUT (--keep F | --threshold T) (--cached | --model ...)``."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.cached and (args.model or args.checkpoint or args.pretrained):
        parser.error('--cached scores from the ref_* columns: give it without --model/--checkpoint/--pretrained')
    if not args.cached and (not args.model or (args.checkpoint is None) == (args.pretrained is None)):
        parser.error('give the reference: --cached (the ref_* columns `composer-jest embed-reference` wrote), or '
                     '--model NAME with exactly one of --checkpoint FILE and --pretrained TAG|FILE')
    options = MDSOptions(compression=None if args.compression.lower() in ('', 'none') else args.compression,
                         size_limit=args.size_limit, overwrite=args.overwrite, progress=show_progress(args.progress))
    try:
        report = filter_pool(args.data, args.out, keep=args.keep, threshold=args.threshold, cached=args.cached,
                             model=args.model, checkpoint=args.checkpoint, pretrained=args.pretrained,
                             score=args.score, track_keys=[k for k in args.track_keys.split(',') if k],
                             report_dir=args.report, cache=args.cache, batch_size=args.batch_size,
                             device=args.device, options=options, progress=args.progress)
    except (ConversionError, RemoteAccessError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'composer-jest filter: error: {e}', file=sys.stderr)
        return 1
    tracked = ''.join(f'; {k}: {v["kept_sum"]:g} of {v["pool_sum"]:g}' for k, v in report['track_keys'].items())
    print(f'kept {report["kept"]} of {report["pool"]} ({report["kept_fraction"]:.1%}, scores >= '
          f'{report["lowest_kept_score"]:.4g}){tracked} -> {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

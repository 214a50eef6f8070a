"""``composer-jest convert {folder,webdataset,parquet,shapes,fashion-mnist} --out OUT ...``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Optional

from composer_jest.data.convert.demo import convert_fashion_mnist, convert_shapes
from composer_jest.data.convert.folder import convert_folder
from composer_jest.data.convert.images import IMAGE_ENCODINGS
from composer_jest.data.convert.parquet import PARQUET_CAPTION_COLUMNS, PARQUET_IMAGE_COLUMNS, convert_parquet
from composer_jest.data.convert.webdataset import convert_webdataset
from composer_jest.data.convert.writer import DEFAULT_HASHES, CaptionCheck, ConversionError, ConvertSummary, MDSOptions
from composer_jest.data.remote import RemoteAccessError

__all__ = ['main']


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default (``(required)`` for required ones)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required and action.option_strings:
            return f'{action.help} (required)'
        return super()._get_help_string(action)


_ENCODING_HELP = ("how images are stored: 'source' keeps JPEG/PNG files byte for byte and stores other formats as "
                  "lossless PNG; 'jpeg' re-encodes non-JPEG sources (lossy); 'png' decodes and stores PNG; 'bytes' "
                  'keeps every source file as it is')
_KEEP_HELP = ('comma-separated numeric columns to keep as columns of their own, NAME (float) or NAME:int, e.g. '
              "'clean:int,score': they reach the training batch as tensors (JEST track_keys); a non-numeric value "
              'is a bad row. Other fields go to the json meta column, which never reaches the batch')


def _parser() -> argparse.ArgumentParser:
    common, source = _common_options(), _source_options()
    parser = argparse.ArgumentParser(prog='composer-jest convert', description='Convert image-caption data to MDS.',
                                     formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest='source', required=True)
    add = lambda name, parents, help: sub.add_parser(  # noqa: E731
        name, parents=parents, help=help, description=help, formatter_class=_HelpFormatter)
    _folder_options(add('folder', [common, source], 'image folder + CSV/JSONL captions'))
    p = add('webdataset', [common, source], 'webdataset tar shards (local or s3://); --keep-columns reads key.json')
    p.add_argument('shards', nargs='+', help='tar files, folders, globs, s3:// objects or prefixes')
    _parquet_options(add('parquet', [common, source], 'parquet files of image bytes or paths + captions (img2dataset '
                         'output, Hugging Face datasets; local or s3://)'))
    p = add('shapes', [common], 'procedural shapes demo set')
    p.add_argument('--num-samples', type=int, default=10_000, help='number of samples')
    p.add_argument('--noise', type=float, default=0.0, help='fraction of mismatched captions')
    p.add_argument('--seed', type=int, default=0, help='seed of the per-example draws')
    p.add_argument('--image-size', type=int, default=32, help='image side in pixels')
    _fashion_mnist_options(add('fashion-mnist', [common], 'Fashion-MNIST captions demo set'))
    return parser


def _common_options() -> argparse.ArgumentParser:
    """Options of every source: where and how the shards are written."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument('--out', required=True, help='output directory or s3://bucket/prefix '
                        '(custom endpoint: $S3_ENDPOINT_URL; credentials from the environment)')
    common.add_argument('--compression', default='zstd', help="shard compression ('none' to disable)")
    common.add_argument('--hashes', default=','.join(DEFAULT_HASHES), help='comma-separated shard hashes')
    common.add_argument('--size-limit', default='64mb', help='shard size limit before compression')
    common.add_argument('--overwrite', action='store_true', help='replace an existing dataset at --out')
    common.add_argument('--no-progress', action='store_true', help='no progress bar')
    return common


def _source_options() -> argparse.ArgumentParser:
    """Options of the user-data sources (folder, webdataset, parquet): bad samples, captions, columns, images."""
    source = argparse.ArgumentParser(add_help=False)
    source.add_argument('--skip-bad', action='store_true',
                        help='skip bad samples (unreadable image, empty caption, missing field) and count them')
    source.add_argument('--caption-context', type=int, default=77,
                        help='count captions longer than this many CLIP BPE tokens (0: do not measure)')
    source.add_argument('--reject-long-captions', action='store_true',
                        help='treat captions longer than --caption-context as bad samples')
    source.add_argument('--image-encoding', default='source', choices=IMAGE_ENCODINGS, help=_ENCODING_HELP)
    source.add_argument('--keep-columns', default=None, metavar='NAME[:int],...', help=_KEEP_HELP)
    source.add_argument('--scoring-side', type=int, default=None, metavar='S',
                        help='also store a JPEG thumbnail with shortest side S (image_scoring column) for two-stage '
                             "decoding's stage 1 (e.g. 112: ViT-B/16 scored at patch 32)")
    return source


def _folder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('--captions', required=True, help='captions .csv (with header) or .jsonl')
    p.add_argument('--images', default=None, help='image folder (not given: the captions file folder)')
    p.add_argument('--image-column', default='file_name', help='column with the image path, relative to --images')
    p.add_argument('--caption-column', default='caption', help='column with the caption')
    p.add_argument('--label-column', default=None,
                   help="integer class column, written as 'label' (zero-shot evaluation needs it)")
    p.add_argument('--encoding', default='utf-8', help='text encoding of the captions file (e.g. latin-1)')


def _parquet_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('files', nargs='+', help='parquet files, folders, globs, s3:// objects or prefixes')
    p.add_argument('--image-column', default=None,
                   help='column with the image bytes, a {bytes, path} struct or a path (not given: the first of '
                        f'{", ".join(PARQUET_IMAGE_COLUMNS)})')
    p.add_argument('--caption-column', default=None,
                   help=f'column with the caption (not given: the first of {", ".join(PARQUET_CAPTION_COLUMNS)})')
    p.add_argument('--label-column', default=None,
                   help="integer class column, written as 'label' (zero-shot evaluation needs it)")
    p.add_argument('--images', default=None,
                   help='folder or s3:// prefix of relative image paths (not given: the parquet file\'s folder)')


def _fashion_mnist_options(p: argparse.ArgumentParser) -> None:
    p.add_argument('--split', default='train', choices=('train', 'test'), help='Fashion-MNIST split')
    p.add_argument('--num-samples', type=int, default=None, help='first N images (not given: all)')
    p.add_argument('--mismatched', type=float, default=0.0, help='fraction of captions naming another class')
    p.add_argument('--junk', type=float, default=0.0, help='fraction of junk alt-text captions')
    p.add_argument('--near-duplicates', type=float, default=0.0, help='fraction of near-duplicate images')
    p.add_argument('--curated', type=int, default=None, metavar='N',
                   help='write the clean class-balanced curated subset of N samples instead')
    p.add_argument('--seed', type=int, default=0, help='seed of the per-example draws')
    p.add_argument('--root', default=None,
                   help='folder with the IDX files (not given: those of dataset-fashion-mnist)')


def main(argv: Optional[list[str]] = None) -> int:
    """``composer-jest convert {folder,webdataset,parquet,shapes,fashion-mnist} --out OUT ...``; returns the exit
    code."""
    args = _parser().parse_args(argv)
    options = MDSOptions(
        compression=None if args.compression.lower() in ('', 'none') else args.compression,
        hashes=sorted(h for h in args.hashes.split(',') if h), size_limit=args.size_limit,
        overwrite=args.overwrite, progress=not args.no_progress,
    )
    check = None
    if args.source in ('folder', 'webdataset', 'parquet'):
        check = CaptionCheck(context=args.caption_context or None, reject_long=args.reject_long_captions)
    try:
        summary = _RUN[args.source](args, options, check)
    except (ConversionError, RemoteAccessError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f'composer-jest convert: error: {e}', file=sys.stderr)
        return 1
    print(summary)
    return 0


def _run_folder(args: argparse.Namespace, options: MDSOptions, check: Optional[CaptionCheck]) -> ConvertSummary:
    return convert_folder(args.captions, args.out, images_dir=args.images, image_column=args.image_column,
                          caption_column=args.caption_column, label_column=args.label_column,
                          keep_columns=args.keep_columns, image_encoding=args.image_encoding, encoding=args.encoding,
                          scoring_side=args.scoring_side, skip_bad=args.skip_bad, options=options,
                          captions_check=check)


def _run_webdataset(args: argparse.Namespace, options: MDSOptions, check: Optional[CaptionCheck]) -> ConvertSummary:
    return convert_webdataset(args.shards, args.out, image_encoding=args.image_encoding, keep_columns=args.keep_columns,
                              skip_bad=args.skip_bad, options=options, captions_check=check,
                              scoring_side=args.scoring_side)


def _run_parquet(args: argparse.Namespace, options: MDSOptions, check: Optional[CaptionCheck]) -> ConvertSummary:
    return convert_parquet(args.files, args.out, image_column=args.image_column, caption_column=args.caption_column,
                           label_column=args.label_column, keep_columns=args.keep_columns, images_dir=args.images,
                           image_encoding=args.image_encoding, skip_bad=args.skip_bad, options=options,
                           captions_check=check, scoring_side=args.scoring_side)


def _run_shapes(args: argparse.Namespace, options: MDSOptions, check: Optional[CaptionCheck]) -> ConvertSummary:
    return convert_shapes(args.out, num_samples=args.num_samples, noise=args.noise, seed=args.seed,
                          image_size=args.image_size, options=options)


def _run_fashion_mnist(args: argparse.Namespace, options: MDSOptions, check: Optional[CaptionCheck]) -> ConvertSummary:
    from composer_jest.data.demo.fashion_mnist import WebNoise

    noisy = args.mismatched or args.junk or args.near_duplicates
    noise = WebNoise(mismatched=args.mismatched, junk=args.junk, near_duplicate=args.near_duplicates)
    return convert_fashion_mnist(args.out, split=args.split, num_samples=args.num_samples,
                                 noise=noise if noisy else None, curated=args.curated, seed=args.seed, root=args.root,
                                 options=options)


_RUN: dict[str, Callable[[argparse.Namespace, MDSOptions, Optional[CaptionCheck]], ConvertSummary]] = {
    'folder': _run_folder, 'webdataset': _run_webdataset, 'parquet': _run_parquet, 'shapes': _run_shapes,
    'fashion-mnist': _run_fashion_mnist,
}

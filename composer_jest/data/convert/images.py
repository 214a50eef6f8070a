"""The ``image`` column of a conversion: decode every source image once (bad files fail at conversion time) and
store it as the chosen ``image_encoding``; optionally the two-stage scoring thumbnail."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from composer_jest.data.convert.writer import BadSampleError

__all__ = ['IMAGE_ENCODINGS', 'SOURCE_FORMATS', 'decode_image', 'encode_image', 'check_encoding',
           'check_scoring_side', 'keeps_source_bytes']

IMAGE_ENCODINGS = ('source', 'jpeg', 'png', 'bytes')
SOURCE_FORMATS = ('JPEG', 'PNG')  # kept byte for byte by image_encoding='source'; other formats become PNG


def decode_image(key: str, data: Optional[bytes] = None, path: Optional[Path] = None) -> Image.Image:
    """Open and fully decode an image (truncated or corrupt files fail here, at conversion time)."""
    try:
        image = Image.open(path if path is not None else io.BytesIO(data))
        image.load()
        return image
    except FileNotFoundError:
        raise BadSampleError(key, f'image file not found: {path}') from None
    except Exception as e:
        raise BadSampleError(key, f'unreadable image ({type(e).__name__}: {e})') from None


def encode_image(image: Image.Image, raw: Optional[bytes], encoding: str) -> Any:
    """The ``image`` column value for ``encoding``: the PIL image (MDS jpeg/png encode it) or bytes.

    ``'source'``: the source bytes of a JPEG or PNG file, else the decoded pixels as PNG bytes (lossless, first
    frame of an animation; modes PNG cannot hold become RGB). ``'bytes'``: the source bytes, any format.
    """
    if encoding == 'bytes' or (encoding == 'source' and image.format in SOURCE_FORMATS):
        return raw
    if encoding == 'source':
        out = io.BytesIO()
        _png_mode(image).save(out, format='PNG')
        return out.getvalue()
    if encoding == 'jpeg':
        # JPEG files opened from disk are copied byte for byte by streaming's JPEG encoding.
        if image.format == 'JPEG' and image.mode in ('RGB', 'L'):
            return image
        return image.convert('RGB')
    return _png_mode(image)


def _png_mode(image: Image.Image) -> Image.Image:
    return image if image.mode in ('1', 'L', 'LA', 'P', 'RGB', 'RGBA', 'I', 'I;16') else image.convert('RGB')


def check_scoring_side(side: Optional[int]) -> None:
    """``scoring_side`` is ``None`` or a positive int (the shortest side of the two-stage scoring thumbnail)."""
    if side is not None and (isinstance(side, bool) or not isinstance(side, int) or side < 1):
        raise ValueError(f'scoring_side must be a positive int (the two-stage scoring side, e.g. 112) or None, '
                         f'got {side!r}')


def check_encoding(image_encoding: str) -> str:
    """The MDS encoding of the ``image`` column for ``image_encoding`` (``source`` and ``bytes`` store bytes)."""
    if image_encoding not in IMAGE_ENCODINGS:
        raise ValueError(f'image_encoding must be one of {IMAGE_ENCODINGS}, got {image_encoding!r}')
    return 'bytes' if image_encoding == 'source' else image_encoding


def keeps_source_bytes(image_encoding: str) -> bool:
    """Whether ``image_encoding`` may store the source file's bytes (so they must be read)."""
    return image_encoding in ('source', 'bytes')

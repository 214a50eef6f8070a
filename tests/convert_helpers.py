"""Small inputs for the conversion tests (image bytes, caption folders, webdataset tars) and a reader of MDS output.

Shared by tests/data, tests/run and tests/jest: import by name (``tests/`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile

import numpy as np
from PIL import Image
from streaming import StreamingDataset

from composer_jest.data.convert import MDSOptions

QUIET = MDSOptions(size_limit=4_000, progress=False)  # tiny shards: several per test set

def _read(local: str) -> list[dict]:
    """Every sample of an MDS directory, in order, via a plain StreamingDataset."""
    ds = StreamingDataset(local=local, shuffle=False, batch_size=1)
    samples = [ds[i] for i in range(ds.num_samples)]
    del ds
    return samples

def _image_bytes(seed: int, fmt: str, mode: str = 'RGB', size: int = 12) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {'RGB': 3, 'RGBA': 4, 'L': 1}[mode]
    pixels = rng.integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    image = Image.fromarray(pixels[..., 0] if channels == 1 else pixels)
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()

def _make_folder(root, n: int = 6, bad: dict | None = None) -> list[dict]:
    """Images 0..n-1 (JPEG and PNG, one RGBA) with captions; ``bad`` maps row -> corruption."""
    bad = bad or {}
    (root / 'img').mkdir(parents=True)
    rows = []
    for i in range(n):
        fmt, ext = ('PNG', 'png') if i % 3 == 2 else ('JPEG', 'jpg')
        name = f'img/{i:03d}.{ext}'
        data = _image_bytes(i, fmt, mode='RGBA' if fmt == 'PNG' and i == 2 else 'RGB')
        if bad.get(i) == 'unreadable':
            data = b'this is not an image'
        if bad.get(i) != 'missing_file':
            (root / name).write_bytes(data)
        caption = '   ' if bad.get(i) == 'empty_caption' else f'caption number {i}'
        rows.append({'file_name': name, 'caption': caption, 'label': str(i % 2), 'url': f'http://x/{i}'})
    return rows

def _write_csv(path, rows, fields=('file_name', 'caption', 'label', 'url')) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)

def _make_tar(path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, 'w') as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f'{key}.{ext}')
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))

def _wds_sample(i: int, **overrides) -> tuple[str, dict[str, bytes]]:
    files = {'jpg': _image_bytes(i, 'JPEG'), 'txt': f'web caption {i}'.encode(),
             'json': json.dumps({'url': f'http://img/{i}', 'width': 12}).encode()}
    files.update(overrides)
    return f'{i:09d}', {k: v for k, v in files.items() if v is not None}

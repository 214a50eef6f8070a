"""convert: numeric columns kept into the batch (--keep-columns), source-preserving image storage, help text."""

from __future__ import annotations

import argparse
import io
import json
import shutil

import numpy as np
import pytest
from composer.loggers import InMemoryLogger
from convert_helpers import QUIET, _image_bytes, _make_folder, _make_tar, _read, _wds_sample, _write_csv
from PIL import Image
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest.data.convert import (
    SUMMARY_FILE,
    BadSampleError,
    ConversionError,
    _parser,
    convert_folder,
    convert_webdataset,
    main,
)
from composer_jest.data.streaming import build_streaming_dataloader
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config


def _folder(tmp_path, clean=lambda i: str(i % 2), score=lambda i: str(i * 0.25), n: int = 4):
    rows = _make_folder(tmp_path, n=n)
    for i, row in enumerate(rows):
        row.update(clean=clean(i), score=score(i))
    _write_csv(tmp_path / 'captions.csv', rows, fields=('file_name', 'caption', 'url', 'clean', 'score'))
    return tmp_path / 'captions.csv'


def test_kept_columns_reach_the_batch_as_tensors_and_jest_tracks_them(tmp_path, streaming_shm, tokenizer):  # noqa: F811
    out = str(tmp_path / 'mds')
    summary = convert_folder(_folder(tmp_path), out, keep_columns='clean:int,score', options=QUIET)
    assert summary.columns == {'image': 'bytes', 'caption': 'str', 'meta': 'json', 'clean': 'int',
                               'score': 'float64', 'index': 'int'}
    samples = _read(out)
    assert [s['clean'] for s in samples] == [0, 1, 0, 1] and [s['score'] for s in samples] == [0, .25, .5, .75]
    assert samples[1]['meta'] == {'url': 'http://x/1'}, 'kept columns leave meta'
    shutil.copytree(out, tmp_path / 'mds-train')  # one local directory per live dataset

    loader = build_streaming_dataloader(None, out, tokenizer, batch_size=4, shuffle=False)
    batch = next(iter(loader))
    assert batch['clean'].tolist() == [0, 1, 0, 1] and batch['clean'].dtype.is_floating_point is False
    assert batch['score'].tolist() == [0, .25, .5, .75]
    del loader, batch

    # a yaml run: the start check passes and JEST logs the kept columns' means over the super-batch
    cfg = load_config('yamls/quickstart.yaml', [
        'train_loader.source=mds', f'train_loader.local={tmp_path / "mds-train"}', 'eval_loader=null',
        'global_train_batch_size=2', 'variables.filter_ratio=0.5',  # a super-batch of the 4 samples
        'algorithms.jest.reference=null', 'algorithms.jest.score=hard_learner',
        'algorithms.jest.track_keys=[clean,score]', 'max_duration=1ba', 'progress_bar=false',
        'log_to_console=false', 'callbacks={}',
    ])
    logger = InMemoryLogger()
    trainer = build_trainer(cfg, extra_loggers=[logger])
    trainer.fit()
    assert logger.data['jest/superbatch/clean'][-1][1] == 0.5
    assert logger.data['jest/superbatch/score'][-1][1] == 0.375
    trainer.close()


def test_a_non_numeric_kept_value_is_a_bad_row_naming_file_line_and_column(tmp_path, streaming_shm):  # noqa: F811
    captions = _folder(tmp_path, clean=lambda i: 'yes' if i == 1 else str(i % 2),
                       score=lambda i: 'nan' if i == 2 else '0.5')
    with pytest.raises(BadSampleError, match=r"captions\.csv:3: column 'clean' is not an integer: 'yes'"):
        convert_folder(captions, str(tmp_path / 'a'), keep_columns='clean:int', options=QUIET)
    with pytest.raises(BadSampleError, match=r"captions\.csv:4: column 'score' is not a finite number: 'nan'"):
        convert_folder(captions, str(tmp_path / 'b'), keep_columns='score', options=QUIET)
    with pytest.raises(BadSampleError, match=r"captions\.csv:2: column 'score' is not an integer: '0.5'"):
        convert_folder(captions, str(tmp_path / 'c'), keep_columns='score:int', options=QUIET)
    summary = convert_folder(captions, str(tmp_path / 'd'), keep_columns=['clean:int', 'score'], skip_bad=True,
                             options=QUIET)
    assert (summary.written, summary.skipped) == (2, 2)
    with pytest.raises(ConversionError, match=r"missing column\(s\) \['dirty'\]"):
        convert_folder(captions, str(tmp_path / 'e'), keep_columns='dirty', options=QUIET)
    for spec, message in (('label', "'label' is reserved"), ('text:int', "'text' is reserved"),
                          ('caption', "'caption' is reserved"), ('clean:bool', "has type 'bool'")):
        with pytest.raises(ValueError, match=message):
            convert_folder(captions, str(tmp_path / 'f'), keep_columns=spec, options=QUIET)


def test_jsonl_and_webdataset_keep_columns(tmp_path, streaming_shm):  # noqa: F811
    rows = _make_folder(tmp_path, n=3)
    with open(tmp_path / 'captions.jsonl', 'w') as f:
        for i, row in enumerate(rows):
            f.write(json.dumps({'file_name': row['file_name'], 'caption': row['caption'], 'clean': bool(i % 2),
                                'score': 'bad' if i == 2 else i}) + '\n')
    with pytest.raises(BadSampleError, match=r"captions\.jsonl:3: column 'score' is not a finite number: 'bad'"):
        convert_folder(tmp_path / 'captions.jsonl', str(tmp_path / 'j'), keep_columns='clean:int,score',
                       options=QUIET)
    summary = convert_folder(tmp_path / 'captions.jsonl', str(tmp_path / 'j'), keep_columns='clean:int',
                             options=QUIET)
    assert [s['clean'] for s in _read(summary.out)] == [0, 1, 0]

    _make_tar(tmp_path / 'a.tar', [_wds_sample(i) for i in range(3)])  # key.json: {url, width: 12}
    assert main([
        'webdataset', str(tmp_path / 'a.tar'), '--out', str(tmp_path / 'w'), '--keep-columns', 'width:int',
        '--no-progress']) == 0
    samples = _read(str(tmp_path / 'w'))
    assert [s['width'] for s in samples] == [12, 12, 12]
    assert 'width' not in samples[0]['meta'] and samples[0]['meta']['url'] == 'http://img/0'
    _make_tar(tmp_path / 'b.tar', [_wds_sample(0, json=b'{"width": "wide"}')])
    with pytest.raises(BadSampleError, match=r"b\.tar:000000000\.json: column 'width' is not an integer: 'wide'"):
        convert_webdataset(str(tmp_path / 'b.tar'), str(tmp_path / 'w2'), keep_columns='width:int', options=QUIET)


def _encode(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def test_source_encoding_keeps_jpeg_and_png_bytes_and_stores_others_as_lossless_png(tmp_path, streaming_shm):  # noqa: F811
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)
    files = {
        'a.jpg': _image_bytes(0, 'JPEG'), 'b.png': _image_bytes(1, 'PNG', mode='RGBA'),
        'c.bmp': _encode(Image.fromarray(pixels), 'BMP'),
        'd.gif': _encode(Image.fromarray(pixels).convert('P'), 'GIF'),
        'e.tif': _encode(Image.fromarray(pixels).convert('CMYK'), 'TIFF'),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    _write_csv(tmp_path / 'captions.csv', [{'file_name': n, 'caption': f'image {n}'} for n in files],
               fields=('file_name', 'caption'))
    out = str(tmp_path / 'mds')
    assert main(['folder', '--captions', str(tmp_path / 'captions.csv'), '--out', out, '--no-progress']) == 0
    assert json.load(open(f'{out}/{SUMMARY_FILE}'))['columns']['image'] == 'bytes'  # the default is 'source'
    stored = [s['image'] for s in _read(out)]
    assert stored[0] == files['a.jpg'] and stored[1] == files['b.png'], 'JPEG/PNG sources are kept byte for byte'
    for data, name in zip(stored[2:], ('c.bmp', 'd.gif', 'e.tif')):
        converted, source = Image.open(io.BytesIO(data)), Image.open(tmp_path / name)
        assert converted.format == 'PNG', name
        expected = source if source.mode != 'CMYK' else source.convert('RGB')
        assert np.array_equal(np.asarray(converted.convert('RGB')), np.asarray(expected.convert('RGB'))), name


def test_every_convert_option_has_help_showing_its_default():
    parser = _parser()
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subcommands) == {'folder', 'webdataset', 'parquet', 'shapes', 'fashion-mnist'}
    for name, sub in subcommands.items():
        formatter = sub._get_formatter()
        for action in sub._actions:
            if not action.option_strings or action.dest == 'help':
                continue
            text = formatter._get_help_string(action) if action.help else ''
            assert action.help and ('(default: ' in text or text.endswith('(required)')), (name, action.dest)
    help_text = subcommands['folder'].format_help()
    assert '(default: source)' in help_text and '--keep-columns' in help_text

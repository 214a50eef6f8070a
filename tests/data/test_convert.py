"""Conversion to MDS: round trips for every source, and bad input (error naming the file/key, or counted skips)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from convert_helpers import QUIET, _image_bytes, _make_folder, _make_tar, _read, _wds_sample, _write_csv
from PIL import Image
from s3_server import moto_server, s3_endpoint, streaming_shm  # noqa: F401  (pytest fixtures)

from composer_jest.data.convert import (
    SUMMARY_FILE,
    BadSampleError,
    ConversionError,
    MDSOptions,
    convert_demo,
    convert_folder,
    convert_shapes,
    convert_webdataset,
    main,
)
from composer_jest.data.demo.shapes import ShapesDataset
from composer_jest.run import cli


def test_folder_csv_round_trip(tmp_path, streaming_shm):  # noqa: F811
    rows = _make_folder(tmp_path)
    _write_csv(tmp_path / 'captions.csv', rows)
    out = str(tmp_path / 'mds')
    summary = convert_folder(tmp_path / 'captions.csv', out, label_column='label', image_encoding='jpeg',
                             options=QUIET)
    assert (summary.written, summary.skipped) == (6, 0)
    assert summary.columns == {'image': 'jpeg', 'caption': 'str', 'meta': 'json', 'label': 'int', 'index': 'int'}
    index = json.load(open(os.path.join(out, 'index.json')))
    assert len(index['shards']) > 1
    assert all(s['compression'] == 'zstd' and s['hashes'] == ['sha1', 'xxh64'] for s in index['shards'])
    samples = _read(out)
    assert [s['index'] for s in samples] == list(range(6))
    assert [s['caption'] for s in samples] == [r['caption'] for r in rows]
    assert [s['label'] for s in samples] == [i % 2 for i in range(6)]
    assert samples[1]['meta'] == {'url': 'http://x/1'}
    # JPEG files are stored byte for byte (no re-encoding): same pixels as decoding the original file
    original = np.asarray(Image.open(tmp_path / rows[0]['file_name']))
    assert np.array_equal(np.asarray(samples[0]['image']), original)
    assert samples[2]['image'].mode == 'RGB'  # an RGBA PNG converted for JPEG storage


def test_folder_jsonl_round_trip_with_png(tmp_path, streaming_shm):  # noqa: F811
    rows = _make_folder(tmp_path, n=4)
    with open(tmp_path / 'captions.jsonl', 'w') as f:
        for row in rows:
            f.write(json.dumps({'image': row['file_name'], 'text': row['caption'], 'source': 'web'}) + '\n')
    out = str(tmp_path / 'mds')
    summary = convert_folder(tmp_path / 'captions.jsonl', out, image_column='image', caption_column='text',
                             image_encoding='png', options=QUIET)
    assert summary.written == 4
    samples = _read(out)
    assert [s['caption'] for s in samples] == [r['caption'] for r in rows]
    assert samples[3]['meta'] == {'source': 'web'}
    png = np.asarray(Image.open(tmp_path / rows[2]['file_name']))
    assert np.array_equal(np.asarray(samples[2]['image']), png), 'png storage is lossless'


def test_webdataset_round_trip(tmp_path, streaming_shm):  # noqa: F811
    (tmp_path / 'shards').mkdir()
    _make_tar(tmp_path / 'shards' / '00000.tar', [_wds_sample(i) for i in range(5)])
    _make_tar(tmp_path / 'shards' / '00001.tar', [_wds_sample(i) for i in range(5, 8)])
    out = str(tmp_path / 'mds')
    summary = convert_webdataset(str(tmp_path / 'shards'), out, options=QUIET)
    assert summary.written == 8
    samples = _read(out)
    assert [s['index'] for s in samples] == list(range(8))
    assert [s['caption'] for s in samples] == [f'web caption {i}' for i in range(8)]
    assert samples[6]['image'] == _image_bytes(6, 'JPEG'), 'the default (source) keeps JPEG bytes'
    assert samples[6]['meta']['url'] == 'http://img/6' and samples[6]['meta']['key'] == '000000006'
    assert samples[6]['meta']['shard'].endswith('00001.tar')


def test_webdataset_from_s3(s3_endpoint, tmp_path):  # noqa: F811
    _make_tar(tmp_path / 'a.tar', [_wds_sample(i) for i in range(3)])
    client = s3_endpoint.client()
    client.upload_file(str(tmp_path / 'a.tar'), s3_endpoint.bucket, 'wds/00000.tar')
    out = f's3://{s3_endpoint.bucket}/mds'
    summary = convert_webdataset(f's3://{s3_endpoint.bucket}/wds/', out, image_encoding='jpeg', options=QUIET)
    assert summary.written == 3
    keys = {o['Key'] for o in client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix='mds/')['Contents']}
    assert {'mds/index.json', f'mds/{SUMMARY_FILE}'} <= keys
    with pytest.raises(FileExistsError, match='overwrite'):
        convert_webdataset(f's3://{s3_endpoint.bucket}/wds/00000.tar', out, options=QUIET)
    overwrite = MDSOptions(size_limit=4_000, progress=False, overwrite=True)
    # an overwrite that fails part-way leaves the previous dataset as it was (test_faults reads it back)
    _make_tar(tmp_path / 'b.tar', [_wds_sample(0), _wds_sample(1, txt=None)])
    before = {o['Key'] for o in client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix='mds/')['Contents']}
    with pytest.raises(BadSampleError, match='no caption'):
        convert_webdataset(str(tmp_path / 'b.tar'), out, options=overwrite)
    keys = {o['Key'] for o in client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix='mds/')['Contents']}
    assert keys == before
    assert convert_webdataset(str(tmp_path / 'a.tar'), out, options=overwrite).written == 3


def test_shapes_round_trip_and_cli(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'shapes')
    summary = convert_demo('shapes', out, num_samples=12, noise=0.5, seed=4, options=QUIET)
    assert summary.written == 12
    reference = ShapesDataset(12, noise=0.5, seed=4)
    for sample in _read(out):
        ex = reference.example(sample['index'])
        assert sample['caption'] == ex['caption'] and sample['label'] == ex['label']
        assert sample['clean'] == int(ex['clean'])
        assert np.array_equal(np.asarray(sample['image']), np.asarray(ex['image']))
    # the CLI (through the package dispatcher) writes the same thing
    cli_out = str(tmp_path / 'cli')
    argv = ['convert', 'shapes', '--out', cli_out, '--num-samples', '12', '--noise', '0.5', '--seed', '4',
            '--no-progress']
    assert cli.main(argv) == 0
    assert [s['caption'] for s in _read(cli_out)] == [reference.example(i)['caption'] for i in range(12)]
    assert main(['shapes', '--out', cli_out, '--num-samples', '3', '--no-progress']) == 1, 'refuses to overwrite'
    assert main(['shapes', '--out', cli_out, '--num-samples', '3', '--no-progress', '--overwrite']) == 0
    assert len(_read(cli_out)) == 3


# -- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(('corruption', 'message'), [
    ('unreadable', r'captions\.csv:4 .*img/002\.png.*unreadable image'),
    ('missing_file', r'captions\.csv:4 .*image file not found.*img/002\.png'),
    ('empty_caption', r'captions\.csv:4 .*img/002\.png.*empty caption'),
])
def test_folder_bad_sample_raises_naming_it(tmp_path, streaming_shm, corruption, message):  # noqa: F811
    rows = _make_folder(tmp_path, bad={2: corruption})
    _write_csv(tmp_path / 'captions.csv', rows)
    out = tmp_path / 'mds'
    with pytest.raises(BadSampleError, match=message):
        convert_folder(tmp_path / 'captions.csv', str(out), options=QUIET)
    assert not out.exists(), 'a failed conversion leaves nothing readable behind'


def test_folder_skip_bad_counts(tmp_path, streaming_shm, capsys):  # noqa: F811
    rows = _make_folder(tmp_path, n=8, bad={1: 'unreadable', 4: 'empty_caption', 6: 'missing_file'})
    _write_csv(tmp_path / 'captions.csv', rows)
    out = str(tmp_path / 'mds')
    summary = convert_folder(tmp_path / 'captions.csv', out, skip_bad=True, options=QUIET)
    assert (summary.written, summary.skipped) == (5, 3)
    assert any('img/004' in s and 'empty caption' in s for s in summary.skipped_examples)
    samples = _read(out)
    assert [s['index'] for s in samples] == list(range(5)), 'indices stay contiguous over written samples'
    assert [s['caption'] for s in samples] == [f'caption number {i}' for i in (0, 2, 3, 5, 7)]
    recorded = json.load(open(os.path.join(out, SUMMARY_FILE)))
    assert (recorded['written'], recorded['skipped']) == (5, 3)
    # CLI: summary printed with the count
    assert main(['folder', '--captions', str(tmp_path / 'captions.csv'), '--out', str(tmp_path / 'cli'),
                 '--skip-bad', '--no-progress']) == 0
    assert 'skipped 3 bad' in capsys.readouterr().out


def test_missing_column_is_a_clear_error(tmp_path, streaming_shm, capsys):  # noqa: F811
    rows = _make_folder(tmp_path, n=3)
    _write_csv(tmp_path / 'captions.csv', rows, fields=('file_name', 'label'))
    with pytest.raises(ConversionError, match=r"captions\.csv: missing column\(s\) \['caption'\]"):
        convert_folder(tmp_path / 'captions.csv', str(tmp_path / 'mds'), skip_bad=True, options=QUIET)
    with open(tmp_path / 'captions.jsonl', 'w') as f:
        f.write(json.dumps({'file_name': rows[0]['file_name'], 'caption': 'ok'}) + '\n')
        f.write(json.dumps({'file_name': rows[1]['file_name']}) + '\n')
    with pytest.raises(BadSampleError, match=r"captions\.jsonl:2: missing column 'caption'"):
        convert_folder(tmp_path / 'captions.jsonl', str(tmp_path / 'mds'), options=QUIET)
    summary = convert_folder(tmp_path / 'captions.jsonl', str(tmp_path / 'mds'), skip_bad=True, options=QUIET)
    assert (summary.written, summary.skipped) == (1, 1)
    code = main(['folder', '--captions', str(tmp_path / 'captions.csv'), '--out', str(tmp_path / 'x'),
                 '--no-progress'])
    assert code == 1 and "missing column(s) ['caption']" in capsys.readouterr().err


def test_webdataset_bad_samples(tmp_path, streaming_shm):  # noqa: F811
    samples = [_wds_sample(0), _wds_sample(1, txt=None), _wds_sample(2, jpg=b'garbage'), _wds_sample(3, txt=b'')]
    _make_tar(tmp_path / 'bad.tar', samples)
    with pytest.raises(BadSampleError, match=r'bad\.tar:000000001: no caption'):
        convert_webdataset(str(tmp_path / 'bad.tar'), str(tmp_path / 'mds'), options=QUIET)
    summary = convert_webdataset(str(tmp_path / 'bad.tar'), str(tmp_path / 'mds'), skip_bad=True, options=QUIET)
    assert (summary.written, summary.skipped) == (1, 3)
    reasons = '\n'.join(summary.skipped_examples)
    assert 'no caption' in reasons and 'unreadable image' in reasons and 'empty caption' in reasons
    # a corrupted tar is not a skippable sample: it names the shard
    data = (tmp_path / 'bad.tar').read_bytes()
    (tmp_path / 'broken.tar').write_bytes(data[:700] + b'\x00garbage' * 50)
    with pytest.raises(ConversionError, match=r'broken\.tar'):
        convert_webdataset(str(tmp_path / 'broken.tar'), str(tmp_path / 'mds2'), skip_bad=True, options=QUIET)
    with pytest.raises(FileNotFoundError, match='nope'):
        convert_webdataset(str(tmp_path / 'nope.tar'), str(tmp_path / 'mds3'), options=QUIET)


def test_all_bad_is_an_error(tmp_path, streaming_shm):  # noqa: F811
    rows = _make_folder(tmp_path, n=2, bad={0: 'unreadable', 1: 'unreadable'})
    _write_csv(tmp_path / 'captions.csv', rows)
    with pytest.raises(ConversionError, match='no samples written'):
        convert_folder(tmp_path / 'captions.csv', str(tmp_path / 'mds'), skip_bad=True, options=QUIET)
    assert not (tmp_path / 'mds').exists()


def test_shapes_to_existing_dir_needs_overwrite(tmp_path, streaming_shm):  # noqa: F811
    out = str(tmp_path / 'shapes')
    convert_shapes(out, num_samples=4, options=QUIET)
    with pytest.raises(FileExistsError, match='overwrite'):
        convert_shapes(out, num_samples=4, options=QUIET)

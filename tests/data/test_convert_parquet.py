"""convert parquet: img2dataset's parquet output and Hugging Face datasets' Image structs, local and s3://."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from convert_helpers import QUIET, _image_bytes, _read
from PIL import Image
from s3_server import moto_server, s3_endpoint, streaming_shm  # noqa: F401  (pytest fixtures)

from composer_jest.data.convert import (
    SUMMARY_FILE,
    BadSampleError,
    ConversionError,
    _parser,
    convert_parquet,
    main,
)


def _img2dataset_parquet(path, n: int = 6) -> list[bytes]:
    """img2dataset's parquet layout: `jpg` bytes (null when the download failed), `txt`, `key`, `status`..."""
    images = [_image_bytes(i, 'JPEG') for i in range(n)]
    rows = []
    for i in range(n):
        failed = i == 1
        rows.append({
            'key': f'{i:09d}', 'jpg': None if failed else images[i], 'txt': None if failed else f'photo {i}',
            'url': f'http://x/{i}.jpg', 'status': 'failed_to_download' if failed else 'success',
            'error_message': 'HTTP Error 404' if failed else None, 'width': 12, 'height': 12, 'clean': i % 2,
            'label': i % 3,
        })
    rows[3]['jpg'] = b'not an image'
    rows[4]['txt'] = '  '
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=2)
    return images


def test_img2dataset_parquet_round_trip_with_bad_rows_named_and_counted(tmp_path, streaming_shm):  # noqa: F811
    path = tmp_path / '00000.parquet'
    images = _img2dataset_parquet(path)
    with pytest.raises(BadSampleError, match=r"00000.parquet:row 1 \(key 000000001\): no image \(column 'jpg' is "
                                             r"null\); img2dataset status 'failed_to_download': HTTP Error 404"):
        convert_parquet(str(path), str(tmp_path / 'strict'), options=QUIET)
    out = str(tmp_path / 'mds')
    summary = convert_parquet(str(tmp_path), out, keep_columns='clean:int', label_column='label', skip_bad=True,
                              options=QUIET)
    assert (summary.written, summary.skipped, summary.empty_captions) == (3, 3, 1)
    assert summary.columns == {'image': 'bytes', 'caption': 'str', 'meta': 'json', 'clean': 'int', 'label': 'int',
                               'index': 'int'}
    assert any('row 3' in s and 'unreadable image' in s for s in summary.skipped_examples)
    samples = _read(out)
    assert [s['caption'] for s in samples] == ['photo 0', 'photo 2', 'photo 5']
    assert [s['image'] for s in samples] == [images[0], images[2], images[5]], 'JPEG bytes kept as they are'
    assert [(s['clean'], s['label'], s['index']) for s in samples] == [(0, 0, 0), (0, 2, 1), (1, 2, 2)]
    assert samples[1]['meta'] == {'key': '000000002', 'url': 'http://x/2.jpg', 'status': 'success',
                                  'error_message': None, 'width': 12, 'height': 12}
    assert (tmp_path / 'mds' / SUMMARY_FILE).exists()


def _hf_parquet(path, images_dir) -> list[bytes]:
    """Hugging Face datasets' layout: `image` struct {bytes, path} (bytes, or only a path) + `text` + `label`."""
    images = [_image_bytes(i, 'PNG') for i in range(3)]
    images_dir.mkdir()
    (images_dir / 'b.png').write_bytes(images[1])
    struct = pa.struct([('bytes', pa.binary()), ('path', pa.string())])
    table = pa.table({
        'image': pa.array([{'bytes': images[0], 'path': 'a.png'}, {'bytes': None, 'path': 'imgs/b.png'},
                           {'bytes': images[2], 'path': None}], type=struct),
        'text': ['a red square', 'a blue circle', 'a green star'], 'label': [0, 1, 2],
    })
    pq.write_table(table, path)
    return images


def test_hugging_face_image_structs_bytes_or_paths(tmp_path, streaming_shm):  # noqa: F811
    images = _hf_parquet(tmp_path / 'train-00000-of-00001.parquet', tmp_path / 'imgs')
    out = str(tmp_path / 'mds')
    summary = convert_parquet(str(tmp_path / 'train-00000-of-00001.parquet'), out, image_encoding='png',
                              options=QUIET)
    assert summary.written == 3 and summary.columns['image'] == 'png'
    samples = _read(out)
    for sample, data in zip(samples, images):
        assert list(sample['image'].getdata()) == list(Image.open(io.BytesIO(data)).getdata())
    assert [s['caption'] for s in samples] == ['a red square', 'a blue circle', 'a green star']
    assert samples[0]['meta'] == {'label': 0}, 'no --label-column: label stays in meta'
    (tmp_path / 'imgs' / 'b.png').unlink()
    with pytest.raises(BadSampleError, match=r'row 1 \(.*imgs/b.png\): image file not found'):
        convert_parquet(str(tmp_path / 'train-00000-of-00001.parquet'), str(tmp_path / 'x'), options=QUIET)


def test_missing_columns_are_errors_naming_the_file_and_its_columns(tmp_path, streaming_shm):  # noqa: F811
    pq.write_table(pa.table({'picture': [b'x'], 'alt': ['a cat']}), tmp_path / 'p.parquet')
    with pytest.raises(ConversionError, match=r"p.parquet: no image column among the defaults \['jpg', .*'image'.*"
                                              r"its columns: \['picture', 'alt'\].*--image-column"):
        convert_parquet(str(tmp_path / 'p.parquet'), str(tmp_path / 'a'), options=QUIET)
    with pytest.raises(ConversionError, match=r"p.parquet: missing column\(s\) \['clean'\]"):
        convert_parquet(str(tmp_path / 'p.parquet'), str(tmp_path / 'b'), image_column='picture',
                        caption_column='alt', keep_columns='clean:int', skip_bad=True, options=QUIET)
    (tmp_path / 'broken.parquet').write_bytes(b'PAR1 truncated')
    with pytest.raises(ConversionError, match='broken.parquet: unreadable parquet file'):
        convert_parquet(str(tmp_path / 'broken.parquet'), str(tmp_path / 'c'), options=QUIET)


def test_cli_parquet_with_paths_column(tmp_path, streaming_shm, capsys):  # noqa: F811
    (tmp_path / 'pics').mkdir()
    for i in range(3):
        (tmp_path / 'pics' / f'{i}.jpg').write_bytes(_image_bytes(i, 'JPEG'))
    pq.write_table(pa.table({'file': ['0.jpg', '1.jpg', 'gone.jpg'], 'caption': ['a', 'b', 'c'],
                             'score': [0.5, 1.5, 2.5]}), tmp_path / 'meta.parquet')
    argv = ['parquet', str(tmp_path / 'meta.parquet'), '--image-column', 'file', '--images', str(tmp_path / 'pics'),
            '--keep-columns', 'score', '--skip-bad', '--out', str(tmp_path / 'mds'), '--no-progress']
    assert main(argv) == 0
    assert 'wrote 2 samples' in capsys.readouterr().out
    assert [s['score'] for s in _read(str(tmp_path / 'mds'))] == [0.5, 1.5]
    helps = {a.dest: a.help for a in _parser()._subparsers._group_actions[0].choices['parquet']._actions}
    assert 'jpg' in helps['image_column'] and 'txt' in helps['caption_column'] and helps['skip_bad']


def test_parquet_and_its_image_paths_on_s3(s3_endpoint, tmp_path, streaming_shm):  # noqa: F811
    images = _hf_parquet(tmp_path / 'part.parquet', tmp_path / 'imgs')
    client = s3_endpoint.client()
    client.upload_file(str(tmp_path / 'part.parquet'), s3_endpoint.bucket, 'hf/data/part.parquet')
    client.upload_file(str(tmp_path / 'imgs' / 'b.png'), s3_endpoint.bucket, 'hf/data/imgs/b.png')
    out = str(tmp_path / 'mds')
    summary = convert_parquet(f's3://{s3_endpoint.bucket}/hf/data/', out, options=QUIET)
    assert summary.written == 3
    assert [s['image'] for s in _read(out)] == images, 'PNG bytes kept; the path-only row read from the s3 prefix'


def test_parquet_scoring_thumbnails(tmp_path, streaming_shm):  # noqa: F811
    """``--scoring-side`` works for parquet as for folders: a JPEG thumbnail of each kept image, shortest side S."""
    from composer_jest.data.two_stage import SCORING_COLUMN

    path = tmp_path / '00000.parquet'
    images = _img2dataset_parquet(path)
    out = str(tmp_path / 'mds')
    summary = convert_parquet(str(path), out, skip_bad=True, scoring_side=6, options=QUIET)
    assert summary.columns[SCORING_COLUMN] == 'bytes'
    samples = _read(out)
    for sample, source in zip(samples, [images[0], images[2], images[5]]):
        thumb = Image.open(io.BytesIO(sample[SCORING_COLUMN]))
        assert thumb.format == 'JPEG' and min(thumb.size) == 6
        assert sample['image'] == source
    with pytest.raises(ValueError, match='scoring_side'):
        convert_parquet(str(path), str(tmp_path / 'bad'), scoring_side=0, options=QUIET)

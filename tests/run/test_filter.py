"""``composer-jest filter``: the kept rows are the top scores of an independently computed reference score."""

from __future__ import annotations

import json
import os
import re
import tempfile

import numpy as np
import pytest
import torch
from convert_helpers import QUIET, _make_folder, _read, _write_csv
from s3_server import moto_server, s3_endpoint, streaming_shm  # noqa: F401  (pytest fixtures)
from streaming import StreamingDataset

from composer_jest.core.batch import CACHED_REFERENCE_KEYS
from composer_jest.core.filtering import SCORE_COLUMN
from composer_jest.data.convert import MDSOptions, convert_folder, convert_shapes
from composer_jest.data.streaming import build_streaming_dataloader
from composer_jest.jest.embed_reference import embed_reference
from composer_jest.models.clip import build_clip, eval_image_transform, tokenizer_for
from composer_jest.run import filter as filter_cmd
from composer_jest.run.cli import main as cli

torch.set_num_threads(1)
N = 120


@pytest.fixture(scope='module')
def pool(tmp_path_factory, streaming_shm):  # noqa: F811
    """A noisy shapes pool (several shards), a seeded jest-tiny reference's weights, and the pool embedded by it."""
    root = tmp_path_factory.mktemp('filter')
    convert_shapes(str(root / 'pool'), num_samples=N, noise=0.5, seed=3, options=MDSOptions(size_limit=8_000,
                                                                                           progress=False))
    torch.manual_seed(0)  # test-only: the reference's init is the one global draw
    torch.save(build_clip('jest-tiny').state_dict(), root / 'ref.pt')
    embed_reference('jest-tiny', str(root / 'ref.pt'), str(root / 'pool-ref'), local=str(root / 'pool'),
                    batch_size=50, progress=False)
    return root


def _cosines(rows: list[dict]) -> np.ndarray:
    """The CLIP score of each row from its cached ref_* columns, in float64 with numpy."""
    x = np.stack([r['ref_image_features'] for r in rows]).astype(np.float64)
    y = np.stack([r['ref_text_features'] for r in rows]).astype(np.float64)
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def _top(scores: np.ndarray, k: int) -> list[int]:
    return sorted(np.argsort(-scores, kind='stable')[:k].tolist())


def _filter(*args: str) -> int:
    return cli(['filter', '--no-progress', *args])


def test_cached_keeps_the_top_fraction_with_every_column(pool, tmp_path):
    source = _read(str(pool / 'pool-ref'))
    scores = _cosines(source)
    assert _filter('--data', str(pool / 'pool-ref'), '--cached', '--keep', '0.3', '--track-keys', 'clean',
                   '--out', str(tmp_path / 'top')) == 0
    kept = _read(str(tmp_path / 'top'))
    expected = _top(scores, 36)
    assert [r['index'] for r in kept] == expected  # pool order, original ids
    assert set(kept[0]) == set(source[0]) | {SCORE_COLUMN}
    for row in kept:
        original = source[row['index']]
        assert row['caption'] == original['caption'] and row['clean'] == original['clean']
        assert np.array_equal(np.asarray(row['image']), np.asarray(original['image']))
        assert np.array_equal(row['ref_text_features'], original['ref_text_features'])
        assert row[SCORE_COLUMN] == pytest.approx(scores[row['index']], abs=1e-5)

    report = json.loads((tmp_path / 'top' / filter_cmd.REPORT_FILE).read_text())
    clean = np.array([r['clean'] for r in source])
    assert report['pool'] == N and report['kept'] == 36 and report['kept_fraction'] == pytest.approx(0.3)
    assert report['track_keys']['clean'] == {
        'pool_sum': clean.sum(), 'kept_sum': clean[expected].sum(), 'pool_mean': pytest.approx(clean.mean()),
        'kept_mean': pytest.approx(clean[expected].mean())}
    assert report['lowest_kept_score'] == pytest.approx(scores[expected].min(), abs=1e-5)
    assert sum(report['histogram']['pool']) == N and sum(report['histogram']['kept']) == 36
    assert (tmp_path / 'top' / filter_cmd.HISTOGRAM_FILE).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    summary = json.loads((tmp_path / 'top' / 'convert_summary.json').read_text())
    assert summary['written'] == 36 and summary['filter']['kept'] == 36


def test_threshold_keeps_every_score_at_or_above_it(pool, tmp_path, capsys):
    scores = _cosines(_read(str(pool / 'pool-ref')))
    ranked = np.sort(scores)
    cut = 40 + int(np.argmax(np.diff(ranked[40:81])))  # the widest gap between two middle scores
    threshold = float(ranked[cut] + ranked[cut + 1]) / 2
    assert ranked[cut + 1] - ranked[cut] > 1e-4  # far above float32 rounding of the same float16 features
    report_dir = tmp_path / 'report'
    assert _filter('--data', str(pool / 'pool-ref'), '--cached', '--threshold', repr(threshold),
                   '--out', str(tmp_path / 'above'), '--report', str(report_dir), '--progress') == 0
    captured = capsys.readouterr()
    assert 'filter: scoring' in captured.err and f'filter -> {tmp_path / "above"}' in captured.err  # both passes
    assert captured.out.startswith(f'kept {N - 1 - cut} of {N} (')
    kept = [r['index'] for r in _read(str(tmp_path / 'above'))]
    assert kept == [i for i in range(N) if scores[i] >= threshold] and len(kept) == N - 1 - cut
    assert json.loads((report_dir / filter_cmd.REPORT_FILE).read_text())['kept'] == len(kept)
    assert not (tmp_path / 'above' / filter_cmd.REPORT_FILE).exists()


def test_checkpoint_reference_scores_like_an_independent_forward(pool, tmp_path):
    """A checkpoint scores live; ``--score sigmoid`` is log sigmoid(t cos + b) with the reference's t and b."""
    clip = build_clip('jest-tiny')
    clip.load_state_dict(torch.load(pool / 'ref.pt'))
    clip.eval()
    loader = build_streaming_dataloader(None, str(pool / 'pool'), tokenizer_for('jest-tiny', clip), batch_size=40,
                                        shuffle=False, transform=eval_image_transform(clip), drop_last=False)
    cos, ids = [], []
    with torch.no_grad():
        for batch in loader:
            x = clip.encode_image(batch['image']).double()
            y = clip.encode_text(batch['text']).double()
            cos.append(torch.nn.functional.cosine_similarity(x, y).numpy())
            ids.append(batch['index'].numpy())
    assert np.concatenate(ids).tolist() == list(range(N))
    t, b = clip.logit_scale.exp().item(), clip.logit_bias.item()
    scores = -np.log1p(np.exp(-(t * np.concatenate(cos) + b)))
    assert _filter('--data', str(pool / 'pool'), '--model', 'jest-tiny', '--checkpoint', str(pool / 'ref.pt'),
                   '--score', 'sigmoid', '--keep', '0.25', '--batch-size', '32', '--out', str(tmp_path / 'top')) == 0
    kept = _read(str(tmp_path / 'top'))
    assert [r['index'] for r in kept] == _top(scores, 30)
    assert [r[SCORE_COLUMN] for r in kept] == pytest.approx(scores[_top(scores, 30)].tolist(), abs=1e-4)
    assert set(kept[0]) == {'image', 'caption', 'label', 'clean', 'index', SCORE_COLUMN}


def test_jpeg_columns_are_copied_byte_for_byte(pool, tmp_path):
    """A 'jpeg' image column is not re-encoded (which would change its pixels at every filter)."""
    _write_csv(tmp_path / 'captions.csv', _make_folder(tmp_path, n=8))
    convert_folder(tmp_path / 'captions.csv', str(tmp_path / 'jpeg'), image_encoding='jpeg', options=QUIET)
    assert _filter('--data', str(tmp_path / 'jpeg'), '--model', 'jest-tiny', '--checkpoint', str(pool / 'ref.pt'),
                   '--keep', '0.5', '--out', str(tmp_path / 'top')) == 0
    source, kept = _read(str(tmp_path / 'jpeg')), _read(str(tmp_path / 'top'))
    assert len(kept) == 4
    for row in kept:
        assert np.array_equal(np.asarray(row['image']), np.asarray(source[row['index']]['image']))


def test_s3_round_trip(pool, tmp_path, s3_endpoint, monkeypatch):  # noqa: F811
    (tmp_path / 'tmp').mkdir()
    monkeypatch.setattr(tempfile, 'tempdir', str(tmp_path / 'tmp'))  # where the pool's shards are downloaded
    client = s3_endpoint.client()
    for name in os.listdir(pool / 'pool-ref'):
        client.upload_file(str(pool / 'pool-ref' / name), s3_endpoint.bucket, f'pool/{name}')
    data, out = f's3://{s3_endpoint.bucket}/pool', f's3://{s3_endpoint.bucket}/top'
    report = filter_cmd.filter_pool(data, out, keep=0.5, cached=True, track_keys=['clean'],
                                    options=MDSOptions(progress=False))
    assert not [p for p in os.listdir(tmp_path / 'tmp') if 'filter' in p]  # the temporary cache is removed
    ds = StreamingDataset(remote=out, local=str(tmp_path / 'read'), shuffle=False, batch_size=1)
    kept = [ds[i] for i in range(ds.num_samples)]
    del ds
    assert [r['index'] for r in kept] == _top(_cosines(_read(str(pool / 'pool-ref'))), 60)
    keys = {o['Key'] for o in client.list_objects_v2(Bucket=s3_endpoint.bucket, Prefix='top/')['Contents']}
    assert {'top/index.json', 'top/convert_summary.json', f'top/{filter_cmd.REPORT_FILE}',
            f'top/{filter_cmd.HISTOGRAM_FILE}'} <= keys
    stored = json.loads(client.get_object(Bucket=s3_endpoint.bucket, Key=f'top/{filter_cmd.REPORT_FILE}')['Body']
                        .read())
    assert stored['kept'] == report['kept'] == 60
    with pytest.raises(FileExistsError, match='already holds an MDS dataset.*--overwrite'):
        filter_cmd.filter_pool(data, out, keep=0.5, cached=True)
    with pytest.raises(FileNotFoundError, match='no index.json'):
        filter_cmd.filter_pool(f's3://{s3_endpoint.bucket}/nothing', str(tmp_path / 'x'), keep=0.5, cached=True)


def _no_model(*args, **kwargs):
    raise AssertionError('the reference was loaded before the arguments were checked')


@pytest.mark.parametrize('args, message', [
    (['--data', '{missing}', '--keep', '0.3', '--cached'], 'does not exist'),
    (['--data', '{empty}', '--keep', '0.3', '--cached'], 'has no index.json'),
    (['--data', '{pool}/pool', '--keep', '0.3', '--cached'],
     r"no cached reference columns \['ref_image_features', .*embed-reference` writes them"),
    (['--data', '{pool}/pool-ref', '--keep', '0.3', '--cached', '--track-keys', 'nope'],
     "--track-keys 'nope': not a numeric column .*'clean'"),
    (['--data', '{pool}/pool', '--keep', '0.3', '--model', 'jest-tiny', '--checkpoint', '{pool}/ref.pt',
      '--track-keys', 'clean,nope'], "--track-keys 'nope': not a numeric column"),
    (['--data', '{pool}/pool-ref', '--threshold', '2', '--cached'], 'keeps no example'),
    (['--data', '{pool}/pool', '--keep', '0.3', '--model', 'jest-tiny', '--checkpoint', '{pool}/none.pt'],
     'none.pt: no such file'),
    (['--data', '{pool}/pool', '--keep', '0.3', '--model', 'jest-tiny', '--checkpoint', '{pool}/ref.pt',
      '--out', '{pool}/pool'], 'is the pool itself'),
    (['--data', '{pool}/pool', '--keep', '0.3', '--model', 'jest-tiny', '--checkpoint', '{pool}/ref.pt',
      '--out', '{pool}'], 'exists and is not empty; .*--overwrite'),
])
def test_bad_input_is_refused_early(pool, tmp_path, capsys, monkeypatch, args, message):
    (tmp_path / 'empty').mkdir()
    names = {'missing': str(tmp_path / 'missing'), 'empty': str(tmp_path / 'empty'), 'pool': str(pool)}
    args = [a.format(**names) for a in args]
    if '--out' not in args:
        args += ['--out', str(tmp_path / 'out')]
    monkeypatch.setattr(filter_cmd, 'load_reference', _no_model)  # every check runs before the model loads
    assert _filter(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith('composer-jest filter: error: ') and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('args, message', [
    (['--keep', '0.3', '--threshold', '0.1', '--cached'], 'argument --threshold: not allowed with argument --keep'),
    (['--cached'], 'one of the arguments --keep --threshold is required'),
    (['--keep', '0', '--cached'], r'--keep: must be a fraction in \(0, 1\]'),
    (['--keep', '1.5', '--cached'], r'--keep: must be a fraction in \(0, 1\]'),
    (['--keep', '0.3'], 'give the reference: --cached .*or --model NAME with exactly one of --checkpoint'),
    (['--keep', '0.3', '--model', 'jest-tiny'], 'exactly one of --checkpoint FILE and --pretrained'),
    (['--keep', '0.3', '--cached', '--model', 'jest-tiny'], '--cached scores from the ref_\\* columns'),
])
def test_usage_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        _filter('--data', str(tmp_path), '--out', str(tmp_path / 'out'), *args)
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_overwrite_replaces_and_the_api_checks_its_arguments(pool, tmp_path):
    out = str(tmp_path / 'top')
    assert filter_cmd.filter_pool(str(pool / 'pool-ref'), out, keep=1.0, cached=True)['kept'] == N
    report = filter_cmd.filter_pool(str(pool / 'pool-ref'), out, keep=0.1, cached=True,
                                    options=MDSOptions(overwrite=True, progress=False))
    assert report['kept'] == len(_read(out)) == 12
    with pytest.raises(ValueError, match='exactly one of keep .* and threshold'):
        filter_cmd.filter_pool(str(pool / 'pool-ref'), out, cached=True)
    with pytest.raises(ValueError, match=r'keep must be a fraction in \(0, 1\]'):
        filter_cmd.filter_pool(str(pool / 'pool-ref'), out, keep=0.0, cached=True)
    with pytest.raises(ValueError, match=r"score \(--score\) must be one of \('clip', 'sigmoid'\)"):
        filter_cmd.filter_pool(str(pool / 'pool-ref'), out, keep=0.5, cached=True, score='softmax')
    assert set(CACHED_REFERENCE_KEYS) <= set(_read(out)[0])

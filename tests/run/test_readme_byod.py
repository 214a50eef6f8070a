"""README "Bring your own data": its commands, run as written on a tiny image folder (+ parquet), sizes overridden.

Each command of the section's bash block runs in this process through the entry point it names
(``composer-jest ...`` -> :func:`composer_jest.run.cli.main`, ``python -m composer_jest.train ...`` ->
:func:`composer_jest.run.train.main`), from a folder holding the ``mydata/`` the section describes. Training commands
get size overrides appended (a later ``key=value`` wins), nothing else is changed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from convert_helpers import _read
from PIL import Image, ImageDraw
from s3_server import streaming_shm  # noqa: F401  (pytest fixture)

from composer_jest.run import cli, train

ROOT = Path(__file__).parents[2]
CLASSES = ('cat', 'dog', 'bird')
SIZE_OVERRIDES = ['max_duration=2ba', 'eval_interval=2ba', 'global_train_batch_size=4', 'device_eval_batch_size=12',
                  'train_loader.num_workers=0', 'scheduler.t_warmup=1ba']


def readme_commands() -> list[str]:
    """The commands of the README section's bash block (continuation lines joined, comments dropped)."""
    text = (ROOT / 'README.md').read_text()
    section = text[text.index('## Bring your own data'):]
    section = section[:section.find('\n## ', 1)] if '\n## ' in section[1:] else section
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    joined = re.sub(r'\\\n\s*', ' ', block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith('#')]


def _image(i: int) -> bytes:
    """A coloured shape per class (cat: red square, dog: green circle, bird: blue triangle) on a grey field."""
    image = Image.new('RGB', (32, 32), (100 + i % 7, 100, 100))
    draw = ImageDraw.Draw(image)
    box = (6 + i % 5, 6, 24 + i % 5, 24)
    kind = i % 3
    if kind == 0:
        draw.rectangle(box, fill=(220, 30, 30))
    elif kind == 1:
        draw.ellipse(box, fill=(30, 220, 30))
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=(30, 30, 220))
    out = io.BytesIO()
    image.save(out, format='JPEG')
    return out.getvalue()


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def make_mydata(root: Path, pool: int = 48, held_out: int = 12) -> list[str]:
    """``mydata/`` as the README describes it, plus the pool as an img2dataset parquet file.

    Pool: a quarter of the captions name another class; one row's image is missing (a bad row, skipped), and the
    parquet's matching row is a failed download. Curated: the pool's correctly captioned rows. Eval: labelled.
    Returns the captions of the pool's good rows, in order.
    """
    images = root / 'mydata' / 'images'
    images.mkdir(parents=True)
    rows = []
    for i in range(pool + held_out):
        data = _image(i)
        if i != 5:
            (images / f'{i:03d}.jpg').write_bytes(data)
        named = (i % 3 + 1) % 3 if i % 4 == 3 and i < pool else i % 3  # mismatched captions in the pool
        rows.append({'file_name': f'{i:03d}.jpg', 'caption': f'a photo of a {CLASSES[named]}', 'label': i % 3,
                     'data': data, 'clean': int(named == i % 3)})
    plain = lambda rs: [{'file_name': r['file_name'], 'caption': r['caption']} for r in rs]  # noqa: E731
    _write_csv(root / 'mydata' / 'captions.csv', plain(rows[:pool]))
    _write_csv(root / 'mydata' / 'curated.csv', plain([r for r in rows[:pool] if r['clean'] and r['file_name']
                                                       != '005.jpg']))
    _write_csv(root / 'mydata' / 'eval.csv', [{'file_name': r['file_name'], 'caption': r['caption'],
                                               'label': r['label']} for r in rows[pool:]])
    (root / 'mydata' / 'parquet').mkdir()
    pq.write_table(pa.Table.from_pylist([
        {'key': f'{i:09d}', 'jpg': None if i == 5 else r['data'], 'txt': None if i == 5 else r['caption'],
         'status': 'failed_to_download' if i == 5 else 'success', 'error_message': 'timeout' if i == 5 else None}
        for i, r in enumerate(rows[:pool])]), root / 'mydata' / 'parquet' / '00000.parquet')
    return [r['caption'] for i, r in enumerate(rows[:pool]) if i != 5]


def _final_metrics(out: str, run: str) -> dict[str, str]:
    table = out[out.index(f'== {run}: final metrics =='):].split('\n\n')[0].splitlines()[1:]
    return dict(line.rsplit(None, 1) for line in table)


def test_readme_commands_form_the_walkthrough():
    heads = [' '.join(shlex.split(c)[:3]) for c in readme_commands()]
    assert heads == ['.venv/bin/composer-jest convert folder'] * 3 + ['.venv/bin/composer-jest convert parquet'] + [
        '.venv/bin/python -m composer_jest.train', '.venv/bin/composer-jest embed-reference --model'] + [
        '.venv/bin/python -m composer_jest.train'] * 2, heads


def test_bring_your_own_data_walkthrough_runs(tmp_path, monkeypatch, capsys, streaming_shm):  # noqa: F811
    captions = make_mydata(tmp_path)
    (tmp_path / 'yamls').symlink_to(ROOT / 'yamls')
    monkeypatch.chdir(tmp_path)
    for command in readme_commands():
        argv = shlex.split(command)
        if argv[0] == '.venv/bin/composer-jest':
            assert cli.main(argv[1:]) == 0, command
        else:
            assert argv[:3] == ['.venv/bin/python', '-m', 'composer_jest.train'], command
            assert train.main(argv[3:] + SIZE_OVERRIDES) == 0, command
    out = capsys.readouterr().out
    # step 1: bad rows skipped and counted; the parquet pool replaced the folder's, with the same samples
    assert out.count('wrote 47 samples') == 2 and 'no image (column \'jpg\' is null); img2dataset status' in out
    assert [s['caption'] for s in _read('data/my/pool')] == captions
    assert len(_read('data/my/eval')) == 12 and {s['label'] for s in _read('data/my/eval')} == {0, 1, 2}
    # steps 2-3: the reference checkpoint, embedded into every pool sample
    reference = json.loads(Path('data/my/pool-ref/reference.json').read_text())
    assert reference['checkpoint'] == 'runs/my-reference/reference.pt' and reference['num_samples'] == 47
    # step 4: JEST drew 4 of every 20 (cached reference: no reference forward), uniform trained 4 of 4
    jest, uniform = _final_metrics(out, 'my-jest'), _final_metrics(out, 'my-uniform')
    assert (jest['jest/examples_seen'], jest['jest/examples_trained']) == ('40', '8')
    for metrics in (jest, uniform):
        assert 0.0 <= float(metrics['metrics/eval/ZeroShotAccuracy']) <= 1.0
    assert 'jest/examples_seen' not in uniform

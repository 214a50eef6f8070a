"""The embedded default run (`python -m composer_jest.train`): JEST beats uniform on the same noisy pool."""

from __future__ import annotations

from statistics import mean

import pytest

from composer_jest.run.quickstart import RECIPES, STAGES, comparison_table, run_stage

QUIET = ['print_metrics=false', 'metrics_file=null', 'eval_loader.num_samples=256']


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """The quickstart reference, trained shorter (80 of 150 batches: ~0.9 zero-shot on the colours)."""
    folder = tmp_path_factory.mktemp('quickstart-reference')
    result, _ = run_stage('reference', RECIPES / 'quickstart_reference.yaml',
                          [*QUIET, 'max_duration=80ba', 'eval_interval=80ba', 'save_interval=80ba',
                           'scheduler.t_warmup=30ba', f'save_folder={folder}'])
    assert result.zero_shot > 0.6, result  # the reference must know the colours for selection to mean anything
    return folder / 'reference.pt'


@pytest.mark.slow  # ~80 s of CPU: 3 seeds x (uniform + JEST) x 60 steps, and the reference (fixture)
def test_jest_beats_uniform_at_equal_trained_examples_over_3_seeds(reference):
    """The quickstart's learners, reduced (60 of 150 batches), over 3 seeds: JEST trains on cleaner pairs and
    reaches a higher zero-shot accuracy than uniform on every seed, with exactly as many trained examples (measured
    here: gaps of +0.16, +0.61 and +0.32 on 6 colours; the full-length default run ends ~+0.55 apart)."""
    gaps = []
    for seed in (0, 1, 2):
        common = [*QUIET, f'seed={seed}', f'train_loader.shuffle_seed={seed}', 'max_duration=60ba',
                  'eval_interval=60ba', 'scheduler.t_warmup=30ba']
        uniform, _ = run_stage('uniform', RECIPES / 'quickstart_uniform.yaml', common)
        jest, _ = run_stage('jest', RECIPES / 'quickstart.yaml',
                            [*common, f'algorithms.jest.reference={reference}', f'algorithms.jest.seed={seed}'])
        assert jest.examples_trained == uniform.examples_trained == 60 * 32
        assert jest.examples_seen == 4 * jest.examples_trained  # f = 0.75: N = 4b
        assert jest.clean_trained > uniform.clean_trained + 0.15, (jest, uniform)
        gaps.append(jest.zero_shot - uniform.zero_shot)
    assert min(gaps) > 0.05 and mean(gaps) > 0.2, gaps


def test_main_job_prints_the_table_and_writes_the_plot(tmp_path, monkeypatch, capsys):
    """`python -m composer_jest.train` with no yaml, cut to 2 batches a stage: three runs, one table, one PNG."""
    from composer_jest.run.train import main

    monkeypatch.chdir(tmp_path)  # the recipes write and read runs/quickstart-reference/reference.pt
    assert main([*QUIET, 'max_duration=2ba', 'eval_interval=2ba', 'save_interval=2ba', 'metrics_file=null']) == 0
    out = capsys.readouterr().out
    table = out[out.index('== JEST vs uniform'):].splitlines()
    rows = {line.split()[0]: line.split() for line in table[3:6]}
    assert list(rows) == [name for name, _ in STAGES]
    assert rows['uniform'][3] == rows['jest'][3] == str(2 * 32)  # same trained examples
    assert rows['jest'][2] == str(2 * 128) and rows['uniform'][2] == str(2 * 32)  # JEST streamed 4x as many
    assert (tmp_path / 'runs' / 'quickstart' / 'quickstart.png').stat().st_size > 10_000
    # one summary line per evaluation, with JEST's selection statistics on the JEST run
    assert sum(line.startswith('[eval] ba 2/2') for line in out.splitlines()) == 3
    assert 'selected clean' in [line for line in out.splitlines() if line.startswith('[eval]')][-1]


def test_comparison_table_columns():
    from composer_jest.run.quickstart import RunResult

    table = comparison_table([RunResult('jest', [(10, 0.5), (20, 0.9)], 80, 20, 0.25, 0.6, 3.0)])
    assert table.splitlines()[2].split() == ['jest', '0.900', '80', '20', '0.25', '0.60', '3']


def test_shapes_label_names_its_attribute():
    """`label: color` is the quickstart's zero-shot task: the label is the attribute the (clean) caption names."""
    from composer_jest.data.demo.shapes import ShapesDataset, shape_classnames

    for label in ('shape', 'color', 'position'):
        ds = ShapesDataset(16, seed=3, label=label)
        for i in range(16):
            example = ds.example(i)
            name, caption = shape_classnames(label)[example['label']], example['caption']
            assert f' {name}' in f' {caption}', (label, example)  # noise 0: every caption is its own
    with pytest.raises(ValueError, match=r"label must be one of \('shape', 'color', 'position'\), got 'size'"):
        ShapesDataset(4, label='size')

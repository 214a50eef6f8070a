"""Quiet by default: one line per evaluation, the metric stream in a file, no bars or split warnings in logs."""

from __future__ import annotations

import warnings

from composer_jest.data.convert import convert_shapes
from composer_jest.jest.embed_reference import embed_reference
from composer_jest.run.builders import build_trainer
from composer_jest.run.config import load_config


def test_a_yaml_run_prints_one_line_per_eval_and_streams_every_metric_to_a_file(tmp_path, capsys):
    """200 eval examples in batches of 128: the short last batch (72) is evaluated whole, without Composer's
    `Cannot split tensor of length 72 into batches of size 128` warning, and counted."""
    metrics = tmp_path / 'metrics-{rank}.txt'
    cfg = load_config('yamls/quickstart_uniform.yaml', [
        'max_duration=2ba', 'eval_interval=1ba', 'eval_loader.num_samples=200', 'device_eval_batch_size=128',
        f'metrics_file={metrics}', 'print_metrics=false'])
    trainer = build_trainer(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        trainer.fit()
    trainer.close()
    assert not [w for w in caught if 'Cannot split' in str(w.message)]
    zero_shot = trainer.state.eval_metrics['eval']['ZeroShotAccuracy']
    assert int(zero_shot.total) == 200

    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    evals = [line for line in lines if line.startswith('[eval]')]
    assert [line.split(':')[0] for line in evals] == ['[eval] ba 1/2, 32 trained', '[eval] ba 2/2, 64 trained']
    assert f'ZeroShotAccuracy {float(zero_shot.compute()):.3f}' in evals[-1]
    assert not any('[metric]' in line for line in lines + captured.err.splitlines())  # no metric dump
    assert '|' not in captured.err  # no progress bar off a terminal

    stream = (tmp_path / 'metrics-0.txt').read_text()
    assert stream.count('loss/train/total') == 2 and stream.count('metrics/eval/ZeroShotAccuracy') == 2


def test_log_to_console_brings_back_composers_metric_dump(tmp_path, capsys):
    cfg = load_config('yamls/quickstart_uniform.yaml', [
        'max_duration=1ba', 'eval_loader=null', 'metrics_file=null', 'print_metrics=false', 'log_to_console=true',
        'console_log_interval=1ba'])
    trainer = build_trainer(cfg)
    trainer.fit()
    trainer.close()
    captured = capsys.readouterr()
    assert 'loss/train/total' in captured.out + captured.err


def test_embed_reference_draws_its_bar_only_on_a_terminal(tmp_path, capfd):
    convert_shapes(str(tmp_path / 'shapes'), num_samples=32, noise=0.5, seed=4)
    embed_reference('jest-tiny', None, str(tmp_path / 'quiet'), local=str(tmp_path / 'shapes'), batch_size=16)
    assert 'embed-reference' not in capfd.readouterr().err  # stderr is not a terminal under pytest
    embed_reference('jest-tiny', None, str(tmp_path / 'forced'), local=str(tmp_path / 'shapes'), batch_size=16,
                    progress=True)
    assert 'embed-reference' in capfd.readouterr().err

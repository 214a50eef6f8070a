"""One command that checks every GPU path of the package on one CUDA device, in a few minutes.

Prints one ``PASS``/``FAIL`` line per check and a final ``N passed, M failed`` line (exit status 1 on any
failure). Every training run goes through the launcher users use (``composer -n 1 -m composer_jest.train``,
here ``python -m composer.cli.launcher`` so it also works with packages installed by ``--target``), in a
scratch folder, on tiny local MDS shards that stand in for the recipes' ``s3://`` data:

* ``jest-fsdp1-bf16`` / ``jest-fsdp2-bf16``: the quickstart JEST learner under FSDP (``FULL_SHARD``,
  ``mixed_precision: DEFAULT``) with ``amp_bf16`` — the configuration that crashed on step 1 (issue 11);
* ``cached-reference``: ``composer-jest embed-reference`` into the shards, then ``reference: cached``;
* ``flexi-multires``: learner scored at twice the patch size, half of every batch trained at it (FSDP2, bf16);
* ``resume``: save at step 4 of 8, resume, and the selected examples of steps 4..7 equal the uninterrupted run's;
* ``recipe:<name>``: every yaml in ``yamls/`` for a few batches (data, batch sizes and output folders overridden);
* ``step-cost``: ``benchmarks/step_cost.py`` on jest-vit-b-16 in bf16 (its table is printed).

``--device cpu`` runs the same harness on a CPU (fp32, FSDP2 on gloo; FSDP1, the ViT-B/16 recipe and the
step-cost table are skipped) so the script itself is tested without a GPU. ``pytest -m gpu`` runs the same checks
(``tests/test_gpu.py``).

Example::

    python benchmarks/gpu_check.py                     # on a CUDA machine, < 5 minutes
    python benchmarks/gpu_check.py --device cpu --only resume
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / 'composer_jest' / 'run' / 'yamls'
QUIET = ['log_to_console=false', 'print_metrics=false', 'progress_bar=false']


class CheckFailed(AssertionError):
    """A check's own assertion, with what was observed."""


@dataclass
class Context:
    """Scratch folder, device settings, and the artefacts several checks share (built once, on demand)."""

    workdir: Path
    device: str = 'cuda'
    timeout: float = 300.0
    _cache: dict = field(default_factory=dict)

    @property
    def precision(self) -> str:
        return 'amp_bf16' if self.device == 'cuda' else 'fp32'

    def fsdp(self, version: int) -> tuple[list[str], dict[str, str]]:
        """Overrides and environment for FSDP1 or FSDP2 with bf16 mixed precision."""
        overrides = [f'precision={self.precision}',
                     'parallelism_config={fsdp: {sharding_strategy: FULL_SHARD, mixed_precision: DEFAULT}}']
        return overrides, ({'FSDP_VERSION': '2'} if version == 2 else {})

    def run(self, args: list[str], env: dict[str, str] | None = None, name: str = 'run') -> str:
        """Run a command in the scratch folder; raise with the tail of its output when it fails."""
        path = os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')]))
        full_env = {**os.environ, 'PYTHONPATH': path, **(env or {})}
        if self.device == 'cpu':
            full_env.setdefault('OMP_NUM_THREADS', '1')
        proc = subprocess.run(args, cwd=self.workdir, env=full_env, capture_output=True, text=True,
                              timeout=self.timeout)
        log = self.workdir / f'{name}.log'
        log.write_text(proc.stdout + '\n' + proc.stderr)
        if proc.returncode != 0:
            tail = _tail(proc.stdout + proc.stderr)
            raise CheckFailed(f'{name} exited {proc.returncode}; last output ({log}):\n{tail}')
        return proc.stdout

    def train(self, yaml: Path | str, overrides: list[str], env: dict[str, str] | None = None,
              name: str = 'train') -> str:
        launcher = [sys.executable, '-m', 'composer.cli.launcher', '-n', '1',
                    '--stdout', f'{name}-rank{{rank}}.out', '--stderr', f'{name}-rank{{rank}}.err']
        try:
            return self.run([*launcher, '-m', 'composer_jest.run.train', str(yaml), *QUIET, *overrides], env, name)
        except CheckFailed as e:
            errs = ''.join(_tail(p.read_text()) for p in sorted(self.workdir.glob(f'{name}-rank*.err')))
            raise CheckFailed(f'{e}\n{errs}') from None

    def cli(self, *args: str, name: str) -> str:
        return self.run([sys.executable, '-m', 'composer_jest.run.cli', *args], name=name)

    # -- shared artefacts --------------------------------------------------------------------------------
    def reference(self) -> Path:
        """The quickstart reference, trained briefly in bf16 (no FSDP)."""
        if 'reference' not in self._cache:
            folder = self.workdir / 'reference'
            if not (folder / 'reference.pt').is_file():  # a reused --workdir keeps what it built
                self.train(RECIPES / 'quickstart_reference.yaml',
                           ['max_duration=40ba', 'eval_interval=40ba', 'save_interval=40ba', f'save_folder={folder}',
                            f'precision={self.precision}'], name='reference')
            self._cache['reference'] = folder / 'reference.pt'
        return self._cache['reference']

    def shards(self, name: str = 'train') -> Path:
        """Tiny local MDS shapes sets: ``train`` (noisy, 2,048 rows) and ``eval`` (clean, 256 rows)."""
        if name not in self._cache:
            out = self.workdir / 'mds' / name
            n, noise = (2048, 0.5) if name == 'train' else (256, 0.0)
            if not (out / 'index.json').is_file():
                self.cli('convert', 'shapes', '--out', str(out), '--num-samples', str(n), '--noise', str(noise),
                         '--seed', '5' if name == 'train' else '6', '--size-limit', '256kb', '--no-progress',
                         name=f'convert-{name}')
            self._cache[name] = out
        return self._cache[name]

    def cached_shards(self) -> Path:
        """The train shards with the reference's embeddings written in (``embed-reference``)."""
        if 'cached' not in self._cache:
            out = self.workdir / 'mds' / 'train-ref'
            if not (out / 'index.json').is_file():
                self.cli('embed-reference', '--model', 'jest-tiny', '--checkpoint', str(self.reference()),
                         '--local', str(self.shards()), '--out', str(out), '--device', self.device,
                         '--no-progress', name='embed-reference')
            self._cache['cached'] = out
        return self._cache['cached']

    def mds_loaders(self, train: Path, tag: str) -> list[str]:
        """Overrides that point a recipe at the local shards (a fresh cache folder per run); the shards' labels
        are shapes, so zero-shot classifies shapes (the quickstart's own loaders label colours)."""
        loader = 'source: mds, remote: null, num_workers: 0, prefetch_factor: null'
        return [f'train_loader={{{loader}, local: "{train}", shuffle_seed: 3}}',
                f'eval_loader={{{loader}, local: "{self.shards("eval")}", shuffle: false}}',
                'model.classnames=shapes', f'run_name={tag}']


def _tail(text: str, lines: int = 25) -> str:
    return '\n'.join(text.strip().splitlines()[-lines:]) + '\n'


# -- checks -------------------------------------------------------------------------------------------------
def _jest(ctx: Context, name: str, version: int, extra: list[str] = (), steps: int = 20) -> str:
    overrides, env = ctx.fsdp(version)
    return ctx.train(RECIPES / 'quickstart.yaml',
                     [f'algorithms.jest.reference={ctx.reference()}', f'max_duration={steps}ba',
                      f'eval_interval={steps}ba', *overrides, *extra], env, name=name)


def check_jest_fsdp1(ctx: Context) -> str:
    _jest(ctx, 'jest-fsdp1', 1)
    return '20 JEST steps, FSDP1 FULL_SHARD, amp_bf16'


def check_jest_fsdp2(ctx: Context) -> str:
    _jest(ctx, 'jest-fsdp2', 2)
    return '20 JEST steps, FSDP2, amp_bf16'


def check_flexi_multires(ctx: Context) -> str:
    _jest(ctx, 'flexi-multires', 2, ['algorithms.jest.learner_patch_size=16', 'model.low_res_patch_size=16'])
    return 'flexi scoring at patch 16 + multi-resolution training, FSDP2'


def check_cached_reference(ctx: Context) -> str:
    overrides, env = ctx.fsdp(2)
    ctx.train(RECIPES / 'quickstart.yaml',
              ['algorithms.jest.reference=cached', 'max_duration=10ba', 'eval_interval=10ba',
               'global_train_batch_size=32', *ctx.mds_loaders(ctx.cached_shards(), 'cached'), *overrides],
              env, name='cached-reference')
    return 'embed-reference, then 10 JEST steps with reference: cached'


def _selections(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / 'selection-rank0.jsonl').read_text().splitlines()]


def _checkpoint(folder: Path, batch: int) -> Path:
    """The checkpoint saved at ``batch``: a folder (sharded FSDP state) or one file."""
    found = sorted(folder.glob(f'ep0-ba{batch}*'))
    if not found:
        raise CheckFailed(f'no checkpoint for batch {batch} in {folder}: {sorted(p.name for p in folder.glob("*"))}')
    return found[0]


def check_resume(ctx: Context) -> str:
    overrides, env = ctx.fsdp(2)
    base = [f'algorithms.jest.reference={ctx.reference()}', 'max_duration=8ba', 'eval_interval=8ba',
            'save_interval=4ba', 'save_overwrite=true', *overrides]
    runs = {}
    for tag in ('full', 'resumed'):
        out = ctx.workdir / f'resume-{tag}'
        extra = [] if tag == 'full' else [f'load_path={_checkpoint(ctx.workdir / "resume-full" / "checkpoints", 4)}']
        ctx.train(RECIPES / 'quickstart.yaml',
                  [*base, *ctx.mds_loaders(ctx.shards(), f'resume-{tag}'), f'save_folder={out}/checkpoints',
                   f'callbacks={{selection_log: {{folder: "{out}/selections"}}}}', *extra], env, name=f'resume-{tag}')
        runs[tag] = _selections(out / 'selections')
    full, resumed = runs['full'], runs['resumed']
    if [r['step'] for r in resumed] != [4, 5, 6, 7]:
        raise CheckFailed(f'resumed run logged steps {[r["step"] for r in resumed]}, expected [4, 5, 6, 7]')
    for got, want in zip(resumed, full[4:]):
        if got['index'] != want['index'] or got['global_indices'] != want['global_indices']:
            raise CheckFailed(f'step {got["step"]}: resumed selection {got["index"]} != uninterrupted {want["index"]}')
    return 'save at 4 of 8, resume: steps 4-7 select the same examples'


def _recipe_overrides(ctx: Context, name: str) -> list[str]:
    out = ctx.workdir / f'recipe-{name}'
    common = ['max_duration=3ba', 'eval_interval=3ba', f'save_folder={out}/checkpoints', 'save_interval=3ba',
              'save_overwrite=true', 'autoresume=false']
    if name == 'quickstart_reference':
        return common
    if name == 'quickstart':
        return [*common, f'algorithms.jest.reference={ctx.reference()}']
    data = ctx.cached_shards() if name == 'gpu_vit_b16' else ctx.shards()
    common += ctx.mds_loaders(data, f'recipe-{name}')
    if name == 'gpu_vit_b16':  # one GPU: a trained batch of 64 of a 320 super-batch instead of 8 x 512 of 2,560
        return [*common, 'global_train_batch_size=64', 'device_train_microbatch_size=64',
                'device_eval_batch_size=64', 'eval_loader.num_workers=0']
    if name in ('jest', 'quickstart'):
        common.append(f'algorithms.jest.reference={ctx.reference()}')
    return common


def check_recipe(ctx: Context, name: str) -> str:
    yaml = RECIPES / f'{name}.yaml'
    overrides = _recipe_overrides(ctx, name)
    env = {}
    if 'parallelism_config' in yaml.read_text():
        env = {'FSDP_VERSION': '2'} if ctx.device == 'cpu' else {}
        if ctx.device == 'cpu':
            overrides.append('precision=fp32')
    ctx.train(yaml, overrides, env, name=f'recipe-{name}')
    return f'{yaml.name}: 3 batches'


def check_step_cost(ctx: Context) -> str:
    out = ctx.run([sys.executable, str(REPO / 'benchmarks' / 'step_cost.py'), '--device', 'cuda', '--model',
                   'jest-vit-b-16', '--precision', 'amp_bf16', '--batch-size', '256', '--filter-ratios', '0.8',
                   '--steps', '4', '--warmup', '2', '--repeats', '1', '--sampler-sizes', ''], name='step-cost')
    print(out, flush=True)
    return 'jest-vit-b-16 bf16 step-cost table printed above'


def checks(device: str) -> dict[str, Callable[[Context], str]]:
    """Check name -> function; on a CPU, the ones that need CUDA are left out."""
    table: dict[str, Callable[[Context], str]] = {
        'jest-fsdp1-bf16': check_jest_fsdp1,
        'jest-fsdp2-bf16': check_jest_fsdp2,
        'cached-reference': check_cached_reference,
        'flexi-multires': check_flexi_multires,
        'resume': check_resume,
    }
    for yaml in sorted(RECIPES.glob('*.yaml')):
        table[f'recipe:{yaml.stem}'] = lambda ctx, n=yaml.stem: check_recipe(ctx, n)
    table['step-cost'] = check_step_cost
    if device == 'cpu':  # FSDP1 needs CUDA (Composer passes torch.cuda.current_device()); so does the table;
        # ViT-B/16 at 224 px takes over 10 minutes for 3 steps on 2 CPU cores
        for name in ('jest-fsdp1-bf16', 'step-cost', 'recipe:gpu_vit_b16'):
            table.pop(name)
    return table


def run_checks(ctx: Context, names: list[str] | None = None) -> tuple[int, int]:
    table = checks(ctx.device)
    unknown = sorted(set(names or []) - set(table))
    if unknown:
        raise SystemExit(f'unknown checks {unknown}; valid: {sorted(table)}')
    passed = failed = 0
    for name in names or list(table):
        start = time.perf_counter()
        try:
            detail = table[name](ctx)
            passed += 1
            print(f'PASS {name} ({time.perf_counter() - start:.0f} s): {detail}', flush=True)
        except Exception as e:  # noqa: BLE001 — every failure is reported, the next check still runs
            failed += 1
            reason = str(e) if isinstance(e, (CheckFailed, subprocess.TimeoutExpired)) else traceback.format_exc()
            print(f'FAIL {name} ({time.perf_counter() - start:.0f} s): {reason}', flush=True)
    return passed, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--device', default='cuda', choices=('cuda', 'cpu'))
    parser.add_argument('--only', action='append', help='run only this check (repeatable)')
    parser.add_argument('--workdir', default=None, help='scratch folder (default: a new temporary one)')
    parser.add_argument('--timeout', type=float, default=300.0, help='seconds per command')
    args = parser.parse_args(argv)
    if args.device == 'cuda':
        import torch  # noqa: PLC0415

        if not torch.cuda.is_available():
            raise SystemExit('no CUDA device: run on a GPU machine, or pass --device cpu to test the harness')
        print(f'device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}', flush=True)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='gpu-check-'))
    workdir.mkdir(parents=True, exist_ok=True)
    passed, failed = run_checks(Context(workdir, args.device, args.timeout), args.only)
    print(f'{passed} passed, {failed} failed', flush=True)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

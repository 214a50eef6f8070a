"""Tables and plots of the compute study (:mod:`benchmarks.compute_study`), from the saved runs only.

Per (model, pool), with ``target`` = uniform's final zero-shot (mean over its seeds, smoothed over 3 evaluations as
:func:`learning_efficiency.smooth`) and uniform's budget ``B`` (its final FLOPs / CPU seconds / examples):

- *to match*: the first FLOPs (CPU seconds, examples trained) where a run's smoothed curve reaches ``target``,
  divided by uniform's ``B``; ``all-in`` adds the one-off costs the method needs -- the reference's training and
  the pool embedding pass (offline filtering and JEST with cached embeddings; uniform and oracle need none);
- *at equal FLOPs*: a run's smoothed accuracy at ``B`` FLOPs (its curve interpolated; every run is long enough), and
  ``all-in`` at ``B`` minus its one-off costs (``spent`` if those alone exceed ``B``).
- *final*: at the base number of steps (runs that train longer to reach ``B`` are read at the same step as uniform).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import learning_efficiency as le
import numpy as np

NOISE_X = {'bad10': 0.1, 'dev': 0.4, 'bad70': 0.69}  # fraction of bad captions; 'dups' (none bad) plotted apart


def _final(run: dict, metric: str) -> float:
    c = [p for p in run['curve'] if p['step'] <= run['base_steps']]
    return float(le.smooth([p[metric] for p in c])[-1])


def _at(run: dict, xkey: str, x0: float, metric: str = 'zero_shot') -> Optional[float]:
    """The run's smoothed ``metric`` at ``x0`` on its ``xkey`` axis (``None`` outside the curve)."""
    x = np.array([p[xkey] for p in run['curve']], float)
    if x0 < x[0] or x0 > x[-1] * 1.01:  # 1%: uniform seeds' budgets differ by their caption lengths
        return None
    x0 = min(x0, x[-1])
    return float(np.interp(x0, x, le.smooth([p[metric] for p in run['curve']])))


def _stat(values: Sequence[Optional[float]]) -> dict[str, Any]:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return {'mean': float(np.mean(v)) if v else None, 'std': float(np.std(v, ddof=1)) if len(v) > 1 else None,
            'n': len(v), 'of': len(values)}


def _budget(uniform: Sequence[dict]) -> dict[str, float]:
    """Uniform's budget: its FLOPs, CPU seconds and examples at its last base step (mean over seeds)."""
    return {k: float(np.mean([[p for p in r['curve'] if p['step'] == r['base_steps']][0][k] for r in uniform]))
            for k in ('flops', 'cpu', 'examples_trained')}


def at_budget(runs: dict[str, list[dict]], name: str) -> list[Optional[float]]:
    """Each seed of ``name``: smoothed zero-shot at uniform's FLOP budget (run cost; ``None``: the curve ends short)."""
    flops = _budget(runs['uniform'])['flops']
    return [_at(r, 'flops', flops) for r in runs[name]]


def analyse(runs: dict[str, list[dict]], ref: dict[str, Any]) -> dict[str, Any]:
    """Per-method statistics of one (model, pool) (see the module docstring)."""
    uniform = runs['uniform']
    target = float(np.mean([_final(r, 'zero_shot') for r in uniform]))
    budget = _budget(uniform)
    one_off = {'flops': ref['train_flops'] + ref['embed_flops'], 'cpu': ref['train_cpu'] + ref['embed_cpu']}
    rows = {}
    for name, seeds in runs.items():
        uses_ref = seeds[0]['uses_reference']  # pays the reference's training and the embedding pass
        per: dict[str, list] = {}
        for r in seeds:
            c = r['curve']
            y = [p['zero_shot'] for p in c]
            vals = {'final': _final(r, 'zero_shot'), 'final_i2t': _final(r, 'i2t_r1'), 'final_t2i': _final(r, 't2i_r1')}
            for key, bkey in (('examples_trained', 'examples_trained'), ('flops', 'flops'), ('cpu', 'cpu')):
                hit = le.crossing([p[key] for p in c], y, target)
                vals[f'{bkey}_to_match'] = None if hit is None else hit / budget[bkey]
                if bkey in one_off:
                    extra = one_off[bkey] if uses_ref else 0.0
                    vals[f'{bkey}_to_match_all'] = None if hit is None else (hit + extra) / budget[bkey]
            vals['at_flops'] = _at(r, 'flops', budget['flops'])
            vals['at_flops_i2t'] = _at(r, 'flops', budget['flops'], 'i2t_r1')
            rest = budget['flops'] - (one_off['flops'] if uses_ref else 0.0)
            vals['at_flops_all'] = _at(r, 'flops', rest) if rest > 0 else None
            sel = r['selection'].get('selected', {})
            vals['selected_clean'] = sel.get('clean', r['pool_clean_fraction'])
            for k, v in vals.items():
                per.setdefault(k, []).append(v)
        rows[name] = {'agg': {k: _stat(v) for k, v in per.items()}, 'seeds': [r['seed'] for r in seeds],
                      'superbatch': seeds[0]['superbatch'], 'steps': seeds[0]['steps'], 'uses_reference': uses_ref,
                      'per_seed_final': per['final'], 'per_seed_at_flops': per['at_flops']}
    return {'target': target, 'budget': budget, 'one_off': one_off,
            'one_off_vs_budget': {k: one_off[k] / budget[k] for k in one_off},
            'reference_final': ref['final'], 'rows': rows}


def _f(a: dict, digits: int = 2, pct: bool = False) -> str:
    if a['mean'] is None:
        return 'not reached' if a['of'] else '–'
    s = 100.0 if pct else 1.0
    text = f"{a['mean'] * s:.{digits}f}"
    if a['std'] is not None:
        text += f"±{a['std'] * s:.{digits}f}"
    if a['n'] < a['of']:
        text += f" ({a['n']}/{a['of']})"
    return text


def table(res: dict[str, Any]) -> str:
    head = ('| method | seeds | N | steps | final zero-shot % | i2t R@1 % | t2i R@1 % | examples to match (× uniform) '
            '| FLOPs to match | FLOPs to match, all-in | CPU s to match | CPU s to match, all-in '
            '| zero-shot % at uniform\'s FLOPs | same, all-in | selected clean % |')
    lines = [head, '|---|' + '---:|' * 14]
    spent = res['one_off']['flops'] >= res['budget']['flops']
    for name, row in res['rows'].items():
        a = row['agg']
        all_in = 'one-off > budget' if spent and row['uses_reference'] else _f(a['at_flops_all'], 1, True)
        lines.append(
            f"| {name} | {len(row['seeds'])} | {row['superbatch']} | {row['steps']} | {_f(a['final'], 1, True)} | "
            f"{_f(a['final_i2t'], 1, True)} | {_f(a['final_t2i'], 1, True)} | {_f(a['examples_trained_to_match'])} | "
            f"{_f(a['flops_to_match'])} | {_f(a['flops_to_match_all'])} | {_f(a['cpu_to_match'])} | "
            f"{_f(a['cpu_to_match_all'])} | {_f(a['at_flops'], 1, True)} | {all_in} | "
            f"{_f(a['selected_clean'], 1, True)} |")
    oo = res['one_off_vs_budget']
    lines.append('')
    lines.append(f"Uniform's final zero-shot (the target): {res['target']:.1%}; its budget "
                 f"{res['budget']['flops']:.3g} FLOPs, {res['budget']['cpu']:.0f} CPU s. One-off costs (reference "
                 f"training + pool embedding pass): {oo['flops']:.2f}x uniform's FLOPs, {oo['cpu']:.2f}x its CPU "
                 f"seconds; reference zero-shot {res['reference_final']['zero_shot']:.1%}.")
    return '\n'.join(lines)


def _m(res: dict, name: str, key: str) -> tuple[Optional[float], Optional[float]]:
    a = res['rows'].get(name, {}).get('agg', {}).get(key)
    return (a['mean'], a['std']) if a else (None, None)


def goals(res: dict[str, Any], best: str) -> str:
    """The issue's two goals on the dev pool, stated from the table."""
    lines = []
    for key, label, goal in (('flops_to_match', 'FLOPs', 0.5), ('cpu_to_match', 'process CPU time', 0.6)):
        m, sd = _m(res, best, key)
        m_all, _ = _m(res, best, key + '_all')
        if m is None:
            lines.append(f"- {best}: never reached uniform's final accuracy ({label}-to-match goal <= {goal}x): "
                         'NOT met.')
            continue
        lines.append(f"- {best} {label}-to-match: {m:.2f}x uniform (±{sd or 0:.2f}); with the reference's training "
                     f"and the embedding pass counted {m_all:.2f}x. Goal <= {goal}x: "
                     f"{'met' if m <= goal else 'NOT met'} (run cost), "
                     f"{'met' if m_all <= goal else 'NOT met'} (all-in).")
    one = res['one_off_vs_budget']['flops']
    m, _ = _m(res, best, 'flops_to_match')
    if m is not None and m < 1:
        lines.append(f'- amortisation: the one-off costs ({one:.2f}x a uniform run) are paid back after '
                     f'{one / (1 - m):.1f} uniform-sized runs that reuse the reference and its embeddings.')
    jest = res['rows'][best]
    for off in ('offline-0.5', 'offline-0.2'):
        if off not in res['rows']:
            continue
        for key, label in (('at_flops', 'run cost'), ('at_flops_all', 'all-in')):
            j, js = _m(res, best, key)
            o, os_ = _m(res, off, key)
            if j is None or o is None:
                why = ('the one-off costs alone exceed the budget' if key == 'at_flops_all'
                       and res['one_off']['flops'] >= res['budget']['flops'] else 'a curve does not reach the budget')
                lines.append(f'- equal FLOPs ({label}) vs {off}: not comparable ({why}).')
                continue
            seeds = f'{len(jest["seeds"])} vs {len(res["rows"][off]["seeds"])} seeds'
            if js is None and os_ is None:
                lines.append(f'- equal FLOPs ({label}): {best} {j:.1%} vs {off} {o:.1%} ({j - o:+.1%}; {seeds}: no '
                             'seed spread to compare with, undecided).')
                continue
            spread = max(js or 0.0, os_ or 0.0)
            verdict = 'ahead by more than' if j - o > spread else ('behind by more than' if o - j > spread
                                                                   else 'within')
            diff = paired(res, best, off) if key == 'at_flops' else _stat([])
            by_seed = (f'; paired by seed {diff["mean"]:+.1%} ± {diff["std"] or 0:.1%} over {diff["n"]}'
                       if diff['mean'] is not None else '')
            lines.append(f'- equal FLOPs ({label}): {best} {j:.1%} vs {off} {o:.1%} ({j - o:+.1%}; {verdict} the '
                         f'seed spread {spread:.1%}, {seeds}{by_seed}).')
    return '\n'.join(lines)


def paired(res: dict[str, Any], a: str, b: str) -> dict[str, Any]:
    """Per-seed difference of zero-shot at uniform's FLOPs (run cost), ``a`` minus ``b``, over the seeds both have
    (the same seed is the same initialisation and data order): mean, sample std, seed count."""
    if a not in res['rows'] or b not in res['rows']:
        return _stat([])
    at = {name: dict(zip(res['rows'][name]['seeds'], res['rows'][name]['per_seed_at_flops'])) for name in (a, b)}
    both = sorted(set(at[a]) & set(at[b]))
    return _stat([at[a][sd] - at[b][sd] if at[a][sd] is not None and at[b][sd] is not None else None for sd in both])


def pool_summary(results: dict[str, dict], model: str = 'proportional') -> str:
    """Every method against uniform and the offline filters (plain and distilled) on every pool: paired
    differences at uniform's FLOPs."""
    import compute_study as cs  # noqa: PLC0415

    against = ('uniform', 'offline-0.5', 'offline-0.5-distill')
    lines = ["| pool | method | seeds | zero-shot % at uniform's FLOPs | "
             + ' | '.join(f'Δ vs {a} (paired)' for a in against) + ' | FLOPs to match |',
             '|---|---|' + '---:|' * (3 + len(against))]
    for pool in cs.POOLS:
        res = results.get(f'{model}/{pool}')
        if not res:
            continue
        for name, row in res['rows'].items():
            if name == 'uniform':
                continue
            deltas = ['–' if name == a or a not in res['rows'] else _f(paired(res, name, a), 1, True) for a in against]
            lines.append(f"| {pool} | {name} | {len(row['seeds'])} | {_f(row['agg']['at_flops'], 1, True)} | "
                         + ' | '.join(deltas) + f" | {_f(row['agg']['flops_to_match'])} |")
    return '\n'.join(lines)


def best_row(res: dict[str, Any]) -> str:
    """Issue 30's goal: the best row at uniform's FLOPs (run cost) against uniform and every offline-filter row,
    by the seed spread and paired by seed."""
    rows = {k: v for k, v in res['rows'].items() if k != 'oracle' and v['agg']['at_flops']['mean'] is not None}
    best = max(rows, key=lambda k: rows[k]['agg']['at_flops']['mean'])
    m, sd = _m(res, best, 'at_flops')
    u, usd = _m(res, 'uniform', 'at_flops')
    spread = max(sd or 0.0, usd or 0.0)
    d = paired(res, best, 'uniform')
    lines = [f'- best row at uniform\'s FLOPs (run cost): {best} {m:.1%} (±{sd or 0:.1%}) vs uniform {u:.1%} '
             f'(±{usd or 0:.1%}): {m - u:+.1%}, {(m - u) / spread if spread else math.inf:.1f}x the larger seed '
             f'spread (goal > 3x: {"met" if m - u > 3 * spread else "NOT met"}); paired by seed '
             f'{d["mean"]:+.1%} ± {d["std"] or 0:.1%}.']
    for off in (k for k in rows if k != best and k.startswith('offline')):
        o, osd = _m(res, off, 'at_flops')
        spread = max(sd or 0.0, osd or 0.0)
        d = paired(res, best, off)
        verdict = 'ahead by more than' if m - o > spread else 'within'
        lines.append(f'- {best} vs {off} ({o:.1%} ± {osd or 0:.1%}): {m - o:+.1%}, {verdict} the seed spread '
                     f'{spread:.1%}; paired by seed {d["mean"]:+.1%} ± {d["std"] or 0:.1%} over {d["n"]}.')
    return '\n'.join(lines)


def plot_curves(runs: dict[str, list[dict]], res: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(17, 4.8))
    for ax, (xkey, metric, xlabel) in zip(axs, (('flops', 'zero_shot', 'FLOPs (training + scoring)'),
                                                ('cpu', 'zero_shot', 'process CPU s (training + scoring)'),
                                                ('flops', 'i2t_r1', 'FLOPs (training + scoring)'))):
        for i, (name, seeds) in enumerate(runs.items()):
            n = min(len(r['curve']) for r in seeds)
            x = np.mean([[p[xkey] for p in r['curve'][:n]] for r in seeds], 0)
            ys = np.array([le.smooth([p[metric] for p in r['curve'][:n]]) for r in seeds])
            color = plt.cm.tab20(i % 20)  # up to 20 rows, each its own colour
            steered = seeds[0]['spec'].get('loss', 'sigmoid') != 'sigmoid' or seeds[0]['spec'].get('prefilter')
            ax.plot(x, ys.mean(0), color=color, label=f'{name} ({len(seeds)} seeds)',
                    ls=':' if name == 'oracle' else '--' if steered else '-')
            if len(seeds) > 1:
                ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.12)
        ax.axvline(res['budget'][xkey], color='k', lw=0.8, ls=':', label="uniform's budget")
        if metric == 'zero_shot':
            ax.axhline(res['target'], color='grey', lw=0.8, ls=':', label="uniform's final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric.replace('_', ' '))
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=7)
    fig.suptitle(f'{title}; smoothed over 3 evaluations, band = seed min-max; one-off costs not on the x axis')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_noise(results: dict[str, dict], methods: Sequence[str], path: Path) -> None:
    """Noise on x, FLOPs-to-match (all-in and run cost) and accuracy at equal FLOPs on y, one line per method."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axs = plt.subplots(1, 3, figsize=(17, 4.8))
    panels = (('flops_to_match_all', "FLOPs to match uniform, all-in (x uniform)"),
              ('flops_to_match', 'FLOPs to match uniform, run cost only (x uniform)'),
              ('at_flops', "zero-shot at uniform's FLOPs minus uniform's (run cost)"))
    for ax, (key, label) in zip(axs, panels):
        for i, name in enumerate(methods):
            xs, ys, es = [], [], []
            for pool, x in sorted(NOISE_X.items(), key=lambda kv: kv[1]):
                res = results.get(pool)
                m, sd = _m(res, name, key) if res else (None, None)
                if m is None:
                    continue
                if key == 'at_flops':
                    m -= _m(res, 'uniform', 'at_flops')[0]
                xs.append(x), ys.append(m), es.append(sd or 0.0)
            ax.errorbar(xs, ys, yerr=es, marker='o', color=f'C{i}', label=name, capsize=3)
            dup = results.get('dups')
            m, sd = _m(dup, name, key) if dup else (None, None)
            if m is not None:
                if key == 'at_flops':
                    m -= _m(dup, 'uniform', 'at_flops')[0]
                ax.errorbar([0.0], [m], yerr=[sd or 0.0], marker='s', color=f'C{i}', capsize=3, ls='none')
        ax.axhline(0.0 if key == 'at_flops' else 1.0, color='k', lw=0.8, ls=':')
        ax.set_xlabel('bad captions (0.4: 30k dev pool; others: 17k sub-pools; square: 25% near dups only)',
                      fontsize=8)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=8)
    fig.suptitle('Where JEST stops paying (proportional model; never-reached points are missing)')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def analyse_all(study: Any, seeds: Sequence[int], quick: bool = False) -> dict[str, Any]:
    """Analyse every (model, pool) with saved runs; write compute_study.{json,md} and the PNGs."""
    import compute_study as cs

    out = study.out
    results: dict[str, dict] = {}
    md = []
    for model in ('proportional', 'benchmark'):
        for pool in cs.POOLS:
            runs = study.runs(model, pool, seeds)
            ref_path = out / 'references' / f'{model}_{pool}.json'
            if 'uniform' not in runs or not ref_path.is_file():
                continue
            order = [m for m in cs.METHODS if m in runs]
            runs = {m: runs[m] for m in order}
            res = analyse(runs, json.loads(ref_path.read_text()))
            results[f'{model}/{pool}'] = res
            name = f'curves_{model}_{pool}.png'
            plot_curves(runs, res, out / name, f'{model} model, {pool} pool')
            md += [f'### {model} model, {pool} pool', '', table(res), '', f'Curves: `{name}`', '']
    dev = results.get('proportional/dev')
    if dev:
        jest = {k: v for k, v in dev['rows'].items() if cs.METHODS[k].plain_jest}
        if jest:
            best = min(jest, key=lambda k: (jest[k]['agg']['flops_to_match']['mean'] or math.inf))
            md += ['### goals (proportional model, dev pool)', '', goals(dev, best), best_row(dev), '']
            noise = {p: results[f'proportional/{p}'] for p in cs.POOLS if f'proportional/{p}' in results}
            base = ('uniform', 'offline-0.5', 'offline-0.2')
            others = sorted({m for p, r in noise.items() if p != 'dev' for m in r['rows']} - set(base))
            methods = [m for m in (*base, *others) if any(m in r['rows'] for r in noise.values())]
            if len(noise) > 1:
                plot_noise(noise, methods, out / 'noise.png')
                md += ['Noise sweep: `noise.png`', '', '### every pool: paired differences at uniform\'s FLOPs', '',
                       pool_summary(results), '']
    if not results:
        raise SystemExit(f'compute_study: no saved runs with a uniform row and a reference under {out} (run the '
                         'study first, or give --out the folder it wrote)')
    (out / 'compute_study.json').write_text(json.dumps(results, indent=1, default=float))
    (out / 'compute_study.md').write_text('\n'.join(md) + '\n')
    print('\n'.join(md))
    return results

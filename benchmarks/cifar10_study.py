r"""The CIFAR-10 masking study: pre-train with each mask, evaluate each encoder, compare.

  python benchmarks/cifar10_study.py --preset smoke                 # 2-core CPU, minutes
  python benchmarks/cifar10_study.py --preset full --dry_run --img_per_s 20000  # the plan, nothing run
  python benchmarks/cifar10_study.py --preset full --out study_full  # one GPU; rerun to resume
  python benchmarks/cifar10_study.py --preset full --strategies random,green --seeds 0,1 --finetune

For every strategy and seed (same model, budget and seed across strategies) it pre-trains
(``configs/cifar10.py``, with the kNN monitor on), then evaluates the final encoder with a
weighted kNN and the MAE linear probe (fast mode: features extracted once, no augmentation),
and with ``--finetune`` by fine-tuning. Every part resumes from its checkpoints, so the
study can run across several calls with a time limit each (``--time_budget_s``). Writes
``OUT/results.json``, ``OUT/results.md`` (a markdown table) and ``OUT/study.png`` (accuracy
per strategy, and kNN accuracy over pre-training epochs).

Data: the device-resident pipeline (``data.pipeline='device'``: CIFAR-10 decoded once, kept on
the accelerator, cropped and flipped there), for pre-training, the kNN monitor and the probe's
features; fine-tuning's RandAugment stays on the host (grain).

The ``full`` preset is sized to a wall-clock budget (``--window_s``, default 15 minutes of one
GPU) at a pre-training throughput ``--img_per_s``: the epochs per run are what is left of the budget after the
estimated fixed costs (:data:`OVERHEAD_S`), split evenly over the runs, and FAMT's schedule
(AMT: first update after 41 of 200 epochs, then every 40) and the warm-up scale with them. The
default ``--img_per_s`` is an ESTIMATE (ViT-Ti/4, bf16, one H200) until
``benchmarks/bench_step.py`` measures it there; if the real rate is lower the budget ends early
and rerunning the same command (same ``--img_per_s``: the plan must not change) resumes.
"""
from __future__ import annotations

import ast
import json
import math
import os
import sys
import time

from absl import app, flags, logging

from colormae_jax import config_lib, defaults
from colormae_jax.tools import absl_help

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs')

STRATEGIES = ('random', 'red', 'blue', 'green', 'purple', 'amt', 'famt')
# Arms that are a strategy with settings: AMT is FAMT without the frequency guidance (and with the crop alignment).
ARMS = {'amt': ('famt', {'mask.famt.freq_weight': 0.0})}

_PRESET = flags.DEFINE_enum('preset', 'smoke', ['smoke', 'full'], 'smoke: CPU minutes; full: one GPU.')
_STRATEGIES = flags.DEFINE_list('strategies', list(STRATEGIES), f'Subset of {STRATEGIES}, run in this order.')
_SEEDS = flags.DEFINE_list('seeds', ['0'], 'Seeds (repeats).')
_OUT = flags.DEFINE_string('out', 'study_out', 'Output folder (workdirs, results; study_out/ is git-ignored).')
DEFAULT_ROOT = '../shared/data/cifar10'
_ROOT = flags.DEFINE_string('root', DEFAULT_ROOT, 'CIFAR-10 folder (<root>/{train,test}/<class>/*; the default is read '
                            'from the repository root when the working directory lacks it).')
_DATA_DIR = flags.DEFINE_string('data_dir', '',
                                 'Where array_record files are prepared (default ~/tensorflow_datasets).')
_FINETUNE = flags.DEFINE_bool('finetune', False, 'Also fine-tune every encoder.')
_BUDGET = flags.DEFINE_float('time_budget_s', 0.0, 'Stop (resumably) after this many seconds; 0: no limit.')
_OVERRIDES = flags.DEFINE_multi_string('set', [], 'Pre-training config overrides KEY=VALUE (python literal).')
_EVAL_OVERRIDES = flags.DEFINE_multi_string('eval_set', [], 'Evaluation config overrides KEY=VALUE.')
_IMG_PER_S = flags.DEFINE_float('img_per_s', 20000.0, 'Pre-training img/s the full preset is sized by: an ESTIMATE '
                                '(ViT-Ti/4 bf16, one H200) until benchmarks/bench_step.py measures it on the GPU.')
_WINDOW_S = flags.DEFINE_float('window_s', 900.0, 'The wall-clock budget (s) the full preset is sized to.')
_DRY_RUN = flags.DEFINE_bool('dry_run', False, 'Print the planned epochs, images and time per run; run nothing.')

CIFAR10_TRAIN = 50000
# Fixed costs of the full preset in its budget (estimates): the machine and imports, then per run the
# compilations, the decoded split placed, the kNN monitor and the linear probe.
OVERHEAD_S = {'start': 120.0, 'per_run': 45.0}

# The smoke preset on the CPU, fitted to the smoke study measured on a 2-core CPU VM (2026-11-29,
# docs/benchmarks.md: 2 min 9 s for the 7 runs): the start, each run (compilations, 40 steps, two kNN
# monitors, the probe), and the weight pass of FAMT and AMT over the 50,000 training images.
SMOKE_CPU_S = {'start': 8.0, 'per_run': 12.0, 'famt_pass': 18.0}
TI4_CPU_IMG_PER_S = 110.0  # ViT-Ti/4 pre-training on that VM (README, 2026-11-29): what the full preset costs there

# Pre-training per preset. smoke: a tiny model, a few steps; full: ViT-Ti/4 in bf16 on the 200-epoch recipe of
# configs/cifar10.py, its epochs then sized to the window by plan() (26 for the 7 runs at the default estimate).
PRETRAIN = {
    'smoke': {'model.variant': 'mu/4', 'model.decoder.width': 32, 'model.decoder.depth': 1, 'model.decoder.heads': 2,
              'batch_size': 64, 'total_steps': 40, 'warmup_steps': 4, 'base_lr': 1e-2, 'log_every_steps': 10,
              'ckpt.every_steps': 20, 'image_summary_every_epochs': 0.0, 'knn.every_epochs': 20 / 781,
              'knn.max_train': 2000, 'knn.max_test': 500, 'mask.famt.warmup_steps': 20,
              'mask.famt.update_every_steps': 20, 'mask.famt.update_batch_size': 512},
    'full': {'model.variant': 'Ti/4', 'model.compute_dtype': 'bfloat16', 'batch_size': 256, 'total_epochs': 200.0,
             'warmup_epochs': 10.0, 'knn.every_epochs': 20.0, 'knn.batch_size': 1024,
             'ckpt.every_steps': 2000, 'log_every_steps': 200, 'mask.famt.warmup_epochs': 41.0,
             'mask.famt.update_every_epochs': 40.0, 'mask.famt.update_batch_size': 1024},
}
for _p in PRETRAIN.values():
    _p['data.pipeline'] = 'device'
EVAL = {
    'smoke': {'linear_probe': {'data.pipeline': 'device'}, 'finetune': {}},
    'full': {'linear_probe': {'total_epochs': 100.0, 'batch_size': 1024, 'data.pipeline': 'device'},
             'finetune': {'total_epochs': 50.0, 'data.num_workers': 12}},
}


def plan(preset: str, runs: int, img_per_s: float, window_s: float) -> dict:
    """Epochs per run and the estimate: ``full`` fills ``window_s`` at ``img_per_s`` (see the module doc)."""
    if preset == 'full':
        train_s = window_s - OVERHEAD_S['start'] - runs * OVERHEAD_S['per_run']
        epochs = max(1, math.floor(train_s * img_per_s / (runs * CIFAR10_TRAIN)))
        images = epochs * CIFAR10_TRAIN
    else:
        p = PRETRAIN['smoke']
        epochs, images = p['total_steps'] * p['batch_size'] / CIFAR10_TRAIN, p['total_steps'] * p['batch_size']
    train_s = images / img_per_s
    return {'epochs': epochs, 'images': images, 'pretrain_s': train_s, 'run_s': train_s + OVERHEAD_S['per_run'],
            'total_s': OVERHEAD_S['start'] + runs * (train_s + OVERHEAD_S['per_run'])}


def _full_schedule(epochs: int) -> dict:
    """The full preset's durations for ``epochs``: the 200-epoch recipe's proportions (warm-up 10,
    FAMT's first update before epoch 41 then every 40, kNN every 20)."""
    f = epochs / 200.0
    return {'total_epochs': float(epochs), 'warmup_epochs': 10.0 * f, 'knn.every_epochs': 20.0 * f,
            'mask.famt.warmup_epochs': 41.0 * f, 'mask.famt.update_every_epochs': 40.0 * f}


def _runs() -> int:
    return len(_STRATEGIES.value) * len(_SEEDS.value)


def dry_run(backend: str) -> str:
    """The plan, costed for ``backend`` (jax.default_backend()): the smoke preset at the CPU's measured
    times (its cost on an accelerator is unmeasured), the full preset at ``--img_per_s``."""
    runs = f"{_runs()} runs ({','.join(_STRATEGIES.value)} x seeds {','.join(_SEEDS.value)})"
    if _PRESET.value == 'smoke':
        p = PRETRAIN['smoke']
        what = f"{p['total_steps']} steps of {p['batch_size']} = {p['total_steps'] * p['batch_size']:,} images"
        cpu = {s: SMOKE_CPU_S['per_run'] + (SMOKE_CPU_S['famt_pass'] if s in ('famt', 'amt') else 0.0)
               for s in _STRATEGIES.value}
        total = SMOKE_CPU_S['start'] + len(_SEEDS.value) * sum(cpu.values())
        basis = ('on this cpu backend, at the times measured on a 2-core CPU VM (2026-11-29: 2 min 9 s for the 7 '
                 'runs)' if backend == 'cpu' else f'on {backend}: unmeasured there, the times are those of a 2-core '
                 f'CPU VM (2026-11-29), an upper bound')
        lines = [f'preset smoke: {runs}, {basis}']
        for s in _STRATEGIES.value:
            for seed in _SEEDS.value:
                lines.append(f"  {s}/seed{seed}: {what}, about {cpu[s]:.0f} s (compilations, kNN monitor, probe"
                             f"{', FAMT weight pass' if s in ('famt', 'amt') else ''})")
        lines.append(f"total: about {total:.0f} s ({total / 60:.1f} min, {SMOKE_CPU_S['start']:.0f} s start "
                     f"included)")
        return '\n'.join(lines)
    p = plan('full', _runs(), _IMG_PER_S.value, _WINDOW_S.value)
    rate = ('given by --img_per_s' if flags.FLAGS['img_per_s'].present else
            'the default: an estimate for ViT-Ti/4 in bf16 on one H200, unmeasured; --img_per_s sets it')
    sch = _full_schedule(p['epochs'])
    lines = [f'preset full: {runs}, at {_IMG_PER_S.value:g} img/s ({rate}), budget {_WINDOW_S.value:g} s',
             f"{p['epochs']:g} epochs per mask: the 200-epoch recipe of configs/cifar10.py scaled to the budget "
             f"(warm-up {sch['warmup_epochs']:.3g}, kNN every {sch['knn.every_epochs']:.3g}, FAMT's weights before "
             f"epoch {sch['mask.famt.warmup_epochs']:.3g}, then every {sch['mask.famt.update_every_epochs']:.3g})"]
    for s in _STRATEGIES.value:
        for seed in _SEEDS.value:
            lines.append(f"  {s}/seed{seed}: {p['epochs']:g} epochs = {p['images']:,.0f} images, pre-training "
                         f"{p['pretrain_s']:.0f} s + {OVERHEAD_S['per_run']:.0f} s compile/kNN/probe")
    lines.append(f"total: {p['total_s']:.0f} s ({p['total_s'] / 60:.1f} min, {OVERHEAD_S['start']:.0f} s start "
                 f"included)")
    if backend == 'cpu':
        hours = _runs() * p['images'] / TI4_CPU_IMG_PER_S / 3600
        lines.append(f'this backend is cpu: the full preset is sized for one GPU; ViT-Ti/4 pre-trains at about '
                     f'{TI4_CPU_IMG_PER_S:g} img/s on a 2-core CPU VM, so these runs would take about {hours:.0f} h '
                     f'here (the smoke preset is the CPU one)')
    return '\n'.join(lines)


def data_root() -> str | None:
    """--root, or the default read from the repository root when the working directory is elsewhere;
    None (after one error line) when it is not a CIFAR-10 folder."""
    root = _ROOT.value
    if not flags.FLAGS['root'].present and not os.path.isdir(root):
        root = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', DEFAULT_ROOT))
    if os.path.isdir(os.path.join(root, 'train')):
        return root
    shown = root if os.path.isabs(root) else f'{root} (read from the working directory, {os.getcwd()})'
    sys.stderr.write(f'error: --root {shown}: no train/ folder in it; give the CIFAR-10 folder '
                     f'(<root>/{{train,test}}/<class>/*.jpg) as an absolute path, e.g. --root=/data/cifar10\n')
    return None


def _set(c, key: str, value) -> None:
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
        node = node[p]
    node[leaf] = value


def pretrain_config(arm: str, seed: int):
    smoke = _PRESET.value == 'smoke'
    strategy, settings = ARMS.get(arm, (arm, {}))
    c = config_lib.load_config_file(os.path.join(CONFIGS, 'cifar10.py') + f':mask={strategy},root={_root()}'
                                    + (',smoke' if smoke else ''))
    sized = {}
    if not smoke:
        sized = _full_schedule(plan('full', _runs(), _IMG_PER_S.value, _WINDOW_S.value)['epochs'])
    for k, v in {**PRETRAIN[_PRESET.value], **sized, **settings}.items():
        _set(c, k, v)
    c.seed = seed
    c.data.data_dir = _DATA_DIR.value
    c = _apply(c, _OVERRIDES.value)
    if strategy == 'famt' and not any(o.startswith('mask.schedule=') for o in _OVERRIDES.value):
        c.mask.schedule = defaults.famt_schedule(c.mask.famt)  # AMT's phases, FAMT from the first weight update
    return c


def _apply(c, items):
    """KEY=VALUE overrides; VALUE is a python literal, or else a string."""
    for item in items:
        k, _, v = item.partition('=')
        try:
            v = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            pass
        _set(c, k, v)
    return c


def eval_config(task: str, init_from: str, seed: int):
    smoke = _PRESET.value == 'smoke'
    c = config_lib.load_config_file(os.path.join(CONFIGS, 'cifar10_eval.py') + f':task={task},root={_root()}'
                                    + (',smoke' if smoke else ''))
    for k, v in EVAL[_PRESET.value][task].items():
        _set(c, k, v)
    c.init_from, c.seed = init_from, seed
    c.data.data_dir = _DATA_DIR.value
    return _apply(c, _EVAL_OVERRIDES.value)


class OutOfTime(Exception):
    pass


def run_study(out: str) -> dict:
    from colormae_jax import main
    t_start = time.perf_counter()
    results = {}
    path = os.path.join(out, 'results.json')
    if os.path.exists(path):
        with open(path) as f:
            results = json.load(f).get('runs', {})

    def remaining() -> int | None:
        if not _BUDGET.value:
            return None
        left = _BUDGET.value - (time.perf_counter() - t_start)
        if left < 30:
            raise OutOfTime()
        return left

    for strategy in _STRATEGIES.value:
        if strategy not in STRATEGIES:
            raise app.UsageError(f'--strategies: unknown {strategy!r}; valid: {STRATEGIES}')
        for seed in map(int, _SEEDS.value):
            key = f'{strategy}/seed{seed}'
            r = results.get(key, {})
            wd = os.path.join(out, 'runs', strategy, f'seed{seed}')
            remaining()
            if 'pretrain_s' not in r:
                t0 = time.perf_counter()
                left = remaining()
                res = main.run(pretrain_config(strategy, seed), os.path.join(wd, 'pretrain'),
                                               deadline=None if left is None else time.time() + left - 20)
                # stopped by the time budget or SIGTERM (during the final kNN too): resume next call
                if res['step'] < res['trainer'].total_steps or res.get('preempted'):
                    raise OutOfTime()
                r['pretrain_s'] = round(time.perf_counter() - t0, 1)
                r['pretrain_steps'] = res['step']
                r['final_loss'] = res['losses'][-1] if res['losses'] else None
            knn_curve = os.path.join(wd, 'pretrain', 'knn.jsonl')
            if os.path.exists(knn_curve):
                with open(knn_curve) as f:
                    r['knn_curve'] = [json.loads(line) for line in f if line.strip()]
            tasks = ['linear_probe'] + (['finetune'] if _FINETUNE.value else [])
            for task in tasks:
                if f'{task}_done' in r:
                    continue
                remaining()
                left = remaining()
                ev = main.run(eval_config(task, os.path.join(wd, 'pretrain'), seed),
                                              os.path.join(wd, task),
                                              deadline=None if left is None else time.time() + left - 20)
                if ev.get('step', 0) < ev.get('total_steps', 0) or ev.get('preempted'):
                    raise OutOfTime()
                r.update(ev['results'])
                r[f'{task}_done'] = True
            results[key] = r
            _write(out, results)
    return results


def _summary(results: dict) -> dict:
    import numpy as np
    table = {}
    for key, r in results.items():
        strategy = key.split('/')[0]
        for metric in ('linear/top1', 'knn/cls_top1', 'knn/mean_top1', 'finetune/top1'):
            if r.get(metric) is not None:
                table.setdefault(strategy, {}).setdefault(metric, []).append(r[metric])
    return {s: {m: (float(np.mean(v)), float(np.std(v)), len(v)) for m, v in ms.items()} for s, ms in table.items()}


def _write(out: str, results: dict) -> None:
    import jax
    os.makedirs(out, exist_ok=True)
    summary = _summary(results)
    meta = {'preset': _PRESET.value, 'seeds': _SEEDS.value, 'strategies': _STRATEGIES.value,
            'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}',
            'command': ' '.join(sys.argv)}
    with open(os.path.join(out, 'results.json'), 'w') as f:
        json.dump({'meta': meta, 'summary': summary, 'runs': results}, f, indent=1)
    metrics = ['linear/top1', 'knn/cls_top1', 'knn/mean_top1'] + (['finetune/top1'] if _FINETUNE.value else [])
    lines = [f"Preset `{meta['preset']}` on {meta['device']}, seeds {','.join(meta['seeds'])}: `{meta['command']}`",
             '', '| strategy | ' + ' | '.join(metrics) + ' | pre-train s |',
             '| --- |' + ' ---: |' * (len(metrics) + 1)]
    for s in [x for x in STRATEGIES if x in summary]:
        cells = []
        for m in metrics:
            v = summary[s].get(m)
            cells.append('' if v is None else (f'{v[0]:.2f}' if v[2] == 1 else f'{v[0]:.2f} ± {v[1]:.2f}'))
        secs = [r.get('pretrain_s') for k, r in results.items() if k.startswith(s + '/') and r.get('pretrain_s')]
        cells.append(f'{sum(secs) / len(secs):.0f}' if secs else '')
        lines.append(f'| {s} | ' + ' | '.join(cells) + ' |')
    with open(os.path.join(out, 'results.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    _plot(out, results, summary)


def _plot(out: str, results: dict, summary: dict) -> None:
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning('matplotlib is missing (pip install -e ".[plots]"): no plot')
        return
    colours = {'random': 'grey', 'red': 'red', 'blue': 'blue', 'green': 'green', 'purple': 'purple', 'amt': 'brown',
               'famt': 'orange'}
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    names = [s for s in STRATEGIES if s in summary]
    for j, m in enumerate(('linear/top1', 'knn/cls_top1')):
        vals = [summary[s].get(m, (float('nan'), 0, 0)) for s in names]
        xs = [i + 0.4 * j for i in range(len(names))]
        a.bar(xs, [v[0] for v in vals], 0.38, yerr=[v[1] for v in vals], label=m,
              color=[colours[s] for s in names], alpha=1.0 if j == 0 else 0.5)
    a.set_xticks([i + 0.2 for i in range(len(names))], names)
    a.set_ylabel('top-1 (%)')
    a.set_title('linear probe (solid), kNN on [CLS] (light)')
    for key, r in results.items():
        curve = r.get('knn_curve') or []
        if curve:
            s = key.split('/')[0]
            b.plot([p['epoch'] for p in curve], [p['knn/cls_top1'] for p in curve], marker='o', color=colours[s],
                   label=key)
    b.set_xlabel('pre-training epoch')
    b.set_ylabel('kNN top-1 (%)')
    b.set_title('kNN monitor during pre-training')
    if b.lines:
        b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'study.png'), dpi=100)
    plt.close(fig)


_RESOLVED: dict = {}


def _root() -> str:
    return _RESOLVED.get('root', _ROOT.value)


def main(argv):
    del argv
    if _DRY_RUN.value:
        import jax
        logging.set_verbosity(logging.WARNING)  # JAX's INFO about a missing libtpu
        print(dry_run(jax.default_backend()))
        return
    root = data_root()
    if root is None:
        sys.exit(2)
    _RESOLVED['root'] = root
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= 30 or ('/orbax/' not in r.pathname and '/grain/' not in r.pathname))
    try:
        results = run_study(_OUT.value)
    except OutOfTime:
        print(f'time budget reached; rerun the same command to resume ({_OUT.value})')
        return
    with open(os.path.join(_OUT.value, 'results.md')) as f:
        print(f.read())
    print(f'wrote {_OUT.value}/results.json, results.md, study.png ({len(results)} runs)')


if __name__ == '__main__':
    absl_help()
    app.run(main)

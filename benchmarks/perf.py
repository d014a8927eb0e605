r"""The performance harness: one command, on whatever backend it finds.

  python benchmarks/perf.py                          # GPU: ViT-B/16 at 224, decoder 8x512, batch 256
  python benchmarks/perf.py --tiny                   # CPU check of the harness itself (seconds)

1. Times the pre-training step for each row of the grid (mask random / green / FAMT
   0.45+0.40, bf16 / fp32, attention 'xla' / 'cudnn', remat off / on): img/s, step ms, peak
   device memory, FLOPs per image (analytic, checked against XLA's cost analysis), and MFU
   = analytic FLOPs x img/s / a bf16 matmul rate measured in the same run.
2. Runs the PyTorch reference (``--torch_ref``; eager and ``--compile``) on the same device
   and prints the ratios.
3. Measures the input pipeline alone (grain, JPEG decode + RandomResizedCrop at the image
   size, img/s per worker count) on generated JPEGs, and the data-wait share of a real
   training loop on them.
4. Writes ``benchmarks/results/<device>.json`` (after every measurement, so a run cut short
   keeps what it measured) and prints a markdown table. ``--budget_s`` skips what would start
   after that many seconds (skipped rows are listed as such).

Installs nothing; everything it needs is installed beforehand.
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from colormae_jax.tools import absl_help

import benchlib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/imagenet.py', 'Base config (model, decoder, data).')
_TINY = flags.DEFINE_bool('tiny', False, 'Tiny shapes (mu/4 at 32, batch 16): checks the harness on a CPU.')
_BATCH = flags.DEFINE_integer('batch', 256, 'Global batch for the step timings.')
_GRID = flags.DEFINE_enum('grid', 'core', ['core', 'full'], "'core': the rows that answer the targets; "
                          "'full': every combination.")
_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per row.')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps per row (compilation included).')
_TORCH_REF = flags.DEFINE_string('torch_ref', '../shared/bench/torch_mae_ref.py', 'PyTorch reference script.')
_NO_TORCH = flags.DEFINE_bool('no_torch', False, 'Skip the PyTorch reference.')
_INPUT = flags.DEFINE_bool('input', True, 'Measure the input pipeline and the data-wait share.')
_WORKERS = flags.DEFINE_list('workers', ['0', '4', '8', '15'], 'grain worker counts to time.')
_JPEGS = flags.DEFINE_integer('jpegs', 2000, 'Generated JPEGs for the input measurements.')
_OUT = flags.DEFINE_string('out', 'benchmarks/results', 'Folder for <device>.json.')
_ONLY = flags.DEFINE_string('only', '', 'Run only grid rows whose name contains this.')
_BUDGET = flags.DEFINE_integer('budget_s', 0, 'Start nothing new after this many seconds (0: no limit).')
T0 = time.monotonic()


def left_s() -> float:
    """Seconds of --budget_s left (inf without a budget)."""
    return _BUDGET.value - (time.monotonic() - T0) if _BUDGET.value else float('inf')


SKIPPED = 'skipped: --budget_s spent'


def grid(full: bool, gpu: bool) -> list[dict]:
    """Rows: dicts of overrides with a name."""
    attn = ('xla', 'cudnn') if gpu else ('xla',)
    if full:
        rows = [dict(mask=m, dtype=d, attn=a, remat=r) for m in ('random', 'green', 'famt')
                for d in ('bfloat16', 'float32') for a in attn for r in (False, True)
                if not (a == 'cudnn' and d == 'float32')]  # cuDNN flash attention needs 16-bit inputs
    else:
        best = attn[-1]
        rows = [dict(mask='random', dtype='bfloat16', attn=a, remat=False) for a in attn]
        rows += [dict(mask='random', dtype='float32', attn='xla', remat=False),
                 dict(mask='random', dtype='bfloat16', attn=best, remat=True),
                 dict(mask='green', dtype='bfloat16', attn=best, remat=False),
                 dict(mask='famt', dtype='bfloat16', attn=best, remat=False)]
    for r in rows:
        r['name'] = f"{r['mask']}/{'bf16' if r['dtype'] == 'bfloat16' else 'fp32'}/{r['attn']}" + (
            '/remat' if r['remat'] else '')
    return rows


def row_config(base, row: dict):
    import copy
    c = copy.deepcopy(base)
    c.mask.strategy = row['mask']
    c.mask.ratio, c.mask.throw_ratio = (0.45, 0.40) if row['mask'] == 'famt' else (0.75, 0.0)
    c.model.compute_dtype = row['dtype']
    c.model.attn_impl = row['attn']
    c.model.remat = row['remat']
    c.batch_size = _BATCH.value if not _TINY.value else 16
    c.mesh = (('data', -1), ('fsdp', 1))
    return c


def base_config():
    c = _CONFIG.value
    if _TINY.value:
        c.data.image_size = 32
        c.model.variant = 'mu/4'
        c.model.decoder.update(width=32, depth=1, heads=2)
    return c


def input_measurements(base, tmp: str, steps_rate: float | None) -> dict:
    """grain alone per worker count, then the data-wait share of a short real training run."""
    import numpy as np
    from PIL import Image

    from colormae_jax import main
    root = os.path.join(tmp, 'jpegs')
    rng = np.random.default_rng(0)
    n = _JPEGS.value
    for i in range(n):  # ImageNet-like sizes and content (smooth colour fields + noise)
        h, w = (375, 500) if i % 3 else (500, 375)
        d = os.path.join(root, 'train', f'c{i % 10}')
        os.makedirs(d, exist_ok=True)
        base_img = rng.integers(0, 256, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(base_img).resize((w, h), Image.BILINEAR)
        img.save(os.path.join(d, f'{i:05d}.jpg'), quality=90)
    data_cfg = base.data
    data_cfg.source, data_cfg.root, data_cfg.data_dir = 'folder', root, os.path.join(tmp, 'tfds')
    data_cfg.split = 'train'
    out = {'jpegs': n, 'jpeg_size': '500x375', 'image_size': int(data_cfg.image_size), 'pipeline': []}
    bs = min(256, n // 4)
    for w in map(int, _WORKERS.value):
        data_cfg.num_workers = w
        r = benchlib.time_input(data_cfg, batch_size=bs, batches=max(4, min(40, n // bs - 2)))
        out['pipeline'].append(r)
        print(f"input pipeline: {r['img_per_s']:.0f} img/s with {w} workers", flush=True)
    best = max(out['pipeline'], key=lambda r: r['img_per_s'])
    data_cfg.num_workers = best['workers']
    c = row_config(base, dict(mask='random', dtype='bfloat16', attn='auto', remat=False))
    c.data = data_cfg
    c.batch_size = bs
    c.total_steps, c.warmup_steps = 30 if not _TINY.value else 6, 1
    c.log_every_steps, c.ckpt.every_steps, c.image_summary_every_epochs = 10, 10 ** 6, 0.0
    c.knn.every_epochs = 0.0
    res = main.run(c, os.path.join(tmp, 'wd'))
    out['train_loop'] = {'steps': res['step'], 'batch': bs, 'workers': best['workers'],
                         'loop_s': round(res['loop_seconds'], 2), 'data_wait_s': round(res['data_wait_seconds'], 2),
                         'data_wait_share': round(res['data_wait_seconds'] / max(res['loop_seconds'], 1e-9), 4)}
    print(f"training loop: data wait {100 * out['train_loop']['data_wait_share']:.1f}% of the loop "
          f"({best['workers']} workers, batch {bs})", flush=True)
    if steps_rate:
        out['needed_img_per_s'] = steps_rate
    return out


def main(argv):
    del argv
    import jax

    from colormae_jax.models import mae as model
    gpu = jax.default_backend() == 'gpu'
    dev = jax.devices()[0]
    base = base_config()
    result = {'device': f'{jax.device_count()}x {dev.device_kind}', 'backend': jax.default_backend(),
              'jax': jax.__version__, 'variant': base.model.variant, 'image_size': base.data.image_size,
              'decoder': dict(base.model.decoder), 'rows': [], 'command': ' '.join(sys.argv)}
    os.makedirs(_OUT.value, exist_ok=True)
    fname = os.path.join(_OUT.value, re.sub(r'[^A-Za-z0-9_.-]+', '_', result['device']) +
                         ('_tiny' if _TINY.value else '') + '.json')

    def save():
        result['seconds'] = round(time.monotonic() - T0, 1)
        with open(fname + '.tmp', 'w') as f:
            json.dump(result, f, indent=1)
        os.replace(fname + '.tmp', fname)

    peak = benchlib.matmul_tflops('bfloat16', n=8192 if gpu else 1024, repeats=20 if gpu else 3)
    result['bf16_matmul_tflops'] = round(peak, 2)
    print(f"bf16 matmul: {peak:.1f} TFLOP/s", flush=True)
    for row in grid(_GRID.value == 'full', gpu):
        if _ONLY.value and _ONLY.value not in row['name']:
            continue
        if left_s() <= 0:
            result['rows'].append(dict(row, error=SKIPPED))
            continue
        c = row_config(base, row)
        try:
            r = benchlib.time_step(c, steps=_STEPS.value, warmup=_WARMUP.value, repeats=1)
        except Exception as e:  # noqa: BLE001 - a row that fails (e.g. no cuDNN kernel) is reported, not fatal
            r = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
        r.update(row)
        if 'img_per_s' in r:
            flops_img = r['analytic_gflops_per_step'] * 1e9 / c.batch_size
            r['analytic_gflops_per_img'] = float(f'{flops_img / 1e9:.4g}')
            r['mfu'] = round(flops_img * r['img_per_s'] / (peak * 1e12), 4)
            r['xla_vs_analytic'] = round(r['xla_gflops_per_step'] / max(r['analytic_gflops_per_step'], 1e-9), 3)
        result['rows'].append(r)
        print(json.dumps(r), flush=True)
        save()
    name, patch = model.parse_variant(base.model.variant)
    if not _NO_TORCH.value and name in ('Ti', 'S', 'B', 'L', 'H'):
        for comp in (False, True):
            if left_s() <= 0:
                result.setdefault('torch', []).append({'impl': 'torch-' + ('compile' if comp else 'eager'),
                                                       'error': SKIPPED})
                continue
            t = benchlib.torch_reference(_TORCH_REF.value, variant=name, image=base.data.image_size, patch=patch,
                                         batch=_BATCH.value, dec=dict(base.model.decoder), mask_ratio=0.75,
                                         steps=_STEPS.value, warmup=_WARMUP.value, compile_=comp,
                                         timeout=int(min(600, max(30, left_s()))))
            if t:
                result.setdefault('torch', []).append(t)
                print(json.dumps(t), flush=True)
                save()
    if _INPUT.value and left_s() > 0:
        best = max((r for r in result['rows'] if 'img_per_s' in r), key=lambda r: r['img_per_s'], default=None)
        with tempfile.TemporaryDirectory() as tmp:
            result['input'] = input_measurements(base, tmp, best['img_per_s'] if best else None)
    save()
    print(table(result))
    print(f'wrote {fname}')


def table(result: dict) -> str:
    lines = [f"{result['variant']} @ {result['image_size']}, decoder {result['decoder']}, on {result['device']} "
             f"(bf16 matmul {result['bf16_matmul_tflops']} TFLOP/s)", '',
             '| row | img/s | step ms | peak GB | GFLOP/img (analytic) | XLA / analytic | MFU | mask ms |',
             '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
    for r in result['rows']:
        if 'img_per_s' not in r:
            lines.append(f"| {r['name']} | {'' if r['error'].startswith('skipped') else 'failed: '}"
                         f"{r['error'][:80]} |||||||")
            continue
        lines.append(f"| {r['name']} | {r['img_per_s']} | {r['step_ms']} | {r['mem_gb']} | "
                     f"{r['analytic_gflops_per_img']} | {r['xla_vs_analytic']} | {100 * r['mfu']:.1f}% | "
                     f"{r['mask_ms']} |")
    best = {r['mask']: r for r in sorted((r for r in result['rows'] if 'img_per_s' in r),
                                         key=lambda r: r['img_per_s'])}
    for t in result.get('torch', []):
        if 'img_per_s' in t and 'random' in best:
            lines.append(f"\n{t['impl']}: {t['img_per_s']} img/s; best JAX random row / {t['impl']} = "
                         f"{best['random']['img_per_s'] / t['img_per_s']:.2f}")
        elif 'error' in t:
            lines.append(f"\n{t['impl']}: failed ({t['error'][:120]})")
    if 'famt' in best and 'random' in best:
        lines.append(f"FAMT (0.45 + throw 0.40) / random (0.75) img/s: "
                     f"{best['famt']['img_per_s'] / best['random']['img_per_s']:.2f}")
    if 'input' in result:
        i = result['input']
        lines.append('input pipeline (img/s by workers): ' +
                     ', '.join(f"{p['workers']}: {p['img_per_s']}" for p in i['pipeline']))
        lines.append(f"data wait in a training loop: {100 * i['train_loop']['data_wait_share']:.1f}%")
    return '\n'.join(lines)


if __name__ == '__main__':
    absl_help()
    app.run(main)

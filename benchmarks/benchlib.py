"""Timing helpers shared by the benchmark scripts (not a test, not part of the package)."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

import numpy as np


def write_json(path: str, obj) -> None:
    """Writes a benchmark's result to ``path`` (indented JSON), making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(obj, f, indent=1)

def make_step(config, mesh=None):
    """(trainer, strategy, jitted step, state, synthetic uint8 batch, aux) for ``config``: the batch
    has crop boxes and, for FAMT, random weights, so every strategy runs its real path. The
    model's forms are fixed when the step is first traced."""
    import jax

    from colormae_jax import masking, parallel
    from colormae_jax.masking import famt
    from colormae_jax.tasks import pretrain

    mesh = mesh or parallel.make_mesh(config.mesh)
    t = pretrain.make_trainer(config, mesh, steps_per_epoch=1000)
    strategy = masking.create(config.mask, t.mae.grid)
    aux = jax.device_put(strategy.init_aux(jax.random.PRNGKey(1)), parallel.replicated(mesh))
    step = pretrain.compile_step(t, strategy, jax.tree.map(lambda _: parallel.replicated(mesh), aux))
    state = pretrain.init_state(t)
    n, s, g = config.batch_size, config.data.image_size, t.mae.grid
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), 'index': np.arange(n, dtype=np.int32),
             'crop': np.tile(np.asarray([[0.1, 0.1, 0.8, 0.8]], np.float32), (n, 1)),
             'flip': rng.random(n) < 0.5}
    if isinstance(strategy, famt.FAMTMasking):
        batch[famt.WEIGHT_KEY] = rng.random((n, g * g)).astype(np.float32)
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    return t, strategy, step, state, batch, aux


def time_step(config, *, steps: int, warmup: int, repeats: int, mesh=None) -> dict:
    """Times the jitted pre-training step of ``config`` on a synthetic uint8 batch (see :func:`make_step`)."""
    import jax

    t, strategy, step, state, batch, aux = make_step(config, mesh)
    n = config.batch_size
    t0 = time.perf_counter()
    for _ in range(warmup):
        state, m = step(state, batch, aux)
    jax.block_until_ready(m)
    warm_s = time.perf_counter() - t0
    best = float('inf')
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, m = step(state, batch, aux)
        jax.block_until_ready(m)
        best = min(best, (time.perf_counter() - t0) / steps)
    mask_ms = time_mask(strategy, batch, aux)
    try:  # XLA's count for the whole step (forward, backward, optimizer)
        flops = float(step.lower(state, batch, aux).compile().cost_analysis()['flops'])
    except Exception:  # noqa: BLE001 - not every backend reports it
        flops = float('nan')
    dev = jax.devices()[0]
    stats = dev.memory_stats() or {}
    if 'peak_bytes_in_use' in stats:
        mem, mem_kind = stats['peak_bytes_in_use'] / 2 ** 30, 'device peak'
    else:
        mem, mem_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 'host RSS peak'
    c = strategy.counts
    return {'impl': 'colormae_jax', 'device': f'{jax.device_count()}x {dev.device_kind}', 'batch': n,
            'step_ms': round(best * 1e3, 2), 'img_per_s': round(n / best, 1), 'mem_gb': round(mem, 2),
            'mem_kind': mem_kind, 'compile_and_warmup_s': round(warm_s, 1), 'loss': float(m['loss']),
            'xla_gflops_per_step': round(flops / 1e9, 2),
            'analytic_gflops_per_step': round(n * mae_train_flops(t.mae, c.visible, c.masked) / 1e9, 2),
            'mask': strategy.name, 'mask_ms': round(mask_ms, 3), 'mask_share': round(mask_ms / (best * 1e3), 5)}


def time_mask(strategy, batch, aux, repeats: int = 20) -> float:
    """ms to make one batch's masks (scores + top_k partition) alone, jitted."""
    import jax
    f = jax.jit(lambda k, b, a: strategy(k, b, a))
    jax.block_until_ready(f(jax.random.PRNGKey(0), batch, aux))
    t0 = time.perf_counter()
    for i in range(repeats):
        out = f(jax.random.PRNGKey(i), batch, aux)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / repeats * 1e3


def _block_flops(tokens: int, width: int, mlp: int) -> float:
    """Forward FLOPs of one pre-norm transformer block on ``tokens`` tokens (matmuls only:
    qkv, attention scores and values, projection, MLP; 2 FLOPs per multiply-add)."""
    return 2 * tokens * (3 * width * width + width * width + 2 * width * mlp) + 2 * 2 * tokens * tokens * width


def mae_train_flops(c, visible: int, masked: int) -> float:
    """Analytic training FLOPs per image of an MAE step: 3x the forward matmul FLOPs
    (forward + the two backward products). Thrown tokens appear nowhere."""
    enc = 2 * visible * c.patch_dim * c.width + c.depth * _block_flops(1 + visible, c.width, c.mlp_dim)
    dec_tokens = 1 + visible + masked
    dec = (2 * (1 + visible) * c.width * c.dec_width
           + c.dec_depth * _block_flops(dec_tokens, c.dec_width, c.dec_width * c.dec_mlp_ratio)
           + 2 * masked * c.dec_width * c.patch_dim)
    return 3.0 * (enc + dec)


def matmul_tflops(dtype: str = 'bfloat16', n: int = 8192, repeats: int = 10) -> float:
    """Measured dense matmul rate (TFLOP/s) of the default device, for MFU."""
    import jax
    import jax.numpy as jnp
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: (x @ y).astype(dtype))
    jax.block_until_ready(f(a, a))
    t0 = time.perf_counter()
    for _ in range(repeats):
        out = f(a, a)
    jax.block_until_ready(out)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def torch_reference(script: str, *, variant: str, image: int, patch: int, batch: int, dec: dict, mask_ratio: float,
                    steps: int, warmup: int, compile_: bool = False, timeout: int = 600) -> dict | None:
    """Runs ``../shared/bench/torch_mae_ref.py`` (same device) and returns its JSON line, or
    None when torch or the script is missing; an error is returned as {'error': ...}."""
    if not os.path.exists(script):
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    cmd = [sys.executable, script, '--variant', variant, '--img', str(image), '--patch', str(patch), '--batch',
           str(batch), '--steps', str(steps), '--warmup', str(warmup), '--dec-dim', str(dec['width']),
           '--dec-depth', str(dec['depth']), '--dec-heads', str(dec['heads']), '--mask-ratio', str(mask_ratio)]
    if compile_:
        cmd.append('--compile')
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=timeout)
        res = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, ValueError, IndexError) as e:
        return {'impl': 'torch-' + ('compile' if compile_ else 'eager'), 'error': str(e)[-500:], 'cmd': ' '.join(cmd)}
    res['cmd'] = ' '.join(cmd)
    return res


def time_input(data_cfg, *, batch_size: int, batches: int, seed: int = 0) -> dict:
    """The grain pipeline alone (decode, RandomResizedCrop, flip, batch), in img/s."""
    from colormae_jax.data import pipeline as data
    it = data.make_train_iterator(data_cfg, global_batch_size=batch_size, seed=seed)
    try:
        next(it)  # workers started, first batch in
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        it.close()
    return {'batches': batches, 'batch': batch_size, 'workers': int(data_cfg.num_workers),
            'image_size': int(data_cfg.image_size), 'img_per_s': round(batches * batch_size / dt, 1)}

r"""Times the pre-training step of a config on the current backend (not a test).

Prints a table and writes JSON: img/s, step ms and peak memory for our jitted step, and,
when torch is installed, the same for ../shared/bench/torch_mae_ref.py with the same model
sizes, plus the ratio.

  python benchmarks/bench_step.py --config configs/cifar10.py --steps 10 --out bench_results/cpu.json
  python benchmarks/bench_step.py --config configs/imagenet.py --config.batch_size=256   # GPU
"""
import json
import os
import resource
import subprocess
import sys
import time

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Config to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps (compilation included).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows; the best is reported.')
_TORCH_REF = flags.DEFINE_string('torch_ref', '../shared/bench/torch_mae_ref.py', 'PyTorch reference script.')
_NO_TORCH = flags.DEFINE_bool('no_torch', False, 'Skip the PyTorch reference.')
_OUT = flags.DEFINE_string('out', '', 'Write the JSON here too.')
_INPUT_BATCHES = flags.DEFINE_integer('input_batches', 0, 'Also time the grain input pipeline alone over this '
                                      'many batches of the config\'s data (0: skip).')


def time_jax(config) -> dict:
    import jax
    import numpy as np
    from colormae_jax import masking, parallel, train

    mesh = parallel.make_mesh(config.mesh)
    t = train.make_trainer(config, mesh, steps_per_epoch=1000)
    strategy = masking.create(config.mask, t.mae.grid)
    aux = jax.device_put(strategy.init_aux(jax.random.PRNGKey(1)), parallel.replicated(mesh))
    step = train.compile_step(t, strategy, jax.tree.map(lambda _: parallel.replicated(mesh), aux))
    state = train.init_state(t)
    n, s = config.batch_size, config.data.image_size
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (n, s, s, 3), dtype=np.uint8), 'index': np.arange(n, dtype=np.int32)}
    batch = jax.device_put(batch, parallel.batch_sharding(mesh))
    t0 = time.perf_counter()
    for _ in range(_WARMUP.value):
        state, m = step(state, batch, aux)
    jax.block_until_ready(m)
    warm_s = time.perf_counter() - t0
    best = float('inf')
    for _ in range(_REPEATS.value):
        t0 = time.perf_counter()
        for _ in range(_STEPS.value):
            state, m = step(state, batch, aux)
        jax.block_until_ready(m)
        best = min(best, (time.perf_counter() - t0) / _STEPS.value)
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
    return {'impl': 'colormae_jax', 'device': f'{jax.device_count()}x {dev.device_kind}', 'batch': n,
            'step_ms': round(best * 1e3, 2), 'img_per_s': round(n / best, 1), 'mem_gb': round(mem, 2),
            'mem_kind': mem_kind, 'compile_and_warmup_s': round(warm_s, 1), 'loss': float(m['loss']),
            'gflops_per_step': round(flops / 1e9, 2), 'mask': strategy.name, 'mask_ms': round(mask_ms, 3), 'mask_share': round(mask_ms / (best * 1e3), 5)}


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


def time_input(config) -> dict | None:
    """The grain pipeline alone (decode, RandomResizedCrop, flip, batch), in img/s."""
    if not _INPUT_BATCHES.value:
        return None
    from colormae_jax import data
    it = data.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=0)
    try:
        next(it)  # workers started, first batch in
        t0 = time.perf_counter()
        for _ in range(_INPUT_BATCHES.value):
            next(it)
        dt = time.perf_counter() - t0
    finally:
        it.close()
    return {'batches': _INPUT_BATCHES.value, 'batch': config.batch_size, 'workers': config.data.num_workers,
            'img_per_s': round(_INPUT_BATCHES.value * config.batch_size / dt, 1)}


def time_torch(config) -> dict | None:
    from colormae_jax import model
    if _NO_TORCH.value or not os.path.exists(_TORCH_REF.value):
        return None
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    name, patch = model.parse_variant(config.model.variant)
    if name not in ('Ti', 'S', 'B', 'L', 'H'):
        return None
    d = config.model.decoder
    cmd = [sys.executable, _TORCH_REF.value, '--variant', name, '--img', str(config.data.image_size),
           '--patch', str(patch), '--batch', str(config.batch_size), '--steps', str(_STEPS.value * _REPEATS.value),
           '--warmup', str(_WARMUP.value), '--dec-dim', str(d.width), '--dec-depth', str(d.depth),
           '--dec-heads', str(d.heads), '--mask-ratio', str(config.mask.ratio)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res['cmd'] = ' '.join(cmd)
    return res


def main(argv):
    del argv
    config = _CONFIG.value
    rows = [r for r in (time_jax(config), time_torch(config)) if r]
    result = {'variant': config.model.variant, 'image_size': config.data.image_size,
              'decoder': dict(config.model.decoder), 'compute_dtype': config.model.compute_dtype,
              'mask_ratio': config.mask.ratio, 'results': rows}
    inp = time_input(config)
    if inp:
        result['input_pipeline'] = inp
    if len(rows) == 2:
        result['speedup_vs_torch'] = round(rows[0]['img_per_s'] / rows[1]['img_per_s'], 3)
    print(f"\n{config.model.variant} @ {config.data.image_size}px, decoder {dict(config.model.decoder)}, "
          f"batch {config.batch_size}, {config.model.compute_dtype}")
    print(f"{'impl':<16}{'device':<28}{'step ms':>10}{'img/s':>10}{'mem GB':>9}{'mask ms':>9}")
    for r in rows:
        print(f"{r['impl']:<16}{str(r['device']):<28}{r['step_ms']:>10}{r['img_per_s']:>10}{str(r['mem_gb']):>9}"
              f"{str(r.get('mask_ms', '')):>9}")
    if 'speedup_vs_torch' in result:
        print(f"ratio (ours / torch): {result['speedup_vs_torch']}")
    if inp:
        print(f"input pipeline: {inp['img_per_s']} img/s ({inp['workers']} workers, batch {inp['batch']})")
    print(json.dumps(result))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
        with open(_OUT.value, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    app.run(main)

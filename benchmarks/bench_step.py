r"""Times the pre-training step of a config on the current backend (not a test).

Prints a table and writes JSON: img/s, step ms and peak memory for our jitted step, and,
when torch is installed, the same for ../shared/bench/torch_mae_ref.py with the same model
sizes, plus the ratio; and (``--pipelines``) our step fed by the grain and the device-resident
input pipelines over the config's data, with the share of the time spent waiting for data.

  python benchmarks/bench_step.py --config configs/cifar10.py --steps 10 --out bench_results/cpu.json
  python benchmarks/bench_step.py --config configs/imagenet.py --config.batch_size=256   # GPU
"""
import json

from absl import app, flags
from ml_collections import config_flags

from colormae_jax.tools import absl_help

import benchlib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Config to time.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps (after warm-up).')
_WARMUP = flags.DEFINE_integer('warmup', 3, 'Untimed steps (compilation included).')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Timed windows; the best is reported.')
_TORCH_REF = flags.DEFINE_string('torch_ref', '../shared/bench/torch_mae_ref.py', 'PyTorch reference script.')
_NO_TORCH = flags.DEFINE_bool('no_torch', False, 'Skip the PyTorch reference.')
_OUT = flags.DEFINE_string('out', '', 'Write the JSON here too.')
_INPUT_BATCHES = flags.DEFINE_integer('input_batches', 0, 'Also time the grain input pipeline alone over this '
                                      'many batches of the config\'s data (0: skip).')
_PIPELINES = flags.DEFINE_list('pipelines', ['grain', 'device'], 'Also time our step fed by these input pipelines '
                                '(data.pipeline) as the training loop feeds it, with the data-wait share ([]: skip).')


def time_jax(config) -> dict:
    return benchlib.time_step(config, steps=_STEPS.value, warmup=_WARMUP.value, repeats=_REPEATS.value)


def time_input(config) -> dict | None:
    if not _INPUT_BATCHES.value:
        return None
    return benchlib.time_input(config.data, batch_size=config.batch_size, batches=_INPUT_BATCHES.value)


def time_pipelines(config) -> list[dict]:
    """Our step fed by each of ``--pipelines`` over the config's real data, as ``loop.run_loop``
    feeds it (``data.to_global(next(it))``), ``--steps`` steps after ``--warmup``. Each step
    waits for the one before (so the device is idle while the host gets the batch): data wait =
    the time spent getting the next batch, its share = wait / wall time of the steps. For the
    device path also the time of its jitted batch alone (crops on the device, part of the step)."""
    import time

    import jax

    from colormae_jax import masking, parallel
    from colormae_jax.data import device as device_data, pipeline as data
    from colormae_jax.tasks import pretrain
    mesh = parallel.make_mesh(config.mesh)
    t = pretrain.make_trainer(config, mesh, data.steps_per_epoch(config.data, config.batch_size))
    strategy = masking.create(config.mask, t.mae.grid)
    rep = parallel.replicated(mesh)
    aux = jax.device_put(strategy.init_aux(jax.random.PRNGKey(1)), rep)
    step = pretrain.compile_step(t, strategy, jax.tree.map(lambda _: rep, aux))
    bsh = parallel.batch_sharding(mesh)
    rows = []
    for pipeline in _PIPELINES.value:
        c = config.copy_and_resolve_references()
        c.data.pipeline = pipeline
        t0 = time.perf_counter()
        if pipeline == 'device':
            it = device_data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed, mesh=mesh)
        else:
            it = data.make_train_iterator(c.data, global_batch_size=c.batch_size, seed=c.seed)
        setup_s = time.perf_counter() - t0
        state = pretrain.init_state(t)
        try:
            for _ in range(_WARMUP.value):
                state, m = step(state, data.to_global(next(it), lambda k, x: bsh), aux)
            jax.block_until_ready(m)
            wait, n = 0.0, _STEPS.value
            t0 = time.perf_counter()
            for _ in range(n):
                t1 = time.perf_counter()
                batch = data.to_global(next(it), lambda k, x: bsh)
                wait += time.perf_counter() - t1
                state, m = step(state, batch, aux)
                jax.block_until_ready(m)
            total = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(n):  # the batch alone (the device path's jitted crops; grain: decoding, if behind)
                jax.block_until_ready(next(it))
            batch_ms = (time.perf_counter() - t0) / n * 1e3
        finally:
            it.close()
        rows.append({'impl': f'ours+{pipeline}', 'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}',
                     'batch': c.batch_size, 'steps': n, 'step_ms': round(total / n * 1e3, 2),
                     'img_per_s': round(n * c.batch_size / total, 1), 'data_wait_ms': round(wait / n * 1e3, 3),
                     'data_wait_share': round(wait / total, 5), 'batch_alone_ms': round(batch_ms, 2),
                     'setup_s': round(setup_s, 1),
                     'workers': int(c.data.num_workers)})
    return rows


def time_torch(config) -> dict | None:
    from colormae_jax.models import mae as model
    if _NO_TORCH.value:
        return None
    name, patch = model.parse_variant(config.model.variant)
    if name not in ('Ti', 'S', 'B', 'L', 'H'):
        return None
    return benchlib.torch_reference(_TORCH_REF.value, variant=name, image=config.data.image_size, patch=patch,
                                    batch=config.batch_size, dec=dict(config.model.decoder),
                                    mask_ratio=config.mask.ratio, steps=_STEPS.value * _REPEATS.value,
                                    warmup=_WARMUP.value)


def main(argv):
    del argv
    config = _CONFIG.value
    rows = [r for r in (time_jax(config), time_torch(config)) if r]
    result = {'variant': config.model.variant, 'image_size': config.data.image_size,
              'decoder': dict(config.model.decoder), 'compute_dtype': config.model.compute_dtype,
              'mask_ratio': config.mask.ratio, 'results': rows}
    inp = time_input(config)
    fed = time_pipelines(config) if _PIPELINES.value else []
    if fed:
        result['pipelines'] = fed
    if inp:
        result['input_pipeline'] = inp
    if len(rows) == 2 and 'img_per_s' in rows[1]:
        result['speedup_vs_torch'] = round(rows[0]['img_per_s'] / rows[1]['img_per_s'], 3)
    print(f"\n{config.model.variant} @ {config.data.image_size}px, decoder {dict(config.model.decoder)}, "
          f"batch {config.batch_size}, {config.model.compute_dtype}")
    print(f"{'impl':<16}{'device':<28}{'step ms':>10}{'img/s':>10}{'mem GB':>9}{'mask ms':>9}")
    for r in rows:
        print(f"{r['impl']:<16}{str(r['device']):<28}{r['step_ms']:>10}{r['img_per_s']:>10}{str(r['mem_gb']):>9}"
              f"{str(r.get('mask_ms', '')):>9}")
    if 'speedup_vs_torch' in result:
        print(f"ratio (ours / torch): {result['speedup_vs_torch']}")
    for r in fed:
        print(f"{r['impl']:<16}{r['device']:<28}{r['step_ms']:>10}{r['img_per_s']:>10}  data wait "
              f"{r['data_wait_ms']} ms/step = {100 * r['data_wait_share']:.3f}% of the step; a batch alone "
              f"{r['batch_alone_ms']} ms")
    if inp:
        print(f"input pipeline: {inp['img_per_s']} img/s ({inp['workers']} workers, batch {inp['batch']})")
    print(json.dumps(result))
    if _OUT.value:
        benchlib.write_json(_OUT.value, result)


if __name__ == '__main__':
    absl_help()
    app.run(main)

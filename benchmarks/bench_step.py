r"""Times the pre-training step of a config on the current backend (not a test).

Prints a table and writes JSON: img/s, step ms and peak memory for our jitted step, and,
when torch is installed, the same for ../shared/bench/torch_mae_ref.py with the same model
sizes, plus the ratio.

  python benchmarks/bench_step.py --config configs/cifar10.py --steps 10 --out bench_results/cpu.json
  python benchmarks/bench_step.py --config configs/imagenet.py --config.batch_size=256   # GPU
"""
import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402

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
    return benchlib.time_step(config, steps=_STEPS.value, warmup=_WARMUP.value, repeats=_REPEATS.value)


def time_input(config) -> dict | None:
    if not _INPUT_BATCHES.value:
        return None
    return benchlib.time_input(config.data, batch_size=config.batch_size, batches=_INPUT_BATCHES.value)


def time_torch(config) -> dict | None:
    from colormae_jax import model
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
    if inp:
        print(f"input pipeline: {inp['img_per_s']} img/s ({inp['workers']} workers, batch {inp['batch']})")
    print(json.dumps(result))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or '.', exist_ok=True)
        with open(_OUT.value, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    app.run(main)

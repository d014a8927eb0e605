r"""Measures the XLA:CPU forms of the model (``model.CPU_FORMS``) one at a time, interleaved with
the PyTorch eager reference, on the pre-training step of a config (not a test).

Each arm is the same step compiled with a different set of forms ('plain' is none of them:
einsum attention, nnx.LayerNorm, autodiff's dense backward). Every round times each arm for
``--steps`` steps, then (unless ``--no_torch``) one run of ``../shared/bench/torch_mae_ref.py``,
so a busy machine slows all of them alike; medians over the rounds are reported, with the
ratio to torch's median.

  python benchmarks/cpu_forms.py --config configs/cifar10.py --rounds 5 --steps 3
  python benchmarks/cpu_forms.py --arms plain,all --rounds 7 --out benchmarks/results/cpu_forms.json
"""
import json
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from colormae_jax.tools import absl_help

import benchlib

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/cifar10.py', 'Config to time.')
_ARMS = flags.DEFINE_list('arms', 'plain,attention,layernorm,dense,all',
                          "Form sets: 'plain', 'all' (every form in model.CPU_FORM_NAMES), a form name, "
                          "or names joined by '+'.")
_ROUNDS = flags.DEFINE_integer('rounds', 5, 'Interleaved rounds.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps per arm and round.')
_TORCH_REF = flags.DEFINE_string('torch_ref', '../shared/bench/torch_mae_ref.py', 'PyTorch reference script.')
_NO_TORCH = flags.DEFINE_bool('no_torch', False, 'Skip the PyTorch reference.')
_OUT = flags.DEFINE_string('out', '', 'Write the JSON here too.')


def forms_of(arm: str, names) -> frozenset:
    if arm == 'plain':
        return frozenset()
    if arm == 'all':
        return frozenset(names)
    forms = frozenset(arm.split('+'))
    if not forms <= set(names):
        raise app.UsageError(f'--arms: {arm!r}: unknown form; valid: plain, all, {", ".join(names)}')
    return forms


def main(argv):
    del argv
    import jax

    from colormae_jax.models import mae as model

    config = _CONFIG.value
    config.model.attn_impl = 'auto'
    default_forms = model.CPU_FORMS
    steps = {}
    for arm in _ARMS.value:
        model.CPU_FORMS = forms_of(arm, model.CPU_FORM_NAMES)
        t, _, step, state, batch, aux = benchlib.make_step(config)
        t0 = time.perf_counter()
        state, m = step(state, batch, aux)  # traced now, with this arm's forms
        jax.block_until_ready(m)
        steps[arm] = [step, state, batch, aux, float(m['loss'])]
        print(f'{arm}: compiled and one step in {time.perf_counter() - t0:.1f} s, loss {steps[arm][4]:.7f}', flush=True)
    model.CPU_FORMS = default_forms
    n = config.batch_size
    ips = {arm: [] for arm in steps}
    cpu_s = {arm: [] for arm in steps}
    torch_ips = []
    name, patch = model.parse_variant(config.model.variant)
    for r in range(_ROUNDS.value):
        for arm, s in steps.items():
            step, state, batch, aux, _ = s
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(_STEPS.value):
                state, m = step(state, batch, aux)
            jax.block_until_ready(m)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            s[1] = state
            ips[arm].append(n * _STEPS.value / dt)
            cpu_s[arm].append(dc / _STEPS.value)
        line = '  '.join(f'{arm} {ips[arm][-1]:.1f}' for arm in steps)
        if not _NO_TORCH.value:
            res = benchlib.torch_reference(_TORCH_REF.value, variant=name, image=config.data.image_size, patch=patch,
                                           batch=n, dec=dict(config.model.decoder), mask_ratio=config.mask.ratio,
                                           steps=_STEPS.value, warmup=2)
            if res and 'img_per_s' in res:
                torch_ips.append(res['img_per_s'])
                line += f'  torch {res["img_per_s"]:.1f}'
        print(f'round {r}: img/s  {line}', flush=True)
    out = {'variant': config.model.variant, 'image_size': config.data.image_size, 'batch': n,
           'decoder': dict(config.model.decoder), 'rounds': _ROUNDS.value, 'steps': _STEPS.value,
           'device': f'{jax.device_count()}x {jax.devices()[0].device_kind}', 'arms': {}}
    tmed = float(np.median(torch_ips)) if torch_ips else None
    print(f"\n{'arm':<28}{'img/s median':>14}{'min-max':>16}{'CPU s/step':>12}{'vs plain':>10}{'vs torch':>10}")
    base = float(np.median(ips[next(iter(steps))]))
    for arm in steps:
        med = float(np.median(ips[arm]))
        row = {'img_per_s': [round(v, 1) for v in ips[arm]], 'median': round(med, 1),
               'cpu_s_per_step': round(float(np.median(cpu_s[arm])), 3), 'loss': steps[arm][4],
               'vs_first': round(med / base, 3), 'vs_torch': round(med / tmed, 3) if tmed else None}
        out['arms'][arm] = row
        print(f"{arm:<28}{med:>14.1f}{f'{min(ips[arm]):.1f}-{max(ips[arm]):.1f}':>16}"
              f"{row['cpu_s_per_step']:>12}{row['vs_first']:>10}{str(row['vs_torch']):>10}")
    if torch_ips:
        out['torch_eager'] = {'img_per_s': torch_ips, 'median': round(tmed, 1)}
        print(f"{'torch eager':<28}{tmed:>14.1f}{f'{min(torch_ips):.1f}-{max(torch_ips):.1f}':>16}")
    print(json.dumps(out))
    if _OUT.value:
        benchlib.write_json(_OUT.value, out)


if __name__ == '__main__':
    absl_help()
    app.run(main)

r"""What verified checkpoints cost: the checksums at save, the verification at restore.

A ViT-B/16-sized train state (the encoder's params and AdamW's two moments, float32, random
values; ``--decoder``: the whole MAE-B/16 pre-training state) is saved and restored with
``checkpoint.Checkpointer`` twice per round: as it is, and with ``checkpoint.fingerprints``
(``checksums.fingerprints``, as ``checkpoint`` imports it) and ``Checkpointer._record``
replaced by stubs (no checksums: what a save and a restore cost without verification). Also
timed alone: ``fingerprints(state)``, the computation done once at save and once at restore
(its first call compiles). The two arms alternate in order from round to round (the disk's
write-back of one save slows the next). Prints a table and writes JSON.

  python benchmarks/ckpt_verify.py --rounds 5 --out benchmarks/results/ckpt_verify_cpu.json
  python benchmarks/ckpt_verify.py --decoder --rounds 2
"""
import argparse
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from colormae_jax import config_lib
from colormae_jax.checkpoints import checkpointer as checkpoint, checksums
from colormae_jax.models import mae as model_lib

import benchlib

IMAGENET = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'configs', 'imagenet.py')


def make_state(decoder: bool) -> dict:
    config = config_lib.load_config_file(IMAGENET)
    c = model_lib.mae_config(config.model, config.data.image_size)
    abstract = model_lib.abstract_mae(c)[1]
    if not decoder:
        abstract = {k: v for k, v in abstract.items() if k == 'encoder'}
    leaves, treedef = jax.tree.flatten(abstract)
    key = jax.random.PRNGKey(0)
    params = jax.tree.unflatten(treedef, [jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype) * 0.02
                                          for i, x in enumerate(leaves)])
    moments = jax.tree.map(lambda x: x * 0.1, params), jax.tree.map(lambda x: x * x, params)
    state = {'step': jnp.asarray(1000, jnp.int32), 'params': params, 'opt_state': {'mu': moments[0], 'nu': moments[1]}}
    return jax.block_until_ready(state), config


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--decoder', action='store_true', help='the whole MAE-B/16 state (encoder and decoder)')
    p.add_argument('--rounds', type=int, default=3, help='interleaved rounds; the median is reported')
    p.add_argument('--dir', default='', help='where to write the checkpoints (default: a temporary folder)')
    p.add_argument('--out', default='', help='write the JSON here too')
    args = p.parse_args()

    state, config = make_state(args.decoder)
    n_params = sum(x.size for x in jax.tree.leaves(state['params']))
    n_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    base = args.dir or tempfile.mkdtemp(prefix='ckpt_verify_')
    real_fp, real_record = checksums.fingerprints, checkpoint.Checkpointer._record

    first_fp, _ = timed(lambda: real_fp(state))  # compiles
    rows = {k: [] for k in ('fingerprints', 'save_sync', 'save_sync_plain', 'save_async_blocking',
                            'save_async_blocking_plain', 'restore', 'restore_plain')}
    step = 0
    for r in range(args.rounds):
        rows['fingerprints'].append(timed(lambda: real_fp(state))[0])
        for verified in ((True, False) if r % 2 == 0 else (False, True)):  # alternate: the disk's write-back
            if not verified:  # no fingerprints at save, no record read at restore
                checkpoint.fingerprints = lambda tree: {}
                checkpoint.Checkpointer._record = lambda self, step: None
            suffix = '' if verified else '_plain'
            try:
                d = os.path.join(base, f'sync{suffix}')
                ckpt = checkpoint.Checkpointer(d, keep=1, async_save=False)
                step += 1
                rows[f'save_sync{suffix}'].append(timed(lambda: ckpt.save(step, state, None, config, force=True))[0])
                restored = timed(lambda: jax.block_until_ready(ckpt.restore(step, abstract, None, config)))
                rows[f'restore{suffix}'].append(restored[0])
                if verified:
                    jax.tree.map(np.testing.assert_array_equal, restored[1][0], state)
                del restored
                ckpt.close()
                d = os.path.join(base, f'async{suffix}')
                ckpt = checkpoint.Checkpointer(d, keep=1, async_save=True)
                rows[f'save_async_blocking{suffix}'].append(
                    timed(lambda: ckpt.save(step, state, None, config, force=True))[0])
                ckpt.close()
            finally:
                checkpoint.fingerprints, checkpoint.Checkpointer._record = real_fp, real_record
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)

    med = {k: float(np.median(v)) for k, v in rows.items()}
    result = {
        'device': str(jax.devices()[0].device_kind), 'backend': jax.default_backend(), 'cpus': os.cpu_count(),
        'state': 'MAE-B/16 encoder+decoder' if args.decoder else 'ViT-B/16 encoder',
        'params': int(n_params), 'state_bytes': int(n_bytes), 'rounds': args.rounds,
        'first_fingerprints_s (compiles)': first_fp, 'median_s': med, 'all_s': rows,
        'share_of_sync_save': (med['save_sync'] - med['save_sync_plain']) / med['save_sync'],
        'fingerprints_share_of_sync_save': med['fingerprints'] / med['save_sync'],
        'share_of_restore': (med['restore'] - med['restore_plain']) / med['restore'],
    }
    print(f'{result["state"]}: {n_params / 1e6:.1f} M params, state {n_bytes / 2 ** 30:.2f} GiB '
          f'(params + AdamW mu, nu), {jax.default_backend()} x {os.cpu_count()} cores, median of {args.rounds}')
    print(f'{"":34s} {"verified":>9s} {"plain":>9s} {"extra":>9s} {"share":>7s}')
    for name, key in (('save, synchronous (s)', 'save_sync'), ('save, asynchronous: blocking (s)',
                                                                'save_async_blocking'), ('restore (s)', 'restore')):
        v, q = med[key], med[key + '_plain']
        print(f'{name:34s} {v:9.2f} {q:9.2f} {v - q:9.2f} {(v - q) / v:7.1%}')
    print(f'{"fingerprints(state) alone (s)":34s} {med["fingerprints"]:9.2f}   (first call, compiling: '
          f'{first_fp:.2f} s); {result["fingerprints_share_of_sync_save"]:.1%} of a synchronous save, done once '
          f'at save and once at restore')
    if args.out:
        benchlib.write_json(args.out, result)
        print('wrote', args.out)


if __name__ == '__main__':
    main()

"""One process of a (multi-process) CPU training run over loopback, launched by tests/test_multihost.py.

  python tests/mp_worker.py --process_id 0 --num_processes 2 --port 12345 --devices 2 \
      --workdir W --root R --data_dir D --over '{"total_steps": 8}' --out OUT

Sets its own XLA_FLAGS (``--devices`` virtual CPU devices; XLA's CPU optimisations off, which
cuts compile time 2-3x: the tests compare runs with each other, not speed) and
JAX_PLATFORMS=cpu before jax is imported, starts jax.distributed through
``colormae_jax.distributed.initialize`` (gloo CPU collectives; nothing with 1 process), then
runs ``main.run`` on ``helpers.smoke_config(R, D, **over)``.

Every process writes ``OUT.p<process>.npz``: the final params (gathered), the losses, the
final step, and its FAMT weight store rows with their example indices (if any). Test hooks:
``--restore_only`` first restores without training and writes the same of the restored
state to ``OUT.p<process>.restored.npz``; ``--pause_at K --pause_process P`` makes process
P write ``OUT.paused`` and sleep before its K-th step of this launch (the test kills it);
``--sigterm_at K`` makes process ``--pause_process`` send itself SIGTERM before its K-th step;
``--concat_processes P`` (1 process) feeds the global batches a P-process run would see
(:class:`ConcatIterator`).
"""
import argparse
import json
import os
import signal
import sys
import time

FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'


def parse():
    p = argparse.ArgumentParser()
    p.add_argument('--process_id', type=int, required=True)
    p.add_argument('--num_processes', type=int, required=True)
    p.add_argument('--port', type=int, required=True)
    p.add_argument('--devices', type=int, required=True, help='CPU devices of this process')
    p.add_argument('--workdir', required=True)
    p.add_argument('--root', required=True)
    p.add_argument('--data_dir', required=True)
    p.add_argument('--over', default='{}', help='JSON: smoke_config overrides')
    p.add_argument('--out', required=True)
    p.add_argument('--restore_only', action='store_true')
    p.add_argument('--pause_at', type=int, default=None)
    p.add_argument('--pause_process', type=int, default=1)
    p.add_argument('--sigterm_at', type=int, default=None)
    p.add_argument('--concat_processes', type=int, default=None)
    p.add_argument('--heartbeat_timeout', type=int, default=10)
    p.add_argument('--initialization_timeout', type=int, default=60)
    return p.parse_args()


def snapshot(state, task) -> dict:
    """{name: numpy} of the params (gathered over processes) and this process's FAMT store."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from colormae_jax.checkpoints import checkpointer as checkpoint
    params = multihost_utils.process_allgather(state['params'], tiled=True)
    out = {f'params/{checkpoint._keystr(p)}': np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    famt_state = task.phases.states.get('famt')
    if famt_state is not None:
        store = famt_state.store  # row r of process p holds example r * P + p
        rows = np.arange(store.rows) * store.process_count + store.process_index
        keep = rows < store.num_examples
        out['famt/index'] = rows[keep]
        out['famt/table'] = store.table[keep]
        out['famt/updated_at'] = np.asarray(store.updated_at)
    return out


def concat_iterator(parts):
    """A ``grain.DatasetIterator`` over the global batches of a ``len(parts)``-process run, seen
    by one process: the batch of pipeline p fills rows [p * b, (p + 1) * b), as in the global
    array that ``make_array_from_process_local_data`` builds from the processes' batches. Its
    state is that of a 1-process ``data.TrainIterator`` (its checkpoint resumes elsewhere)."""
    import grain
    import numpy as np

    class ConcatIterator(grain.DatasetIterator):
        def __next__(self):
            batches = [next(p) for p in parts]
            return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

        def get_state(self):
            s = parts[0].get_state()
            return dict(s, batch=s['batch'] * len(parts), process_index=0, process_count=1)

        def set_state(self, state):
            for p in parts:
                p.set_state(dict(p.get_state(), step=state['step']))

        def start_prefetch(self):
            pass

        def close(self):
            for p in parts:
                p.close()

    return ConcatIterator()


def main():
    a = parse()
    os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={a.devices} {FAST_COMPILE}'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from colormae_jax import distributed
    info = distributed.initialize(coordinator_address=f'127.0.0.1:{a.port}', num_processes=a.num_processes,
                                  process_id=a.process_id, heartbeat_timeout=a.heartbeat_timeout,
                                  initialization_timeout=a.initialization_timeout)
    assert (info.process_count, info.local_device_count, info.initialized) == \
        (a.num_processes, a.devices, a.num_processes > 1), info

    import numpy as np
    from absl import logging

    from colormae_jax import main
    from colormae_jax.cli import configure_logging
    from colormae_jax.data import pipeline as data
    from colormae_jax.tasks import pretrain

    from helpers import smoke_config
    logging.use_absl_handler()  # timestamps
    configure_logging(a.process_id)
    logging.info('%s', info.describe())

    tasks = []

    class RecordedTask(pretrain.PretrainTask):  # keeps a handle on the FAMT store
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            tasks.append(self)

    pretrain.PretrainTask = RecordedTask
    if a.process_id == a.pause_process and (a.pause_at or a.sigterm_at):
        real_to_global, calls = data.to_global, [0]

        def to_global(batch, sharding_for):
            calls[0] += 1
            if calls[0] == a.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)
            if calls[0] == a.pause_at:
                open(a.out + '.paused', 'w').close()
                time.sleep(3600)  # killed by the test
            return real_to_global(batch, sharding_for)
        data.to_global = to_global
    if a.concat_processes:
        real_iterator = data.make_train_iterator

        def make_train_iterator(data_cfg, *, process_index=0, process_count=1, **kw):
            assert (process_index, process_count) == (0, 1)
            return concat_iterator([real_iterator(data_cfg, process_index=p, process_count=a.concat_processes, **kw)
                                    for p in range(a.concat_processes)])
        data.make_train_iterator = make_train_iterator

    config = smoke_config(a.root, a.data_dir, **json.loads(a.over))
    if a.restore_only:
        out = main.run(config, a.workdir, stop_after=0)
        np.savez(f'{a.out}.p{a.process_id}.restored.npz', step=np.asarray(out['step']),
                 **snapshot(out['state'], tasks[-1]))
    out = main.run(config, a.workdir)
    np.savez(f'{a.out}.p{a.process_id}.npz', losses=np.asarray(out['losses'], np.float64), step=np.asarray(out['step']),
             **snapshot(out['state'], tasks[-1]))
    logging.info('process %d wrote %s.p%d.npz', a.process_id, a.out, a.process_id)


if __name__ == '__main__':
    main()

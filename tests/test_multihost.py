"""Multi-process training on the CPU over loopback (jax.distributed, gloo collectives).

Every run is tests/mp_worker.py processes started here (tiny smoke model, FAMT masks so that
the per-process weight store is exercised, 8 steps, global batch 8 on 4 CPU devices):

  A   2 processes x 2 devices, from scratch, checkpoints at 4 and 8;
  R   1 process x 4 devices fed exactly A's global batches. Process p of A reads examples
      p, p + 2, ... and its rows come p-th in the global batch, so R's iterator concatenates
      the batches of the two per-process pipelines. A and R then compute the same function
      of the same inputs on differently placed shards, and must agree to fp32 tolerance
      (loss per step, final params, FAMT weights per example);
  A1  A's step-4 checkpoint resumed by 1 process x 4 devices (2 -> 1);
  B   R's step-4 checkpoint resumed by 2 x 2 (1 -> 2), checkpointing every 2 steps, whose
      process 1 is killed before step 7: process 0 must stop by itself within the heartbeat
      timeout; relaunched (B2), the run resumes from B's step-6 checkpoint and finishes;
  P   2 x 2 from scratch like A, whose process 1 alone gets SIGTERM before step 3: both
      processes must save the same step (JAX's preemption sync point) and exit cleanly;
      relaunched (P2), the run resumes there and ends with A's params.

The workers share a persistent compilation cache (all of a 1-process run; only process 0
of a 2-process run, whose cache keys differ between processes).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from colormae_jax import distributed, errors, main
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.data import pipeline as data, sources as datasets

from helpers import make_folder, smoke_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, 'tests', 'mp_worker.py')
OVER = {'total_steps': 8, 'warmup_steps': 2, 'ckpt.every_steps': 4, 'log_every_steps': 1,
        'image_summary_every_epochs': 0.0, 'knn.every_epochs': 0.0,
        'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.40,
        'mask.famt.warmup_steps': 2, 'mask.famt.update_every_steps': 4, 'mask.famt.update_batch_size': 8}
HEARTBEAT = 5      # s: jax.distributed declares a silent process dead after this
RUN_TIMEOUT = 300  # s: any launch


# ----------------------------------------------------------------------------- helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class Workers:
    """The ``n`` processes of one run on 127.0.0.1, each with ``devices`` CPU devices; their
    logs in ``<out>.<i>.log``. ``flags`` go to tests/mp_worker.py."""

    def __init__(self, base, workdir, out, *, n=2, devices=2, over=None, **flags):
        self.out, self.n, port = str(out), n, free_port()
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(base / 'jax_cache'),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
        env.pop('XLA_FLAGS', None)  # each worker sets its own
        extra = [f'--{k}' if v is True else f'--{k}={v}' for k, v in flags.items()]
        self.procs = []
        for i in range(n):
            cmd = [sys.executable, WORKER, f'--process_id={i}', f'--num_processes={n}', f'--port={port}',
                   f'--devices={devices}', f'--workdir={workdir}', f'--root={base / "imgs"}',
                   f'--data_dir={base / "tfds"}', f'--over={json.dumps({**OVER, **(over or {})})}', f'--out={out}',
                   f'--heartbeat_timeout={HEARTBEAT}', *extra]
            with open(self.log(i), 'w') as log:
                self.procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))

    def log(self, i) -> str:
        return f'{self.out}.{i}.log'

    def tail(self, i, n=3000) -> str:
        with open(self.log(i)) as f:
            return f.read()[-n:]

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def check(self, timeout=RUN_TIMEOUT) -> list[dict]:
        """Waits for a successful run (kills every process on failure or after ``timeout``
        seconds); the final outputs of every process."""
        deadline = time.monotonic() + timeout
        try:
            for i, p in enumerate(self.procs):
                try:
                    rc = p.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pytest.fail(f'process {i} still running after {timeout} s:\n{self.tail(i)}')
                assert rc == 0, f'process {i} exited with {rc}:\n{self.tail(i)}'
        finally:
            self.kill()
        return self.outputs()

    def outputs(self, suffix='') -> list[dict]:
        return [dict(np.load(f'{self.out}.p{i}{suffix}.npz')) for i in range(self.n)]


def read_item(workdir, step, item) -> dict:
    """A checkpoint item as numpy, {'a/b': array}, whatever the processes that wrote it."""
    extra = () if item == 'state' else (item,)
    mngr = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'), extra_items=extra).manager
    try:
        meta = mngr.item_metadata(step)[item]
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), getattr(meta, 'tree', meta))
        tree = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
    finally:
        mngr.close()
    return {checkpoint._keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def params_of(tree: dict) -> dict:
    """The ``params/...`` entries of a flat {'a/b': array} dict, without the prefix."""
    return {k[len('params/'):]: v for k, v in tree.items() if k.startswith('params/')}


def famt_by_example(outputs: list[dict]) -> np.ndarray:
    """The FAMT weights of every example, gathered from the snapshots of every process."""
    idx = np.concatenate([o['famt/index'] for o in outputs])
    table = np.concatenate([o['famt/table'] for o in outputs])
    assert sorted(idx) == list(range(len(idx))), 'every example in exactly one process'
    return table[np.argsort(idx)]


def saved_famt_by_example(workdir, step) -> np.ndarray:
    """The FAMT weights of every example in a checkpoint (process p's rows at [p * R, (p + 1) * R))."""
    item = read_item(workdir, step, 'famt')
    counts, table = item['process_examples'], item['table']
    p, n = len(counts), int(counts.sum())
    i = np.arange(n)
    return table[(i % p) * (table.shape[0] // p) + i // p]


def assert_trees_close(a: dict, b: dict, **tol) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], err_msg=k, **tol)


def without_key_bias(params: dict) -> dict:
    """The params with the key third of every qkv bias zeroed. A key bias adds the same
    ``q . b_k`` to all the logits of a query, which the softmax ignores: its gradient is zero
    in exact arithmetic, so it holds only rounding noise, which AdamW scales up to lr-sized
    steps (measured up to 3e-5 apart between A and R; the other params 1e-7 relative)."""
    out = dict(params)
    for k, v in params.items():
        if k.endswith('attn/qkv/bias'):
            out[k] = v.copy()
            w = len(v) // 3
            out[k][w:2 * w] = 0
    return out


def copy_until(src, dst, step) -> str:
    """A copy of workdir ``src`` whose checkpoints end at ``step``."""
    shutil.copytree(src, dst)
    for s in os.listdir(os.path.join(dst, 'checkpoints')):
        if s.isdigit() and int(s) > step:
            shutil.rmtree(os.path.join(dst, 'checkpoints', s))
    return str(dst)


# ----------------------------------------------------------------------------- runs

@pytest.fixture(scope='module')
def base(tmp_path_factory):
    base = tmp_path_factory.mktemp('mp')
    make_folder(base / 'imgs', per_class=16)  # 32 examples: 4 steps of 8 per epoch
    datasets.prepare(smoke_config(base / 'imgs', base / 'tfds').data)  # once: the workers would race to prepare it
    return base


@pytest.fixture(scope='module')
def runs(base):
    """A and R, side by side."""
    a = Workers(base, base / 'A', base / 'A', n=2, devices=2)
    r = Workers(base, base / 'R', base / 'R', n=1, devices=4, concat_processes=2)
    try:
        return {'R': r.check()[0], 'A': a.check()}
    finally:
        a.kill()


@pytest.fixture(scope='module')
def resumed_on_one(base, runs):
    """A1: A's step-4 checkpoint, 1 process x 4 devices."""
    run = Workers(base, copy_until(base / 'A', base / 'A1', 4), base / 'A1', n=1, devices=4, restore_only=True)
    final = run.check()
    return {'restored': run.outputs('.restored')[0], 'final': final[0], 'log0': run.tail(0, 10 ** 6)}


@pytest.fixture(scope='module')
def resumed_on_two(base, runs):
    """B and B2: what they restored and wrote, and how long process 0 of B took to stop after
    process 1 was killed."""
    wd, out, over = copy_until(base / 'R', base / 'B', 4), base / 'B', {'ckpt.every_steps': 2}
    run = Workers(base, wd, out, over=over, restore_only=True, pause_at=3, pause_process=1)  # its 3rd step: 7
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        while not os.path.exists(f'{out}.paused') or not os.path.isdir(os.path.join(wd, 'checkpoints', '6')):
            assert time.monotonic() < deadline and run.procs[0].poll() is None, run.tail(0)
            time.sleep(0.2)
        run.procs[1].send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        rc0 = run.procs[0].wait(timeout=HEARTBEAT + 60)
        stopped_after = time.monotonic() - t0
    finally:
        run.kill()
    b = {'rc0': rc0, 'stopped_after': stopped_after, 'log0': run.tail(0, 10 ** 6),
         'checkpoints': sorted(int(s) for s in os.listdir(os.path.join(wd, 'checkpoints'))),
         'restored': run.outputs('.restored'), 'state6': read_item(wd, 6, 'state'),
         'famt6': saved_famt_by_example(wd, 6)}
    again = Workers(base, wd, f'{out}2', over=over, restore_only=True)
    final = again.check()
    return b, {'log0': again.tail(0, 10 ** 6), 'final': final, 'restored': again.outputs('.restored')}


@pytest.fixture(scope='module')
def preempted(base, runs):
    """P and P2: what each process of P wrote, P's checkpoints and logs, and P2's outputs."""
    p = Workers(base, base / 'P', base / 'P', sigterm_at=3, pause_process=1)
    outs = p.check()
    first = {'outs': outs, 'logs': [p.tail(i, 10 ** 6) for i in range(2)],
             'checkpoints': sorted(int(s) for s in os.listdir(base / 'P' / 'checkpoints') if s.isdigit())}
    again = Workers(base, base / 'P', base / 'P2', restore_only=True)
    final = again.check()
    return first, {'final': final, 'restored': again.outputs('.restored'), 'log0': again.tail(0, 10 ** 6)}


# ----------------------------------------------------------------------------- tests

def test_start_up_settings():
    """Single-process runs need no settings and leave jax.distributed alone; bad settings are
    refused with the flag or variable to fix. (Multi-process start-up: every run below.)"""
    info = distributed.initialize(environ={})
    assert (info.initialized, info.how, info.process_count, info.device_count) == (False, 'single-process', 1, 4)
    assert not distributed.initialize(num_processes=1, environ={}).initialized
    assert not distributed.initialize(distributed='off', environ={'COLORMAE_NUM_PROCESSES': '4'}).initialized

    def refused(**kw):
        env = kw.pop('environ', {})
        with pytest.raises(distributed.DistributedError) as e:
            distributed.initialize(environ=env, **kw)
        return str(e.value)

    assert 'num_processes=\'x\' must be an integer >= 1 (flag --num_processes or environment variable ' \
           'COLORMAE_NUM_PROCESSES)' in refused(num_processes='x')
    assert 'process_id=2 must be in [0, num_processes=2)' in refused(num_processes=2, process_id=2)
    assert 'must be HOST:PORT' in refused(coordinator_address='10.0.0.1', num_processes=2, process_id=0)
    assert "distributed='maybe'" in refused(distributed='maybe')
    assert "cpu_collectives='nccl'" in refused(cpu_collectives='nccl', num_processes=2)
    msg = refused(environ={'COLORMAE_NUM_PROCESSES': '2', 'COLORMAE_PROCESS_ID': '1'})  # the environment is read
    assert msg.endswith('needs --coordinator_address (or COLORMAE_COORDINATOR_ADDRESS) on every process')
    assert 'needs --coordinator_address (or COLORMAE_COORDINATOR_ADDRESS), --num_processes' in refused(distributed='on')


def test_eval_batches_are_padded_alike_on_every_process(tmp_path):
    """Every process runs the same number of eval batches; ``valid`` marks the padding and
    the valid rows of all processes are the split, once each."""
    root = make_folder(tmp_path / 'imgs', per_class=11, splits=('train', 'test'))  # 22 examples
    cfg = smoke_config(root, tmp_path / 'tfds').data
    per = [list(data.make_eval_iterator(cfg, split='test', global_batch_size=8, process_index=p, process_count=2))
           for p in range(2)]
    assert len(per[0]) == len(per[1]) == 3  # 11 examples per process, 4 per batch
    seen = []
    for p, batches in enumerate(per):
        valid = np.concatenate([b['valid'] for b in batches])
        index = np.concatenate([b['index'] for b in batches])
        assert valid.tolist() == [True] * 11 + [False]
        assert (index[valid] % 2 == p).all()
        seen += index[valid].tolist()
        assert all(b['image'].shape == (4, 32, 32, 3) for b in batches)
    assert sorted(seen) == list(range(22))


def test_batch_that_does_not_split_over_the_processes_is_refused_before_compiling(base, tmp_path, monkeypatch):
    monkeypatch.setattr(jax, 'process_count', lambda: 3)  # e.g. 3 hosts
    with pytest.raises(ValueError, match='batch_size=8 is not divisible by the 3 processes .* use a multiple of 3, '
                                         'e.g. 6'):
        main.run(smoke_config(base / 'imgs', base / 'tfds'), str(tmp_path), devices=jax.devices()[:1])
    assert not os.path.exists(tmp_path / 'checkpoints')  # stopped before the trainer, the step or the checkpointer
    with pytest.raises(errors.DataError, match='use a multiple of 3'):
        data.make_train_iterator(smoke_config(base / 'imgs', base / 'tfds').data, global_batch_size=8, seed=0,
                                 process_index=0, process_count=3)


@pytest.mark.slow
def test_two_processes_equal_one(runs):
    a, r = runs['A'], runs['R']
    assert int(a[0]['step']) == int(r['step']) == 8
    assert_trees_close(params_of(a[0]), params_of(a[1]), rtol=0, atol=0)  # both processes hold the same params
    np.testing.assert_allclose(a[0]['losses'], r['losses'], rtol=1e-5)
    assert_trees_close(without_key_bias(params_of(a[0])), without_key_bias(params_of(r)), rtol=1e-5, atol=1e-8)
    # The FAMT weights (updated before steps 3 and 7) of every example agree across the layouts.
    assert int(a[0]['famt/updated_at']) == int(r['famt/updated_at']) == 6
    np.testing.assert_allclose(famt_by_example(a), famt_by_example([r]), rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_on_one(base, resumed_on_one):
    restored, final = resumed_on_one['restored'], resumed_on_one['final']
    assert int(restored['step']) == 4
    assert_trees_close(params_of(restored), params_of(read_item(base / 'A1', 4, 'state')), rtol=0, atol=0)
    store = famt_by_example([restored])
    np.testing.assert_array_equal(store, saved_famt_by_example(base / 'A1', 4))
    assert not (store == 1).all(), 'the step-4 store holds the weights of the update before step 3'
    log = resumed_on_one['log0']
    assert 'FAMT weight store written by 2 processes (16 rows each) remapped to 1 processes (32' in log
    assert 'was written by 2 processes, this run has 1' in log
    assert int(final['step']) == 8 and len(final['losses']) == 4 and np.isfinite(final['losses']).all()


@pytest.mark.slow
def test_checkpoint_from_one_process_resumes_on_two(base, resumed_on_two):
    b, _ = resumed_on_two
    saved = params_of(read_item(base / 'R', 4, 'state'))
    for r in b['restored']:
        assert int(r['step']) == 4
        assert_trees_close(params_of(r), saved, rtol=0, atol=0)
    np.testing.assert_array_equal(famt_by_example(b['restored']), saved_famt_by_example(base / 'R', 4))
    assert 'was written by 1 processes, this run has 2' in b['log0']
    assert 'FAMT weight store written by 1 processes (32 rows each) remapped to 2 processes (16' in b['log0']
    assert b['checkpoints'] == [4, 6]  # B trained on from the restored state and saved at 6


@pytest.mark.slow
def test_dead_process_stops_the_run_and_relaunch_resumes(resumed_on_two):
    b, b2 = resumed_on_two
    assert b['rc0'] != 0
    assert 'Terminating process because the JAX distributed service detected fatal errors' in b['log0']
    print(f'process 0 stopped {b["stopped_after"]:.1f} s after process 1 was killed '
          f'(heartbeat timeout {HEARTBEAT} s)')
    assert b['stopped_after'] < HEARTBEAT + 30
    # The relaunch resumes from B's own last checkpoint (written by 2 processes).
    assert 'at step 6' in b2['log0']
    for r in b2['restored']:
        assert int(r['step']) == 6
        assert_trees_close(params_of(r), params_of(b['state6']), rtol=0, atol=0)
    np.testing.assert_array_equal(famt_by_example(b2['restored']), b['famt6'])
    final = b2['final'][0]
    assert int(final['step']) == 8 and len(final['losses']) == 2 and np.isfinite(final['losses']).all()


@pytest.mark.slow
def test_sigterm_on_one_process_saves_the_same_step_everywhere_and_resumes(runs, preempted):
    p, p2 = preempted
    steps = [int(o['step']) for o in p['outs']]
    assert steps[0] == steps[1], steps  # both left the loop after the same step...
    stop = steps[0]
    assert 3 <= stop < 8, stop          # ...before the end, at the sync point after the signal
    assert stop in p['checkpoints'] and max(p['checkpoints']) == stop
    for log in p['logs']:
        assert f'Preemption sync point at step {stop}' in log
    assert_trees_close(params_of(p['outs'][0]), params_of(p['outs'][1]), rtol=0, atol=0)
    # The relaunch resumes there and ends where the uninterrupted run A ended.
    assert f'at step {stop}' in p2['log0']
    assert [int(r['step']) for r in p2['restored']] == [stop, stop]
    for out, a in zip(p2['final'], runs['A']):
        assert int(out['step']) == 8
        np.testing.assert_allclose(np.concatenate([p['outs'][0]['losses'], out['losses']]), a['losses'],
                                   rtol=1e-6)
        assert_trees_close(params_of(out), params_of(a), rtol=1e-6, atol=1e-7)

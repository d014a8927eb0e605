"""Preemption during host work: SIGTERM in FAMT's weight pass stops it between batches (the pass
polls the loop's stop check), the loop saves the state before the step, and the resumed run
equals an uninterrupted one bitwise."""
import os
import signal

import jax
import numpy as np
import pytest

from colormae_jax import loop, main, parallel
from colormae_jax.masking import famt

from helpers import make_folder, smoke_config


def _batches(n, b, closed):
    try:
        for i in range(n):
            idx = np.arange(i * b, (i + 1) * b, dtype=np.int32)
            yield {'image': np.full((b, 2), i, np.float32), 'index': idx, 'valid': np.ones(b, bool)}
    finally:
        closed.append(True)


def test_update_pass_stops_between_batches():
    mesh = parallel.make_mesh((('data', -1), ('fsdp', 1)), jax.devices()[:1])
    weights = jax.jit(lambda x: x.sum(-1, keepdims=True) * np.ones((1, 4), np.float32) + 1,  # batch i: 2i + 1
                      out_shardings=parallel.batch_sharding(mesh))
    store = famt.WeightStore(16, grid=2)
    calls, closed = [], []
    secs = famt.update_pass(store, weights, _batches(4, 4, closed), mesh, show_progress=False,
                            should_stop=lambda: len(calls.append(1) or calls) >= 2)
    assert secs is None and closed == [True]  # stopped after the second batch; the generator closed
    np.testing.assert_array_equal(store.table[:8], np.repeat([[1.0], [3.0]], 4, axis=0) * np.ones((1, 4)))
    np.testing.assert_array_equal(store.table[8:], 1.0)  # the rest untouched (uniform)
    assert int(store.updated_at) == -1
    secs = famt.update_pass(store, weights, _batches(4, 4, closed), mesh, show_progress=False,
                            should_stop=lambda: False)
    assert secs is not None and secs >= 0 and store.table[-1, 0] == 7.0


def test_the_loops_stop_check_reaches_host_work():
    """``loop.stop_requested`` (what FAMT's pass polls) is True once SIGTERM reached the running
    loop's handler, False outside a loop; the handler in place before the loop comes back."""
    before = signal.getsignal(signal.SIGTERM)
    assert not loop.stop_requested()
    with loop._Preemption(ckpt=None, deadline=None, check_every=1) as preemption:
        assert signal.getsignal(signal.SIGTERM) != before and not loop.stop_requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert loop.stop_requested() and preemption.signalled and preemption(1)
    assert not loop.stop_requested() and signal.getsignal(signal.SIGTERM) == before


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    return make_folder(base / 'imgs', per_class=16), str(base / 'tfds')


@pytest.mark.slow
def test_sigterm_during_famt_pass_then_resume_is_bitwise(folder, tmp_path, monkeypatch):
    """FAMT updates its weights before steps 4 and 8 (4 batches each). SIGTERM during the
    second batch of the update before step 8: the pass stops there, the loop saves step 8 (no
    step 9 is run) with the store still marked as updated at 4, and exits as preempted; the
    relaunch redoes the whole update and ends exactly where an uninterrupted run ends."""
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{
        'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.40, 'mask.famt.warmup_steps': 4,
        'mask.famt.update_every_steps': 4, 'mask.famt.update_batch_size': 8, 'image_summary_every_epochs': 0.0,
        'ckpt.every_steps': 100})  # no checkpoint at step 8 but the preemption's
    dev = jax.devices()[:1]
    full = main.run(c, str(tmp_path / 'a'), devices=dev)
    assert full['step'] == 12 and not full['preempted']

    real, passes = famt.update_pass, []

    def spy(store, weights_fn, batches, mesh, **kw):
        calls = []

        def weights(images):
            calls.append(1)
            if len(passes) == 1 and len(calls) == 2:  # the second pass, its second batch
                os.kill(os.getpid(), signal.SIGTERM)
            return weights_fn(images)

        out = real(store, weights, batches, mesh, **kw)
        passes.append((out, len(calls), int(store.updated_at)))
        return out

    monkeypatch.setattr(famt, 'update_pass', spy)
    first = main.run(c, str(tmp_path / 'b'), devices=dev)
    assert first['preempted'] and first['step'] == 8 and first['losses'] == full['losses'][:8]
    assert [(o is None, n, u) for o, n, u in passes] == [(False, 4, -1), (True, 2, 4)]  # stopped within the pass
    assert os.listdir(tmp_path / 'b' / 'checkpoints') == ['8']
    passes.clear()
    second = main.run(c, str(tmp_path / 'b'), devices=dev)
    assert [(o is None, n, u) for o, n, u in passes] == [(False, 4, 4)]  # the update before step 8, redone in full
    assert not second['preempted'] and second['step'] == 12
    assert second['losses'] == full['losses'][8:]  # bitwise
    jax.tree.map(np.testing.assert_array_equal, second['state']['params'], full['state']['params'])

"""Verified checkpoints and the workdir lock.

Fast: the fingerprint (the same for numpy, one device and any sharding; changed by a flipped
bit), and every kind of damage on a small Checkpointer (no model): the damaged step is renamed
``STEP.damaged`` and the step before is restored exactly; all damaged -> one error, nothing
deleted; the lock refuses a second holder, takes over a stale one, is released on exceptions.
Slow: the same damage on real pre-training runs, which then end bitwise where an
uninterrupted run ends.
"""
import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_multihost import Workers, assert_trees_close, params_of

from colormae_jax import errors, main
from colormae_jax.checkpoints import checkpointer as checkpoint, workdir as workdir_lib
from colormae_jax.data import sources as datasets
from colormae_jax.interop import weights

from helpers import make_folder, smoke_config

DEV = jax.devices()[:1]


# ----------------------------------------------------------------------------- damage

def _array_files(step_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(step_dir, 'state', 'ocdbt.process_0', 'd', '*')), key=os.path.getsize)


def damage(step_dir, kind: str) -> None:
    step_dir = str(step_dir)
    if kind == 'truncated_array':
        open(_array_files(step_dir)[-1], 'w').close()
    elif kind == 'no_manifest':
        os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
    elif kind == 'no_process_0':
        shutil.rmtree(os.path.join(step_dir, 'state', 'ocdbt.process_0'))
    elif kind == 'empty_step':
        shutil.rmtree(step_dir)
        os.makedirs(step_dir)
    elif kind == 'junk_iterator':
        with open(os.path.join(step_dir, 'data', 'process_0-of-1.json'), 'w') as f:
            f.write('{"step": 3, junk')
    elif kind == 'random_bytes':  # in the middle of the largest array file (a compressed block: or not)
        path = _array_files(step_dir)[-1]
        with open(path, 'r+b') as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(np.random.default_rng(0).bytes(400))
    else:
        raise ValueError(kind)


def overwrite_inside(step_dir, array) -> None:
    """400 random bytes over the stored bytes of ``array`` (random bits: zstd keeps them raw),
    found in the step's files: restores without an error, as garbage; only the checksum sees it."""
    raw = np.asarray(array).tobytes()
    window = raw[len(raw) // 2:len(raw) // 2 + 400]
    for path in glob.glob(os.path.join(str(step_dir), '**', 'd', '*'), recursive=True):
        with open(path, 'r+b') as f:
            at = f.read().find(window)
            if at >= 0:
                f.seek(at)
                f.write(np.random.default_rng(0).bytes(400))
                return
    raise AssertionError('the array\'s bytes are not stored as they are')


KINDS = ['truncated_array', 'no_manifest', 'no_process_0', 'empty_step', 'junk_iterator', 'random_bytes']


# ----------------------------------------------------------------------------- fingerprints

def test_fingerprint_does_not_depend_on_the_sharding_and_sees_one_bit():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ('a', 'b'))
    rng = np.random.default_rng(0)
    arrays = {'f32': rng.normal(size=(8, 12)).astype(np.float32),
              'bf16': rng.normal(size=(8, 12)).astype(jnp.bfloat16),
              'i8': rng.integers(-100, 100, (8, 12)).astype(np.int8),
              'u16': rng.integers(0, 60000, (8, 12)).astype(np.uint16),
              'bool': rng.random((8, 12)) > 0.5,
              'i32': rng.integers(-2 ** 31, 2 ** 31 - 1, (8, 12)).astype(np.int32),
              'scalar': np.asarray(3.5, np.float32)}
    host = checkpoint.fingerprints(arrays)
    one = checkpoint.fingerprints({k: jnp.asarray(v) for k, v in arrays.items()})
    sharded = checkpoint.fingerprints({k: jax.device_put(v, jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(*(('a', 'b') if v.ndim else ())))) for k, v in arrays.items()})
    assert host == one == sharded
    assert host['f32'] == {'dtype': 'float32', 'shape': [8, 12], 'fp': host['f32']['fp']}
    assert len({v['fp'] for v in host.values()}) == len(host)
    # 64-bit host arrays (an extra item's counters) are fingerprinted by their two words.
    wide = np.arange(6, dtype=np.int64) << 33
    assert checkpoint.fingerprints({'x': wide})['x']['fp'] != checkpoint.fingerprints({'x': wide >> 33})['x']['fp']
    x = arrays['f32']
    flipped = x.copy()
    flipped.view(np.uint32)[3, 5] ^= 1 << 7
    swapped = x.copy()
    swapped[0, 0], swapped[0, 1] = x[0, 1], x[0, 0]
    fps = {checkpoint.fingerprints({'x': v})['x']['fp'] for v in (x, flipped, swapped, x.reshape(12, 8))}
    assert len(fps) == 3  # a reshape keeps the fingerprint (the shape is recorded beside it)


# ----------------------------------------------------------------------------- a small Checkpointer

def _iterator():
    return grain.MapDataset.range(1000).to_iter_dataset().__iter__()


def _state(step: int) -> dict:
    rng = np.random.default_rng(step)
    # 128 KiB of random bits: one array file of its own, stored uncompressed (zstd's raw blocks), so that
    # bytes written into it restore without an error and only the checksum sees them.
    return {'w': jnp.asarray(rng.integers(0, 2 ** 32, (256, 128), np.uint32).view(np.float32)),
            'b': jnp.asarray(rng.normal(size=(32,)), jnp.float32), 'step': jnp.asarray(step, jnp.int32)}


def _abstract():
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), _state(0))


CONFIG = ml_collections.ConfigDict({'model': {'variant': 'tiny'}, 'seed': 0})


def _save_steps(directory, steps=(1, 2)) -> dict:
    """Saves ``steps`` (the iterator advanced 3 per step); {step: iterator state}."""
    ckpt, it, states = checkpoint.Checkpointer(str(directory), async_save=False), _iterator(), {}
    for s in steps:
        for _ in range(3):
            next(it)
        ckpt.save(s, _state(s), it, CONFIG, force=True)
        states[s] = it.get_state()
    ckpt.close()
    return states


@pytest.mark.parametrize('kind', KINDS)
def test_damaged_step_is_set_aside_and_the_one_before_restored(tmp_path, kind, caplog):
    states = _save_steps(tmp_path)
    if kind == 'random_bytes':
        overwrite_inside(tmp_path / '2', _state(2)['w'])
    else:
        damage(tmp_path / '2', kind)
    ckpt, it = checkpoint.Checkpointer(str(tmp_path)), _iterator()
    with caplog.at_level(logging.WARNING, logger='absl'):
        step, state, extra = ckpt.restore_newest(_abstract(), it, CONFIG)
    ckpt.close()
    assert step == 1 and extra == {}
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))
    assert it.get_state() == states[1]
    assert sorted(os.listdir(tmp_path)) == ['1', '2.damaged']
    warnings = [r.getMessage() for r in caplog.records if 'is damaged' in r.getMessage()]
    assert len(warnings) == 1 and '\n' not in warnings[0]
    assert warnings[0].startswith(f'{tmp_path}/2 is damaged (') and 'renamed to 2.damaged' in warnings[0]
    if kind == 'random_bytes':
        assert 'state/w: checksum differs' in warnings[0]
    if kind == 'junk_iterator':
        assert '(data: ' in warnings[0]


def test_a_damaged_extra_item_is_seen(tmp_path, caplog):
    """Extra items (a strategy's host state) are verified too; a second damaged step of the
    same number is set aside beside the first."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False, extra_items=('famt',))
    bits = np.random.default_rng(1).integers(0, 2 ** 32, (128, 128), np.uint32)
    table = {'table': bits.view(np.float32), 'updated_at': np.asarray(6, np.int64)}
    for s in (1, 2):
        ckpt.save(s, _state(s), None, CONFIG, force=True, extra={'famt': table})
    ckpt.close()
    famt_files = sorted(glob.glob(str(tmp_path / '2' / 'famt' / 'ocdbt.process_0' / 'd' / '*')),
                        key=os.path.getsize)  # the extra item's arrays
    with open(famt_files[-1], 'r+b') as f:
        f.seek(os.path.getsize(famt_files[-1]) // 2)
        f.write(b'\x00' * 64)
    os.makedirs(tmp_path / '2.damaged')  # set aside by an earlier run
    ckpt = checkpoint.Checkpointer(str(tmp_path), extra_items=('famt',))
    with caplog.at_level(logging.WARNING, logger='absl'):
        step, _, extra = ckpt.restore_newest(_abstract(), None, CONFIG, extra={'famt': table})
    ckpt.close()
    assert step == 1 and '2 is damaged (famt/table: checksum differs)' in caplog.text
    np.testing.assert_array_equal(extra['famt']['table'], table['table'])
    assert sorted(os.listdir(tmp_path)) == ['1', '2.damaged', '2.damaged.1']


def test_all_steps_damaged_is_one_clear_error_and_nothing_is_deleted(tmp_path):
    _save_steps(tmp_path)
    damage(tmp_path / '2', 'junk_iterator')
    overwrite_inside(tmp_path / '1', _state(1)['w'])
    before = {p: os.path.getsize(p) for p in glob.glob(str(tmp_path / '**'), recursive=True) if os.path.isfile(p)}
    for attempt in range(2):  # a relaunch does not start from scratch either
        ckpt = checkpoint.Checkpointer(str(tmp_path))
        with pytest.raises(checkpoint.CheckpointDamaged) as e:
            ckpt.restore_newest(_abstract(), _iterator(), CONFIG)
        ckpt.close()
        msg = str(e.value)
        assert '\n' not in msg and msg.startswith(f'{tmp_path}: ')
        assert '(2.damaged, 1.damaged)' in msg or 'set aside as 2.damaged, 1.damaged)' in msg
        assert msg.endswith('; copy a good step folder back from a backup (or rename one back if you know it is '
                            'good), or move the *.damaged folders away to start from scratch (or use a new --workdir)')
        if attempt == 0:
            assert msg.startswith(f'{tmp_path}: no step restores and verifies (2 (data: ')
            assert '; 1 (state/w: checksum differs); set aside as 2.damaged, 1.damaged)' in msg
        else:
            assert msg.startswith(f'{tmp_path}: every step was set aside as damaged by an earlier launch (2.damaged, '
                                  f'1.damaged)')
    after = {p.replace('.damaged', ''): os.path.getsize(p) for p in glob.glob(str(tmp_path / '**'), recursive=True)
             if os.path.isfile(p)}
    assert after == before
    assert isinstance(e.value, checkpoint.CheckpointError)


def test_mismatch_is_not_damage(tmp_path):
    """A config that does not fit is refused as before; the step stays where it is."""
    _save_steps(tmp_path, steps=(1,))
    other = jax.tree.map(lambda x: jax.ShapeDtypeStruct((7,) + x.shape[1:], x.dtype, sharding=x.sharding)
                         if x.ndim else x, _abstract())
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    with pytest.raises(checkpoint.CheckpointMismatch, match='state/w: checkpoint has \\(256, 128\\), config needs '
                                                            '\\(7, 128\\)'):
        ckpt.restore_newest(other, _iterator(), CONFIG)
    ckpt.close()
    assert os.listdir(tmp_path) == ['1']


def test_step_without_checksums_restores_unverified(tmp_path, caplog):
    """Checkpoints written before the checksums existed still resume (with a note)."""
    _save_steps(tmp_path, steps=(1,))
    shutil.rmtree(tmp_path / '1' / checkpoint.CHECKSUMS)
    meta_file = tmp_path / '1' / '_CHECKPOINT_METADATA'
    meta = json.loads(meta_file.read_text())
    del meta['item_handlers'][checkpoint.CHECKSUMS]
    meta_file.write_text(json.dumps(meta))
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger='absl'):
        step, state, _ = ckpt.restore_newest(_abstract(), _iterator(), CONFIG)
    ckpt.close()
    assert step == 1 and 'written without checksums' in caplog.text
    jax.tree.map(np.testing.assert_array_equal, state, _state(1))


def test_training_params_reader_refuses_a_damaged_step(tmp_path):
    """``init_from`` readers verify the params they read."""
    from colormae_jax.models import mae as model_lib
    config = smoke_config(tmp_path / 'x', tmp_path / 'y')
    c = model_lib.mae_config(config.model, config.data.image_size)
    rng = np.random.default_rng(0)  # random bits: stored uncompressed (see _state)
    params = jax.tree.map(lambda x: jnp.asarray(rng.integers(0, 2 ** 32, x.shape, np.uint32).view(np.float32)),
                          model_lib.abstract_mae(c)[1])
    ckpt = checkpoint.Checkpointer(str(tmp_path / 'wd' / 'checkpoints'), async_save=False)
    ckpt.save(7, {'step': jnp.asarray(7, jnp.int32), 'params': params}, None, config, force=True)
    ckpt.close()
    weights.load_training_params(str(tmp_path / 'wd'))
    overwrite_inside(tmp_path / 'wd' / 'checkpoints' / '7', params['decoder']['blocks'][0]['attn']['qkv']['kernel'])
    with pytest.raises(checkpoint.CheckpointError, match=r'checkpoints/7 is damaged \(state/params/.*: checksum '
                                                         r'differs\); name an older step'):
        weights.load_training_params(str(tmp_path / 'wd'))


# ----------------------------------------------------------------------------- the lock

def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, '-c', 'pass'])
    p.wait()
    return p.pid


def test_lock_refuses_a_second_holder_names_it_and_is_released(tmp_path):
    lock_file = tmp_path / workdir_lib.LOCK_FILE
    with workdir_lib.WorkdirLock(str(tmp_path)):
        holder = json.loads(lock_file.read_text())
        assert holder['host'] == socket.gethostname() and holder['pid'] == os.getpid()
        t0 = time.monotonic()
        with pytest.raises(errors.WorkdirError) as e:
            workdir_lib.WorkdirLock(str(tmp_path)).acquire()
        assert time.monotonic() - t0 < 2
        msg = str(e.value)
        assert msg.startswith(f'--workdir {tmp_path}: another run holds it: host {socket.gethostname()}, '
                              f'pid {os.getpid()}, since ') and '\n' not in msg
        assert e.value.key == '--workdir' and isinstance(e.value, errors.ConfigError)
    assert not lock_file.exists()
    with pytest.raises(RuntimeError, match='boom'):  # released on an exception
        with workdir_lib.WorkdirLock(str(tmp_path)):
            raise RuntimeError('boom')
    assert not lock_file.exists()


def test_stale_lock_is_taken_over_and_another_hosts_lock_is_not(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(workdir_lib, 'RETRY_S', 0.2)
    lock_file = tmp_path / workdir_lib.LOCK_FILE
    dead = _dead_pid()
    lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': dead, 'since': 'yesterday',
                                     'token': 'old'}))
    with caplog.at_level(logging.WARNING, logger='absl'):
        with workdir_lib.WorkdirLock(str(tmp_path)):
            assert json.loads(lock_file.read_text())['pid'] == os.getpid()
    assert f'Took over the stale lock of {tmp_path} (host {socket.gethostname()}, pid {dead}; pid {dead} is not ' \
           f'running)' in caplog.text
    assert not lock_file.exists() and os.listdir(tmp_path) == []
    # A live pid whose start time differs from the recorded one: the pid was reused.
    lock_file.write_text(json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'start': '1',
                                     'token': 'old'}))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass
    # Another host's lock cannot be checked: refused, with how to remove it.
    lock_file.write_text(json.dumps({'host': 'elsewhere-7', 'pid': dead, 'since': 'today', 'token': 'x'}))
    with pytest.raises(errors.WorkdirError, match=f'host elsewhere-7, pid {dead}, since today .*delete '
                                                  f'{lock_file}'):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    assert lock_file.exists()
    # An unreadable lock file left by a crash long ago is stale; a fresh one is not.
    lock_file.write_text('')
    with pytest.raises(errors.WorkdirError, match='unreadable and recent'):
        workdir_lib.WorkdirLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(lock_file, (old, old))
    with workdir_lib.WorkdirLock(str(tmp_path)):
        pass


def test_second_training_run_on_a_locked_workdir_is_refused(tmp_path):
    """Through ``main.run``: refused before anything is written or compiled."""
    make_folder(tmp_path / 'imgs', per_class=4)
    c = smoke_config(tmp_path / 'imgs', tmp_path / 'tfds')
    os.makedirs(tmp_path / 'wd')
    holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        (tmp_path / 'wd' / workdir_lib.LOCK_FILE).write_text(json.dumps(
            {'host': socket.gethostname(), 'pid': holder.pid, 'since': 'now', 'token': 't'}))
        with pytest.raises(errors.WorkdirError, match=f'another run holds it: host {socket.gethostname()}, pid '
                                                      f'{holder.pid}'):
            main.run(c, str(tmp_path / 'wd'), devices=DEV)
    finally:
        holder.kill()
        holder.wait()
    assert os.listdir(tmp_path / 'wd') == [workdir_lib.LOCK_FILE]


# ----------------------------------------------------------------------------- real runs

@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    """An uninterrupted 12-step run, and a run stopped after step 8 (checkpoints 4 and 8)."""
    base = tmp_path_factory.mktemp('safety')
    root = make_folder(base / 'imgs', per_class=16)
    c = smoke_config(root, base / 'tfds')
    full = main.run(c, str(base / 'full'), devices=DEV)
    main.run(c, str(base / 'stopped'), devices=DEV, stop_after=8)
    assert sorted(os.listdir(base / 'stopped' / 'checkpoints')) == ['4', '8']
    return c, base, full


@pytest.mark.slow
@pytest.mark.parametrize('kind', KINDS)
def test_run_resumes_from_the_step_before_a_damaged_one_and_ends_bitwise(runs, kind, tmp_path, caplog):
    c, base, full = runs
    wd = tmp_path / 'wd'
    shutil.copytree(base / 'stopped', wd)
    damage(wd / 'checkpoints' / '8', kind)
    with caplog.at_level(logging.INFO, logger='absl'):
        out = main.run(c, str(wd), devices=DEV)
    assert f'{wd}/checkpoints/8 is damaged (' in caplog.text and 'Resumed from' in caplog.text
    assert 'at step 4.' in caplog.text
    assert out['step'] == 12 and out['losses'] == full['losses'][4:]
    jax.tree.map(np.testing.assert_array_equal, out['state'], full['state'])
    assert sorted(os.listdir(wd / 'checkpoints')) == ['12', '4', '8', '8.damaged']
    assert not (wd / workdir_lib.LOCK_FILE).exists()


@pytest.mark.slow
def test_run_with_every_step_damaged_stops_with_one_line(runs, tmp_path):
    c, base, _ = runs
    wd = tmp_path / 'wd'
    shutil.copytree(base / 'stopped', wd)
    damage(wd / 'checkpoints' / '8', 'truncated_array')
    damage(wd / 'checkpoints' / '4', 'no_process_0')
    with pytest.raises(checkpoint.CheckpointDamaged) as e:
        main.run(c, str(wd), devices=DEV)
    assert str(e.value).startswith(f'{wd}/checkpoints: no step restores and verifies (8 (state: ')
    assert sorted(os.listdir(wd / 'checkpoints')) == ['4.damaged', '8.damaged']
    assert not (wd / workdir_lib.LOCK_FILE).exists()  # released on the error


@pytest.mark.slow
def test_two_processes_agree_on_a_step_damaged_on_one_of_them(tmp_path_factory):
    """2 processes x 2 devices over loopback: process 1's iterator file of step 8 is junk,
    process 0's is fine. Both set step 8 aside (process 0 renames it), resume from step 4 and
    end where the undamaged run ended."""
    base = tmp_path_factory.mktemp('mp_safety')
    make_folder(base / 'imgs', per_class=16)
    datasets.prepare(smoke_config(base / 'imgs', base / 'tfds').data)
    full = Workers(base, base / 'full', base / 'full').check()
    assert sorted(os.listdir(base / 'full' / 'checkpoints')) == ['4', '8']
    shutil.copytree(base / 'full', base / 'wd')
    shutil.rmtree(base / 'wd' / 'checkpoints' / '8' / 'data')  # keep only process 0's file intact
    os.makedirs(base / 'wd' / 'checkpoints' / '8' / 'data')
    shutil.copy(base / 'full' / 'checkpoints' / '8' / 'data' / 'process_0-of-2.json',
                base / 'wd' / 'checkpoints' / '8' / 'data')
    with open(base / 'wd' / 'checkpoints' / '8' / 'data' / 'process_1-of-2.json', 'w') as f:
        f.write('junk')
    run = Workers(base, base / 'wd', base / 'wd')
    outs = run.check()
    logs = [run.tail(i, 10 ** 6) for i in range(2)]
    assert '/checkpoints/8 is damaged (failed on process 1 (see its log)): renamed to 8.damaged' in logs[0]
    assert '/checkpoints/8 is damaged (data: JSONDecodeError' in logs[1] and 'renamed to 8.damaged;' in logs[1]
    assert 'Resumed from' in logs[0] and 'at step 4.' in logs[0]
    assert sorted(os.listdir(base / 'wd' / 'checkpoints')) == ['4', '8', '8.damaged']
    for out, ref in zip(outs, full):
        assert int(out['step']) == 8 and len(out['losses']) == 4
        np.testing.assert_allclose(out['losses'], ref['losses'][4:], rtol=1e-6)
        assert_trees_close(params_of(out), params_of(ref), rtol=1e-6, atol=1e-7)

"""Fast versions of the data faults of ``benchmarks/faults.py``: prepared data and the device
cache verified before use, a changed folder refused, leftovers removed, the dataset lock,
SIGTERM during preparation, storage errors as one line. Slow: two processes preparing one
``data_dir``, and SIGTERM to ``python -m colormae_jax.main`` while it prepares."""
import errno
import glob
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from colormae_jax import cli, defaults, errors, loop
from colormae_jax.checkpoints import workdir as workdir_lib
from colormae_jax.data import device as device_data, sources as datasets

from helpers import make_folder

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
import faults  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(root, data_dir, **over):
    c = defaults.data_config()
    c.root, c.data_dir, c.image_size = str(root), str(data_dir), 32
    for k, v in over.items():
        c[k] = v
    return c


def _prepare(c):
    """``prepare`` as a new run does it (nothing remembered from this process)."""
    datasets.prepare.cache_clear()
    device_data.clear()
    return datasets.prepare(c)


def _files(builder) -> dict:
    """{file: SHA-256} of a prepared folder, as recorded."""
    return {k: v['sha256'] for k, v in datasets._read_record(builder.data_dir)['files'].items()}


@pytest.fixture
def prepared(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=6)
    c = _cfg(root, tmp_path / 'tfds')
    b = _prepare(c)
    return root, c, b


@pytest.mark.parametrize('kind', faults.FOLDER_CHANGES)
def test_a_changed_folder_is_refused_with_its_paths_then_prepared_again_when_told(prepared, tmp_path, kind):
    root, c, b = prepared
    what = faults.change_folder(root, kind)
    with pytest.raises(errors.DataError, match=r'changed since it was prepared .*\(\d+ images? differs?: ' +
                       r'.*reprepare=True') as e:
        _prepare(c)
    assert all(os.path.join(root, p) in str(e.value) for p in what), (what, str(e.value))
    _prepare(_cfg(root, c.data_dir, reprepare=True))
    again = datasets.content_digest(c)
    assert again == datasets.content_digest(_cfg(root, tmp_path / 'fresh'))  # as the changed folder prepared anew
    assert _prepare(c).data_dir == b.data_dir and datasets.content_digest(c) == again  # accepted from now on


def test_a_touched_image_is_not_a_change_and_is_not_hashed_again(prepared, monkeypatch):
    root, c, _ = prepared
    path = os.path.join(root, 'train', 'cat', '0001.png')
    os.utime(path, ns=(1, 1))
    hashed = []
    real = datasets._hash_file
    monkeypatch.setattr(datasets, '_hash_file', lambda p: hashed.append(p) or real(p))
    _prepare(c)
    assert path in hashed  # its stat changed: its bytes were compared
    hashed.clear()
    _prepare(c)
    assert path not in hashed  # its new stat was recorded


@pytest.mark.parametrize('kind', faults.PREPARED_DAMAGE)
def test_damaged_prepared_data_are_refused_naming_the_file_then_prepared_again_when_told(prepared, kind):
    root, c, b = prepared
    before = datasets.content_digest(c)
    path = faults.damage_prepared(b.data_dir, kind)
    with pytest.raises(errors.DataError, match='the prepared data of .* are damaged .*reprepare=True') as e:
        _prepare(c)
    assert str(e.value).startswith(path + ': ')
    _prepare(_cfg(root, c.data_dir, reprepare=True))
    assert datasets.content_digest(c) == before  # the same examples as the first time


def test_data_prepared_without_a_record_are_checked_then_recorded(prepared, caplog):
    root, c, b = prepared
    before = _files(b)
    os.remove(os.path.join(b.data_dir, datasets.RECORD_FILE))
    with caplog.at_level(logging.WARNING, logger='absl'):
        _prepare(c)
    assert any('without a record' in r.getMessage() for r in caplog.records)
    assert _files(b) == before
    os.remove(os.path.join(b.data_dir, datasets.RECORD_FILE))
    faults.damage_prepared(b.data_dir, 'truncated')  # no record: the shard's footer against dataset_info.json
    with pytest.raises(errors.DataError, match=r'damaged \((\d+ records, 12 listed in dataset_info.json|unreadable)'):
        _prepare(c)


@pytest.mark.parametrize('kind', faults.CACHE_DAMAGE)
def test_a_damaged_device_cache_is_decoded_again_with_a_warning(prepared, kind, caplog):
    _, c, _ = prepared
    images, labels = device_data.decoded_split(c, 'train')
    paths = device_data._cache_paths(c, 'train')
    faults.damage_cache(paths[0], kind)
    with caplog.at_level(logging.WARNING, logger='absl'):
        _prepare(c)
        got = device_data.decoded_split(c, 'train')
    np.testing.assert_array_equal(got[0], images)
    np.testing.assert_array_equal(got[1], labels)
    assert [r for r in caplog.records if 'decoding the split again' in r.getMessage()]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='absl'):
        _prepare(c)
        device_data.decoded_split(c, 'train')
    assert not [r for r in caplog.records if 'device cache' in r.getMessage()]  # the cache written again verifies


def test_a_cache_from_other_prepared_data_is_decoded_again(prepared, caplog):
    _, c, _ = prepared
    images, _ = device_data.decoded_split(c, 'train')
    record = device_data._cache_paths(c, 'train')[2]
    with open(record) as f:
        rec = json.load(f)
    with open(record, 'w') as f:
        json.dump(dict(rec, source='0' * 32), f)
    with caplog.at_level(logging.WARNING, logger='absl'):
        again, _ = device_data.decoded_split(c, 'train')
    assert any('decoded from other prepared data' in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(again, images)


def test_a_cache_that_cannot_be_written_is_a_warning_and_leaves_nothing(prepared, monkeypatch, caplog):
    _, c, b = prepared

    def full(path, arr):
        open(path, 'wb').write(b'x' * 10)
        raise OSError(errno.ENOSPC, 'No space left on device', path)

    monkeypatch.setattr(device_data.np, 'save', full)
    with caplog.at_level(logging.WARNING, logger='absl'):
        images, _ = device_data.decoded_split(c, 'train')
    assert images.shape == (12, 32, 32, 3)
    assert any('No space left on device' in r.getMessage() for r in caplog.records)
    assert not glob.glob(os.path.join(b.data_dir, 'decoded', '*'))


def test_leftovers_of_killed_preparations_are_removed(prepared, caplog):
    _, c, b = prepared
    device_data.decoded_split(c, 'train')
    made = faults.make_leftovers(b.data_dir)
    with caplog.at_level(logging.WARNING, logger='absl'):
        _prepare(c)
    assert not any(os.path.exists(p) for p in made)
    assert any('leftover' in r.getMessage() for r in caplog.records)


def test_sigterm_stops_preparing_and_decoding_with_nothing_left(tmp_path, monkeypatch):
    root = make_folder(tmp_path / 'imgs', per_class=6)
    c = _cfg(root, tmp_path / 'tfds')
    calls = []
    monkeypatch.setattr(datasets, '_STOP_CHECKS', [lambda: calls.append(1) or len(calls) > 1])
    monkeypatch.setattr(datasets, '_threaded', _one_by_one(datasets._threaded))
    with pytest.raises(datasets.PreparationStopped, match='stopped by SIGTERM'):
        _prepare(c)
    folders = os.path.join(str(tmp_path / 'tfds'), 'image_folder')
    assert not glob.glob(os.path.join(folders, '*', '*')) and not glob.glob(os.path.join(folders, '*.lock'))
    monkeypatch.setattr(datasets, '_STOP_CHECKS', [])
    b = _prepare(c)
    calls.clear()
    monkeypatch.setattr(datasets, '_STOP_CHECKS', [lambda: True])
    with pytest.raises(datasets.PreparationStopped, match='decoding split'):
        device_data.decoded_split(c, 'train')
    assert not os.path.exists(os.path.join(b.data_dir, 'decoded')) or not os.listdir(os.path.join(b.data_dir,
                                                                                                  'decoded'))


def _one_by_one(threaded):
    return lambda fn, items, chunk=1024, what=None: threaded(fn, items, 1, what)


def test_the_loop_registers_its_sigterm_check_and_a_signal_before_the_loop_counts():
    assert loop.stop_requested in datasets._STOP_CHECKS
    with loop.sigterm_stops_passes() as outer:
        outer.signalled = True
        assert loop.stop_requested()
        with pytest.raises(datasets.PreparationStopped):
            datasets.check_stop('preparing x')
        with loop.sigterm_stops_passes() as inner:  # the training loop entered after the signal still stops
            assert inner.signalled


def test_the_dataset_lock_makes_a_second_holder_wait_and_say_so(tmp_path, caplog):
    path = str(tmp_path / 'd' / 'x.lock')
    first = datasets.DatasetLock(path, 'prepare x')
    first.acquire()
    second = datasets.DatasetLock(path, 'prepare x')
    assert not datasets.DatasetLock(path, 'look').acquire(blocking=False)
    got = threading.Event()
    with caplog.at_level(logging.INFO, logger='absl'):
        t = threading.Thread(target=lambda: second.acquire() and got.set())
        t.start()
        time.sleep(0.5)
        assert not got.is_set()
        first.release()
        t.join(10)
    assert got.is_set() and second.waited
    assert any('Waiting for' in r.getMessage() and f'pid {os.getpid()}' in r.getMessage() for r in caplog.records)
    second.release()
    assert not os.path.exists(path)


def test_waiting_for_the_dataset_lock_stops_on_sigterm(tmp_path, monkeypatch):
    path = str(tmp_path / 'x.lock')
    with datasets.DatasetLock(path, 'prepare x'):
        monkeypatch.setattr(datasets, '_STOP_CHECKS', [lambda: True])
        with pytest.raises(datasets.PreparationStopped, match='waiting to prepare x'):
            datasets.DatasetLock(path, 'prepare x').acquire()


@pytest.mark.parametrize('err,code', [
    (ValueError('OUT_OF_RANGE: Error writing "opt" in OCDBT database at local file "/w/checkpoints/4.orbax-'
                'checkpoint-tmp/state/": Failed writing: "/w/checkpoints/4.orbax-checkpoint-tmp/state/d/ab": '
                "Failed to write 25392 bytes to file 9: File too large [os_error_code='27']"), errno.EFBIG),
    (RuntimeError('Failed to finalize writing of split "train": write() failed: No space left on device; writing '
                  '/d/image_folder/x/incomplete.AB_1.0.0/image_folder-train.array_record-00000-of-00001; at byte 9'),
     errno.ENOSPC),
    (PermissionError(errno.EACCES, 'Permission denied', '/w/checkpoints/8.orbax-checkpoint-tmp'), errno.EACCES),
    (OSError(errno.EROFS, 'Read-only file system', '/elsewhere/checkpoints'), errno.EROFS),
])
def test_storage_errors_are_found_behind_any_exception_and_shown_in_one_line(err, code):
    found = workdir_lib.storage_error(RuntimeError('wrapped')) or workdir_lib.storage_error(_wrapped(err))
    assert found.errno == code and found.filename.startswith('/')
    line = cli.error_line(_wrapped(err), '/w')
    assert line.startswith(f'error: {found.filename}: ') and '\n' not in line and 'then relaunch' in line
    assert ('it resumes from the last checkpoint' in line) == found.filename.startswith('/w/')
    assert ('--workdir' in line) == (found.filename.startswith('/w/') and code != errno.EFBIG)
    assert workdir_lib.storage_error(ValueError('shape mismatch')) is None
    assert cli.error_line(PermissionError(errno.EACCES, 'Permission denied', '/elsewhere'), '/w') is None  # a bug


def _wrapped(e):
    try:
        try:
            raise e
        except Exception as x:
            raise RuntimeError('while saving') from x
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize('code', [errno.ENOSPC, errno.EFBIG])
def test_a_storage_failure_while_preparing_is_one_line_and_leaves_nothing(tmp_path, monkeypatch, code):
    root = make_folder(tmp_path / 'imgs', per_class=6)
    c = _cfg(root, tmp_path / 'tfds')
    real = datasets.ImageFolder._download_and_prepare

    def fail(self, *a, **k):
        real(self, *a, **k)
        raise RuntimeError(f'write() failed: {os.strerror(code)}; writing {self.data_dir}/x.array_record; at byte 9')

    monkeypatch.setattr(datasets.ImageFolder, '_download_and_prepare', fail)
    with pytest.raises(errors.DataError, match=f'{os.strerror(code)} .*while preparing {root}; .*then relaunch'):
        _prepare(c)
    assert not glob.glob(os.path.join(str(tmp_path / 'tfds'), 'image_folder', '*', '*'))
    monkeypatch.undo()
    assert _prepare(c).info.splits['train'].num_examples == 12


def test_a_data_dir_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    root = make_folder(tmp_path / 'imgs', per_class=2)

    def denied(self, blocking=True):
        raise PermissionError(errno.EACCES, 'Permission denied', os.path.dirname(self.path))

    monkeypatch.setattr(datasets.DatasetLock, 'acquire', denied)
    with pytest.raises(errors.DataError, match=r'image_folder: Permission denied \(this user may not write there\) '
                                               r'while preparing .*--config.data.data_dir'):
        _prepare(_cfg(root, tmp_path / 'tfds'))


def test_a_read_only_checkpoints_folder_is_refused_before_anything_runs(tmp_path, monkeypatch):
    d = tmp_path / 'checkpoints'
    d.mkdir()
    loop._check_checkpoints_writable(str(d))  # writable: nothing said
    assert not os.listdir(d)  # the probe is removed
    monkeypatch.setattr(workdir_lib, 'check_writable', lambda folder: OSError(errno.EROFS, 'Read-only file system'))
    with pytest.raises(errors.WorkdirError, match='checkpoints cannot be written .Read-only file system.'):
        loop._check_checkpoints_writable(str(d))


# ------------------------------------------------------------------------------ several processes

PREPARE = ('import sys; from absl import logging; logging.set_verbosity(logging.INFO); '
           'from colormae_jax import defaults; from colormae_jax.data import sources; '
           'c = defaults.data_config(); c.root, c.data_dir = sys.argv[1], sys.argv[2]; '
           'print(sources.prepare(c).info.splits["train"].num_examples)')


@pytest.mark.slow
def test_two_processes_preparing_one_data_dir_take_turns(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=400)
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    procs = [subprocess.Popen([sys.executable, '-c', PREPARE, root, str(tmp_path / 'tfds')], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o[0].split()[-1] for o in outs] == ['800', '800']
    logs = [o[1] for o in outs]
    assert sum('Prepared ' in x for x in logs) == 1 and sum('Waiting for' in x for x in logs) <= 1
    assert not glob.glob(os.path.join(str(tmp_path / 'tfds'), 'image_folder', '*.lock'))


@pytest.mark.slow
def test_sigterm_while_main_prepares_exits_75_with_the_lock_released(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=1500)
    wd, data_dir = str(tmp_path / 'wd'), str(tmp_path / 'tfds')
    flags = faults.run_flags(root, data_dir, 8)
    la = faults.Launch(wd, flags)
    assert la.wait_for(lambda e: 'Checking the 3000 images' in e, timeout=120)
    la.signal(15)
    assert la.wait() == 75, la.err[-2000:]
    assert 'stopped by SIGTERM' in la.err and 'relaunch the same command to resume' in la.err
    assert not os.path.exists(os.path.join(wd, 'run.lock'))
    assert not glob.glob(os.path.join(data_dir, 'image_folder', '*', '*'))
    assert not glob.glob(os.path.join(data_dir, 'image_folder', '*.lock'))
    shutil.rmtree(wd)


def test_the_tracebacks_of_a_save_that_failed_for_lack_of_space_are_dropped_and_no_others():
    def record(where, exc):
        return logging.LogRecord('x', logging.ERROR, os.path.join(os.sep, 'site-packages', where, 'm.py'), 1,
                                 'Task exception was never retrieved', None, (type(exc), exc, None))

    full = ValueError('Failed writing: "/w/checkpoints/4.orbax-checkpoint-tmp/d/1": File too large '
                      "[os_error_code='27']")
    assert not cli._drop_noise(record('asyncio', full))  # asyncio's "never retrieved" of orbax's writes
    assert not cli._drop_io_chatter(record('orbax', full))
    assert cli._drop_noise(record('asyncio', ValueError('a bug')))
    assert cli._drop_io_chatter(record('orbax', ValueError('a bug')))

"""The lock of a workdir: one training run at a time writes a workdir's checkpoints.

:class:`WorkdirLock` (used by ``loop.run``): process 0 creates ``WORKDIR/run.lock`` with
``os.open(O_CREAT | O_EXCL)`` (atomic: of two runs, one creates it) holding its host, pid,
process start time and start date as JSON, and removes it when the run ends (also on an
exception). A second run on the same workdir is refused at once with a
:class:`~colormae_jax.errors.WorkdirError` naming the holder's host and pid. A lock whose
holder is dead (same host, pid not alive, or the pid now belongs to a process started at
another time) is stale: it is taken over with a warning. A lock held from another host
cannot be checked and is never taken over; the message says how to remove it. Every
process of a multi-process run learns process 0's verdict. A ``gs://`` (any ``://``)
workdir is not locked (a logged note).

Storage failures (a full disk, a file-size limit, a folder this user cannot write) reach the
code as many types: ``OSError`` with an errno, or a library's error whose message holds the
errno (tensorstore's ``[os_error_code='27']``, array_record's ``File too large``).
:func:`storage_error` finds one behind any exception, as an ``OSError`` with the errno and the
path; :func:`storage_message` words it as one line that says what to do;
:func:`check_writable` refuses a folder that cannot be written before anything depends on it.
"""
from __future__ import annotations

import datetime
import errno
import json
import os
import re
import resource
import socket
import time
import uuid

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from colormae_jax.errors import WorkdirError, chain

LOCK_FILE = 'run.lock'
UNREADABLE_STALE_AFTER_S = 30.0  # an unreadable lock file older than this was left by a crash
RETRY_S = 1.0  # how long to re-read a lock file being written, or to retry after taking one over


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), or None."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rpartition(')')[2].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _read(path: str) -> dict | None:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) and 'pid' in holder and 'host' in holder else None
    except (OSError, ValueError):
        return None


def _stale(holder: dict) -> str | None:
    """Why the lock of ``holder`` is stale, or None if its run may be alive."""
    if holder.get('host') != socket.gethostname():
        return None  # cannot be checked from here
    pid = int(holder['pid'])
    if not _alive(pid):
        return f'pid {pid} is not running'
    start = _start_time(pid)
    if holder.get('start') is not None and start is not None and start != holder['start']:
        return f'pid {pid} now belongs to another process'
    return None


_HELD: set[str] = set()  # the workdirs whose lock this process holds (every process of a run alike)


def _key(workdir: str) -> str:
    return workdir if '://' in workdir else os.path.abspath(workdir)


def held(workdir: str) -> bool:
    """Whether this process holds ``workdir``'s lock already (``main`` takes it before
    preparing the data, so that a second run is refused within seconds; ``loop.run`` then
    does not take it again)."""
    return _key(workdir) in _HELD


class WorkdirLock:
    """``with WorkdirLock(workdir):`` holds ``workdir``'s lock (process 0) for the block.
    Every process enters and leaves it; all raise WorkdirError if process 0 cannot lock
    (also a second lock of the same workdir in one process: see :func:`held`)."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_FILE)
        self.token: str | None = None
        self._key, self._held = _key(workdir), False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self._acquire_all()
        self._held = True
        _HELD.add(self._key)

    def _acquire_all(self) -> None:
        if '://' in self.workdir:
            logging.info('%s is not a local folder: it is not locked; make sure no other run uses it.', self.workdir)
            return
        error = None
        if jax.process_index() == 0:
            try:
                self.token = self._acquire()
            except WorkdirError as e:
                error = e
            except OSError as e:
                error = WorkdirError(self.workdir, f'cannot create its lock {self.path} ({e}); check the folder '
                                                   f'is writable')
        if jax.process_count() > 1:
            refused = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is not None)))
            if refused and error is None:
                error = WorkdirError(self.workdir, 'process 0 could not lock it (its log says who holds it)')
        if error is not None:
            raise error

    def _acquire(self) -> str:
        os.makedirs(self.workdir, exist_ok=True)
        me = {'host': socket.gethostname(), 'pid': os.getpid(), 'start': _start_time(os.getpid()),
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
              'token': uuid.uuid4().hex}
        deadline = time.monotonic() + RETRY_S
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _read(self.path)
                why = self._stale_why(holder)
                if why is None:
                    if holder is None and time.monotonic() < deadline:  # being written: read it again
                        time.sleep(0.1)
                        continue
                    raise self._busy(holder) from None
                self._take_over(holder, why)
                if time.monotonic() > deadline:
                    raise self._busy(holder) from None
                continue
            with os.fdopen(fd, 'w') as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            return me['token']

    def _stale_why(self, holder: dict | None) -> str | None:
        if holder is not None:
            return _stale(holder)
        try:
            age = time.time() - os.path.getmtime(self.path)
        except FileNotFoundError:
            return 'gone'
        return f'unreadable, {age:.0f} s old' if age > UNREADABLE_STALE_AFTER_S else None

    def _take_over(self, holder: dict | None, why: str) -> None:
        """Moves the stale lock away (atomically: of two runs taking over, one moves it), then
        checks that what was moved is the lock judged stale (else puts it back)."""
        aside = f'{self.path}.stale.{os.getpid()}'
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return  # another run moved it first; try again
        moved = _read(aside)
        if holder is not None and (moved is None or moved.get('token') != holder.get('token')):
            if not os.path.exists(self.path):  # a fresh lock of another run: give it back
                os.rename(aside, self.path)
            return
        os.remove(aside)
        if why != 'gone':
            who = f'host {holder["host"]}, pid {holder["pid"]}' if holder else 'unknown holder'
            logging.warning('Took over the stale lock of %s (%s; %s).', self.workdir, who, why)

    def _busy(self, holder: dict | None) -> WorkdirError:
        if holder is None:
            return WorkdirError(self.workdir, f'its lock {self.path} is unreadable and recent; if no run uses this '
                                              f'workdir, delete the file')
        here = holder.get('host') == socket.gethostname()
        return WorkdirError(
            self.workdir, f'another run holds it: host {holder["host"]}, pid {holder["pid"]}, since '
                          f'{holder.get("since", "?")} ({self.path}). Wait for that run to end or stop it, or use '
                          f'another --workdir' + ('' if here else '; if that run is gone (another host cannot be '
                                                                    f'checked from here), delete {self.path}'))

    def release(self) -> None:
        if self._held:
            self._held = False
            _HELD.discard(self._key)
        if self.token is None:
            return
        token, self.token = self.token, None
        holder = _read(self.path)
        if holder is None or holder.get('token') != token:
            logging.warning('The lock %s is no longer this run\'s; left as it is.', self.path)
            return
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


# ------------------------------------------------------------------------------ storage errors

STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS)
_STRERRORS = {os.strerror(n): n for n in STORAGE_ERRNOS}  # 'No space left on device' -> ENOSPC, ...
_CODE = re.compile(r"os_error_code='?(\d+)")
_PATH = re.compile(r'(?:writing|[Ff]ailed writing:?|local file|[Ff]ile)\s+"?(/[^";,\s]+)')


def storage_error(e: BaseException | None) -> OSError | None:
    """The storage failure behind ``e`` (``e`` or its causes): an ``OSError`` whose errno is one
    of :data:`STORAGE_ERRNOS` (disk full, quota, file-size limit, permission, read-only file
    system) with the path when one is known; None when ``e`` is something else."""
    found, path = None, None
    for x in chain(e):
        if isinstance(x, OSError) and x.errno in STORAGE_ERRNOS:
            found = found or x.errno
            path = path or x.filename
            continue
        msg = str(x)
        code = next((int(m) for m in _CODE.findall(msg) if int(m) in STORAGE_ERRNOS), None)
        code = code or next((n for text, n in _STRERRORS.items() if text in msg), None)
        if code is not None:
            found = found or code
            paths = _PATH.findall(msg)  # the last one named is the file (tensorstore names its database first)
            path = path or (paths[-1] if paths else None)
    if found is None:
        return None
    return OSError(found, os.strerror(found), path)


def _size_limit() -> str:
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return '' if soft == resource.RLIM_INFINITY else f' of {soft:,} bytes (ulimit -f {soft // 1024})'


def storage_message(err: OSError, key: str | None = None, then: str = '', doing: str = '') -> str:
    """One line for a storage failure (:func:`storage_error`): ``<path>: <what>; <what to do>``.
    ``key`` is the flag or config key that names another folder (``--workdir``); ``then`` what
    the relaunch does (``it resumes from the last checkpoint``); ``doing`` what failed
    (``preparing /data/imgs``)."""
    n = err.errno
    path = err.filename or 'a file'
    if n in (errno.ENOSPC, errno.EDQUOT):
        what = 'the disk is full' if n == errno.ENOSPC else 'the disk quota is used up'
        do = 'free space there' + (f' (or give {key} a folder on another disk)' if key else '')
    elif n == errno.EFBIG:
        what = f'it would grow past the file-size limit{_size_limit()}'
        do = 'raise the limit (ulimit -f unlimited)'
    else:
        what = 'the file system is read-only' if n == errno.EROFS else 'this user may not write there'
        do = 'make it writable' + (f' (or give {key} a folder this user can write)' if key else '')
    then = f', then relaunch the same command: {then}' if then else ', then relaunch the same command'
    doing = f' while {doing}' if doing else ''
    return f'{path}: {err.strerror or os.strerror(n)} ({what}){doing}; {do}{then}'


def check_writable(folder: str) -> OSError | None:
    """Whether this user can create files in ``folder`` (an existing local folder), found by
    creating and removing a probe file (``os.access`` says yes to root on a read-only mode):
    the ``OSError`` when not, else None."""
    probe = os.path.join(folder, f'.write_probe.{socket.gethostname()}.{os.getpid()}')
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    except OSError as e:
        return e
    os.close(fd)
    try:
        os.remove(probe)
    except OSError:
        pass
    return None

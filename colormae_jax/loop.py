"""The one training loop, for every task: resume or start, step, log, check, checkpoint, stop.

:func:`run` opens the checkpoints and the writer of a workdir, resumes from the newest step
(or starts from ``init_fn()``) and runs :func:`run_loop`, which knows a task only through
the :class:`Task` protocol: pre-training, the linear probe and fine-tuning plug in alike.
Randomness is ``fold_in(PRNGKey(seed), step)`` (:func:`step_rng`): no key is carried in
the state, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from colormae_jax import errors, metrics, parallel
from colormae_jax.checkpoints import checkpointer as ckpt_lib, workdir as workdir_lib
from colormae_jax.data import pipeline as data, sources as datasets


class Task(Protocol):
    """What :func:`run_loop` needs of a task. ``step0`` is 0-based (the step about to run),
    ``step`` 1-based (the steps done)."""
    mesh: jax.sharding.Mesh
    total_steps: int
    steps_per_epoch: int

    def describe(self) -> str:
        """One line for the log: what is trained, with which batch."""

    def before_step(self, step0: int, state: Any, writer: Any, progress: Any) -> None:
        """Host work before a step (e.g. a masking strategy's refresh)."""

    def host_batch(self, step0: int, batch: dict) -> dict:
        """The process-local numpy batch, with whatever the task adds on the host."""

    def step(self, step0: int, state: Any, batch: dict) -> tuple[Any, dict]:
        """One jitted step on the global batch: (new state, metrics)."""

    def after_step(self, step: int, state: Any, writer: Any) -> None:
        """Evaluations and pictures after a step. A long pass in it uses :class:`PassProgress`
        (progress in the log, :class:`EvaluationInterrupted` on SIGTERM)."""

    def evaluates(self, step: int) -> bool:
        """Whether :meth:`after_step` evaluates after ``step`` (1-based): the loop then saves the
        step first, and a run resumed there whose evaluation did not finish runs it again."""

    def eval_record(self) -> dict:
        """What the evaluation just finished leaves for a resumed run (JSON), e.g. the best value."""

    def load_eval_record(self, record: dict) -> None:
        """Takes :meth:`eval_record` of the evaluation after the step a run resumes from."""

    def extra(self) -> dict | None:
        """More checkpoint items {name: tree}, saved with the state."""

    def abstract_extra(self) -> dict | None:
        """Restore targets of :meth:`extra` (a tree, or a function of the saved item's metadata)."""

    def load_extra(self, restored: dict | None) -> None:
        """Takes the restored :meth:`extra` items."""


def step_rng(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


class _Preemption:
    """When to stop early and save: on SIGTERM or once ``deadline`` (a ``time.time()``) has passed.

    One process: a SIGTERM handler sets :attr:`signalled`; the loop checks it after each step
    and also before and after the task's host work of a step (``before_step``): then the step
    is not run and the state before it is saved. Long host work (FAMT's weight pass, a pass
    over the dataset) polls :func:`stop_requested` between two pieces of work and stops early.
    Several processes must all stop at the same step, or the collective save would hang: there
    JAX's preemption sync service (started by ``jax.distributed``, whose own SIGTERM notifier
    must not be replaced by a Python handler) picks the step (``CheckpointManager.reached_preemption``),
    and process 0's clock decides the deadline for all, every ``check_every`` steps; host work
    is not stopped early (a collective pass must run on every process).
    """

    def __init__(self, ckpt, deadline: float | None, check_every: int):
        self.ckpt, self.deadline, self.check_every = ckpt, deadline, check_every
        self.multi = jax.process_count() > 1
        self.signalled = self.by_deadline = False
        self._old = None

    def __enter__(self):
        self.signalled = self.signalled or any(p.signalled for p in _ACTIVE)  # a SIGTERM before this loop counts
        _ACTIVE.append(self)
        if not self.multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning('SIGTERM received: stopping after this step, or between two batches of a pass (an '
                        'evaluation), with the trained steps saved; then exiting.')
        self.signalled = True

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if _ACTIVE and self.signalled:  # the enclosing handler learns of a SIGTERM this one took
            _ACTIVE[-1].signalled = True
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def __call__(self, step: int) -> bool:
        """Whether to save and stop after ``step``; every process calls it at every step."""
        if self.multi and self.ckpt.manager.reached_preemption(step):
            logging.warning('Preemption sync point at step %d (SIGTERM on some process): saving, then exiting.',
                            step)
            return True
        if self.signalled:
            return True
        if self.deadline is None or (self.multi and step % self.check_every):
            return False
        expired = time.time() > self.deadline
        if self.multi:
            expired = bool(multihost_utils.broadcast_one_to_all(np.asarray(expired)))
        self.by_deadline = expired
        return expired


_ACTIVE: list[_Preemption] = []  # the stop checks of the loops running in this process (innermost last)


def stop_requested() -> bool:
    """For long host work within a step of the running loop (a masking strategy's refresh):
    True once the loop has been told to stop (SIGTERM, one process; see :class:`_Preemption`).
    Work that sees it stops between two pieces and leaves its state marked stale: the loop
    then saves the state before the step and exits, and the relaunch redoes the work. False
    outside a loop and with several processes."""
    return bool(_ACTIVE) and _ACTIVE[-1].signalled


datasets.set_stop_check(stop_requested)  # data preparation and decoding stop on SIGTERM too (PreparationStopped)


def sigterm_stops_passes() -> contextlib.AbstractContextManager:
    """SIGTERM handling for work outside :func:`run_loop` (an evaluation task; the features a
    probe is trained on): :func:`stop_requested` turns True on SIGTERM, and the next
    :meth:`PassProgress.update` raises :class:`EvaluationInterrupted`."""
    return _Preemption(None, None, 1)


class EvaluationInterrupted(Exception):
    """A long pass (an evaluation, a feature extraction) stopped by SIGTERM between two batches.
    The loop ends the run as preempted (exit 75) with the step saved before the evaluation;
    the relaunch runs the evaluation again (:func:`run_loop`)."""


def _duration(secs: float) -> str:
    return f'{secs:.0f} s' if secs < 90 else f'{secs / 60:.1f} min' if secs < 5400 else f'{secs / 3600:.1f} h'


class PassProgress:
    """Progress of one long pass over examples (features, an evaluation) in the log: a first
    line with the pass's cost at the rate measured on its first batches (after ``first_secs``,
    with ``hint``: how to turn it off or bound it), then one every ``every_secs`` with the
    count, the rate and the ETA. :meth:`update` (after each batch) raises
    :class:`EvaluationInterrupted` once SIGTERM has reached the running loop
    (:func:`stop_requested`; one process), unless ``interruptible`` is False."""

    _clock = staticmethod(time.perf_counter)

    def __init__(self, what: str, total: int, *, unit: str = 'images', hint: str = '', every_secs: float = 30.0,
                 first_secs: float = 5.0, interruptible: bool = True):
        self.what, self.total, self.unit, self.hint = what, int(total), unit, hint
        self.every_secs, self.interruptible = every_secs, interruptible
        self.count, self.lines = 0, 0
        self.t0 = self._clock()
        self._ref = None  # (time, count) after the first batch: the rate leaves compiling out
        self._next = self.t0 + first_secs

    def check(self) -> None:
        if self.interruptible and stop_requested():
            raise EvaluationInterrupted(f'{self.what}: stopped by SIGTERM after {self.count:,} of {self.total:,} '
                                        f'{self.unit}')

    def rate(self, now: float | None = None) -> float | None:
        """Examples per second since the first batch (None before the second)."""
        now = self._clock() if now is None else now
        if self._ref is None or now <= self._ref[0] or self.count <= self._ref[1]:
            return None
        return (self.count - self._ref[1]) / (now - self._ref[0])

    def update(self, n: int) -> None:
        """``n`` more examples done (clipped to ``total``); logs when due, then checks for SIGTERM."""
        self.count = min(self.total, self.count + int(n)) if self.total else self.count + int(n)
        now = self._clock()
        if self._ref is None:
            self._ref = (now, self.count)
        elif now >= self._next and self.count < self.total and (rate := self.rate(now)):
            left = _duration((self.total - self.count) / rate)
            if not self.lines:  # the first line: what the whole pass costs
                msg = (f'{self.what}: {self.total:,} {self.unit}, about {_duration(self.total / rate)} at the '
                       f'measured {rate:,.0f} {self.unit}/s ({self.count:,} done, ETA {left})')
                msg += f'; {self.hint}' if self.hint else ''
            else:
                share = 100 * self.count / self.total
                msg = (f'{self.what}: {self.count:,}/{self.total:,} {self.unit} ({share:.0f}%), {rate:,.0f} '
                       f'{self.unit}/s, ETA {left}')
            logging.info('%s', msg)
            self.lines += 1
            self._next = now + self.every_secs
        self.check()


class _EvalRecords:
    """``WORKDIR/evaluated.json``: {step: the task's :meth:`Task.eval_record`} of the evaluations
    that finished, written by process 0 after each (evaluations run after their step is saved,
    so a checkpoint never holds the evaluation of its own step). Read at the start and agreed by
    every process; entries after the step the run starts from are dropped (those steps run
    again)."""

    NAME = 'evaluated.json'

    def __init__(self, workdir: str, start: int):
        self.path = epath.Path(workdir) / self.NAME
        records = None
        if jax.process_index() == 0:
            try:
                records = {int(k): v for k, v in json.loads(self.path.read_text()).items()}
            except (OSError, ValueError, AttributeError):  # none yet (or unreadable): every evaluation is redone
                records = {}
            if any(k > start for k in records):
                records = {k: v for k, v in records.items() if k <= start}
                self._write(records)
        self.records = {int(k): v for k, v in _from_process_0(
            {str(k): v for k, v in (records or {}).items()}).items()}

    def get(self, step: int) -> dict | None:
        return self.records.get(step)

    def put(self, step: int, record: dict) -> None:
        self.records[step] = record
        if jax.process_index() == 0:
            self._write(self.records)

    def _write(self, records: dict) -> None:
        tmp = self.path.parent / (self.NAME + '.tmp')
        tmp.write_text(json.dumps({str(k): v for k, v in sorted(records.items())}, indent=1))
        tmp.replace(self.path)


def _from_process_0(obj):
    """Process 0's JSON value ``obj``, on every process."""
    if jax.process_count() == 1:
        return obj
    raw = json.dumps(obj).encode() if jax.process_index() == 0 else b''
    n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(raw), np.int32)))
    buf = np.zeros(max(n, 1), np.uint8)
    buf[:len(raw)] = np.frombuffer(raw, np.uint8)
    return json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n]).decode())


class NonFiniteMetrics(FloatingPointError):
    """A training metric (the loss) became NaN or infinite; nothing after the last good
    checkpoint is saved. ``main`` prints it as one ``error:`` line and exits with code 3."""


def _check_finite(step: int, values: dict, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        last = ckpt.latest_step()
        shown = ', '.join(f'{k}={v}' for k, v in sorted(bad.items()))
        raise NonFiniteMetrics(
            f'config.base_lr: non-finite training metrics at step {step} ({shown}); the run stopped without saving '
            f'(the last good checkpoint is {"step " + str(last) if last is not None else "none"} in '
            f'{ckpt.directory}); lower base_lr, lengthen the warm-up or set grad_clip_norm, then relaunch (it '
            f'resumes from there)')


def _check_checkpoints_writable(directory: str) -> None:
    """Refuses a local ``checkpoints/`` folder this user cannot write (read-only), before anything
    is restored or trained: a run could neither save nor set a damaged step aside there."""
    if '://' in directory or not os.path.isdir(directory):
        return
    err = workdir_lib.check_writable(directory)
    if err is not None:
        raise errors.WorkdirError(os.path.dirname(directory), f'{directory} cannot be written ({err.strerror}): the '
                                                              f'run could not save its steps; make it writable, or '
                                                              f'copy the workdir and give the copy as --workdir')


def run(task: Task, config, workdir: str, it, abstract_state, init_fn: Callable[[], Any], *,
        stop_after: int | None = None, deadline: float | None = None) -> dict:
    """Checkpoints, logs and the loop around a task: resumes from the newest checkpoint in
    ``workdir/checkpoints`` that restores and verifies (state, iterator and the task's extra
    items; a damaged step is set aside as ``STEP.damaged``, see
    ``Checkpointer.restore_newest``) or, when there is none, starts from ``init_fn()``.
    Holds the workdir's lock (``workdir.WorkdirLock``: a second run on it is refused; taken
    by ``main`` already), writes
    the images its data left out (``data.skip_bad_images``) to ``workdir/skipped_images.txt``, and
    closes the iterator, the checkpointer and the writer, also on an exception."""
    workdir = os.path.abspath(workdir) if '://' not in workdir else workdir
    writer = None
    try:
        with contextlib.nullcontext() if workdir_lib.held(workdir) else workdir_lib.WorkdirLock(workdir):
            if jax.process_index() == 0 and '://' not in workdir and config.get('data') is not None:
                datasets.write_skipped(config.data, workdir)  # the images left out (data.skip_bad_images), if any
            _check_checkpoints_writable(os.path.join(workdir, 'checkpoints'))
            ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.ckpt.keep,
                                         async_save=config.ckpt.async_save,
                                         extra_items=tuple(task.abstract_extra() or ()))
            try:
                writer = metrics.create_writer(os.path.join(workdir, 'tb'))
                resumed = ckpt.restore_newest(abstract_state, it, config, extra=task.abstract_extra())
                if resumed is not None:
                    start, state, restored = resumed
                    task.load_extra(restored)
                    logging.info('Resumed from %s at step %d.', ckpt.directory, start)
                    _note_new_plan(ckpt, start, config, task.total_steps)
                else:
                    state, start = init_fn(), 0
                    writer.write_hparams({k: str(v) for k, v in ckpt_lib.flat_config(config).items()})
                return run_loop(task, config, state, start, it, ckpt, writer, stop_after, deadline, workdir=workdir)
            finally:
                ckpt.close()  # waits for the last save, inside the lock
    finally:
        it.close()
        if writer is not None:
            writer.flush()


_PLAN_KEYS = ('total_steps', 'total_epochs', 'warmup_steps', 'warmup_epochs', 'base_lr', 'min_lr')


def _note_new_plan(ckpt, start: int, config, total: int) -> None:
    """One log line when a run resumes with another duration or learning rate than its checkpoint's
    config: the schedule is planned anew from the new values (the steps done followed the old plan)."""
    try:
        saved = ckpt_lib.flat_config(ckpt._item(start, 'config'))
    except Exception:  # noqa: BLE001 - the config item was verified on restore; a note is not worth a failure
        return
    now = ckpt_lib.flat_config(config)
    changed = [f'{k} {saved.get(k)!r} -> {now.get(k)!r}' for k in _PLAN_KEYS if k in now and saved.get(k) != now.get(k)]
    if changed:
        logging.warning('Resumed at step %d with %s (the checkpoint was written with the first values): the '
                        'learning-rate schedule is planned anew for %d steps from here; steps 1..%d followed the old '
                        'plan, so the run is not the one an uninterrupted run of the new config would be.', start,
                        ', '.join(changed), total, start)


def run_loop(task: Task, config, state, start, it, ckpt, writer, stop_after, deadline=None, *,
             workdir: str | None = None) -> dict:
    """The one training loop (pre-training, linear probe, fine-tuning).

    Metrics are fetched and NaN-checked every ``log_every_steps`` and before every save;
    checkpoints every ``ckpt.every_steps``, at the end, before every evaluation
    (``task.evaluates``; the save is waited for, so that a kill during the evaluation loses no
    training) and when :class:`_Preemption` stops the loop (SIGTERM, or ``deadline``, a
    ``time.time()``, has passed). SIGTERM during an evaluation stops it between two batches
    (:class:`EvaluationInterrupted`). An evaluation that did not finish (recorded in
    ``workdir``'s :class:`_EvalRecords`) is run again first when the run resumes from its step.
    The result's ``preempted`` is True when the loop stopped so before the last step or before
    the last evaluation (a relaunch resumes; ``main`` exits with ``EXIT_PREEMPTED``);
    ``stop_after`` (tests) is not a preemption.
    """
    mesh, spe, total = task.mesh, task.steps_per_epoch, task.total_steps
    progress = metrics.ReportProgress(num_train_steps=total, writer=writer,
                                               every_steps=config.log_every_steps, every_secs=None)
    bsh = parallel.batch_sharding(mesh)
    losses, pending, data_wait, data_wait_total = [], [], 0.0, 0.0
    end = total if stop_after is None else min(total, start + stop_after)
    loop_t0 = time.perf_counter()

    def flush(step):
        nonlocal pending, data_wait
        if not pending:
            return
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        if config.nan_check:
            for i, m in enumerate(fetched):
                _check_finite(step - len(fetched) + 1 + i, m, ckpt)
        losses.extend(m['loss'] for m in fetched)
        last = dict(fetched[-1], data_wait_ms=1e3 * data_wait / len(fetched), epoch=step / spe)
        writer.write_scalars(step, last)
        pending, data_wait = [], 0.0

    evaluates = getattr(task, 'evaluates', None) or (lambda step: False)
    records = _EvalRecords(workdir, start) if workdir else None

    def evaluate(step, state) -> bool:
        """The task's evaluation after ``step`` (saved already); False when SIGTERM stopped it."""
        try:
            task.after_step(step, state, writer)
        except EvaluationInterrupted as e:
            logging.warning('%s. Step %d is saved; relaunch the same command: it runs this evaluation again, then '
                            'goes on.', e, step)
            return False
        if records is not None:
            records.put(step, task.eval_record())
        return True

    step, preempted = start, False
    with _Preemption(ckpt, deadline, config.log_every_steps) as should_stop:  # SIGTERM saves from here on
        if start >= total:
            logging.info('Training is already complete (step %d of %d); nothing to train.', start, total)
        else:
            logging.info('Training steps %d..%d of %d (%d steps/epoch, mesh %s): %s.', start + 1, end, total, spe,
                         dict(zip(mesh.axis_names, mesh.devices.shape)), task.describe())
        if start and evaluates(start):  # the evaluation after the step resumed from: finished, or run again now
            record = records.get(start) if records is not None else None
            if record is not None:
                task.load_eval_record(record)
            else:
                logging.info('The evaluation after step %d did not finish before the run stopped: running it now.',
                             start)
                preempted = not evaluate(start, state)
        for step in range(start + 1, (start if preempted else end) + 1):
            if not should_stop.signalled:
                task.before_step(step - 1, state, writer, progress)
            if should_stop.signalled:  # SIGTERM before or during the host work: the step has not run
                step -= 1
                flush(step)
                if step > start and ckpt.latest_step() != step:  # else saved already (or nothing trained)
                    ckpt.save(step, state, it, config, force=True, extra=task.extra())
                ckpt.wait()
                logging.warning('SIGTERM before step %d: %s; exiting.', step + 1,
                                f'saved step {step}' if step else 'nothing trained, nothing saved')
                preempted = True
                break
            with progress.timed('data', wait_jax_async_dispatch=False):
                t0 = time.perf_counter()
                batch = data.to_global(task.host_batch(step - 1, next(it)), lambda name, x: bsh)
                waited = time.perf_counter() - t0
                data_wait += waited
                data_wait_total += waited
            state, m = task.step(step - 1, state, batch)
            pending.append(m)
            stop = should_stop(step)  # every process, every step
            if stop and step == total and should_stop.by_deadline:  # training is done: the deadline stops nothing
                stop = False
            if step % config.log_every_steps == 0 or step == end or stop:
                flush(step)
            progress(step)  # after the flush, which waits for the device: the rate is of computed steps
            evaluating = evaluates(step)
            if step % config.ckpt.every_steps == 0 or step == total or stop or evaluating:
                flush(step)  # a state that follows a non-finite step is never saved
                ckpt.save(step, state, it, config, force=True, extra=task.extra())
            if stop:  # saved; an evaluation due now is left to the relaunch (it runs it first)
                ckpt.wait()
                if not evaluating:
                    task.after_step(step, state, writer)  # pictures
                logging.warning('Saved step %d after SIGTERM (or the deadline); exiting.', step)
                preempted = step < total or evaluating
                break
            if evaluating:
                ckpt.wait()  # the step is on disk before the evaluation: a kill during it loses no training
                if not evaluate(step, state):
                    preempted = True
                    break
            else:
                task.after_step(step, state, writer)
        flush(step)
    return {'losses': losses, 'state': state, 'step': step, 'total_steps': total, 'preempted': preempted,
            'loop_seconds': time.perf_counter() - loop_t0, 'data_wait_seconds': data_wait_total}


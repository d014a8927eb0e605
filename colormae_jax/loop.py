"""The one training loop, for every task: resume or start, step, log, check, checkpoint, stop.

:func:`run` opens the checkpoints and the writer of a workdir, resumes from the newest step
(or starts from ``init_fn()``) and runs :func:`run_loop`, which knows a task only through
the :class:`Task` protocol: pre-training, the linear probe and fine-tuning plug in alike.
Randomness is ``fold_in(PRNGKey(seed), step)`` (:func:`step_rng`): no key is carried in
the state, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from colormae_jax import metrics, parallel
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
        """Evaluations and pictures after a step."""

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
        self.signalled = False
        self._old = None

    def __enter__(self):
        _ACTIVE.append(self)
        if not self.multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning('SIGTERM received: saving a checkpoint, then exiting.')
        self.signalled = True

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
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
        return expired


_ACTIVE: list[_Preemption] = []  # the stop checks of the loops running in this process (innermost last)


def stop_requested() -> bool:
    """For long host work within a step of the running loop (a masking strategy's refresh):
    True once the loop has been told to stop (SIGTERM, one process; see :class:`_Preemption`).
    Work that sees it stops between two pieces and leaves its state marked stale: the loop
    then saves the state before the step and exits, and the relaunch redoes the work. False
    outside a loop and with several processes."""
    return bool(_ACTIVE) and _ACTIVE[-1].signalled


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
                else:
                    state, start = init_fn(), 0
                    writer.write_hparams({k: str(v) for k, v in ckpt_lib.flat_config(config).items()})
                return run_loop(task, config, state, start, it, ckpt, writer, stop_after, deadline)
            finally:
                ckpt.close()  # waits for the last save, inside the lock
    finally:
        it.close()
        if writer is not None:
            writer.flush()


def run_loop(task: Task, config, state, start, it, ckpt, writer, stop_after, deadline=None) -> dict:
    """The one training loop (pre-training, linear probe, fine-tuning).

    Metrics are fetched and NaN-checked every ``log_every_steps`` and before every save;
    checkpoints every ``ckpt.every_steps``, at the end, and when :class:`_Preemption` stops the
    loop (SIGTERM, or ``deadline``, a ``time.time()``, has passed). The result's ``preempted``
    is True when it stopped so before the last step (a relaunch resumes; ``main`` exits with
    ``EXIT_PREEMPTED``); ``stop_after`` (tests) is not a preemption.
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

    step, preempted = start, False
    with _Preemption(ckpt, deadline, config.log_every_steps) as should_stop:  # SIGTERM saves from here on
        if start >= total:
            logging.info('Training is already complete (step %d of %d); nothing to do.', start, total)
        else:
            logging.info('Training steps %d..%d of %d (%d steps/epoch, mesh %s): %s.', start + 1, end, total, spe,
                         dict(zip(mesh.axis_names, mesh.devices.shape)), task.describe())
        for step in range(start + 1, end + 1):
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
            progress(step)
            stop = should_stop(step)
            if step % config.log_every_steps == 0 or step == end or stop:
                flush(step)
            due = step % config.ckpt.every_steps == 0 or step == total or stop
            try:
                if not stop:  # before the save, so that what it records (a best accuracy) is saved with the step
                    task.after_step(step, state, writer)
            finally:
                if due:  # also when the evaluation failed: it loses no training
                    flush(step)  # a state that follows a non-finite step is never saved
                    ckpt.save(step, state, it, config, force=True, extra=task.extra())
            if stop:  # a preemption saves first (and waits for it), then evaluates
                ckpt.wait()
                task.after_step(step, state, writer)
                logging.warning('Saved step %d after SIGTERM (or the deadline); exiting.', step)
                preempted = step < total
                break
        flush(step)
    return {'losses': losses, 'state': state, 'step': step, 'total_steps': total, 'preempted': preempted,
            'loop_seconds': time.perf_counter() - loop_t0, 'data_wait_seconds': data_wait_total}


"""Metric writers and progress reports, without TensorFlow.

clu's ``metric_writers`` package (and ``periodic_actions``, which imports it) loads TensorFlow,
which is not a dependency (docs/design.md, "Metric writers without TensorFlow"). This module
has the same interface: writers with clu's ``MetricWriter`` methods (console lines in the
format of clu's ``LoggingWriter``, TensorBoard event files through tensorboardX, asynchronous
writes on a ``clu.asynclib`` pool) and :class:`ReportProgress`, clu's progress report (the
work-unit notes go through ``clu.platform``).
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import time
from typing import Any, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from clu import asynclib, platform

WRITE_METHODS = ('write_summaries', 'write_scalars', 'write_images', 'write_videos', 'write_audios',
                 'write_texts', 'write_histograms', 'write_hparams')


class MetricWriter:
    """clu's ``MetricWriter`` methods; here each does nothing (the writer of processes other than 0)."""

    def write_summaries(self, step: int, values: Mapping[str, Any], metadata: Mapping[str, Any] | None = None):
        pass

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        pass

    def write_images(self, step: int, images: Mapping[str, Any]):
        pass

    def write_videos(self, step: int, videos: Mapping[str, Any]):
        pass

    def write_audios(self, step: int, audios: Mapping[str, Any], *, sample_rate: int):
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]):
        pass

    def write_histograms(self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None):
        pass

    def write_hparams(self, hparams: Mapping[str, Any]):
        pass

    def flush(self):
        pass

    def close(self):
        self.flush()


class LoggingWriter(MetricWriter):
    """INFO log lines as clu's ``LoggingWriter`` writes them, e.g. ``[100] loss=0.51, lr=0.001``."""

    def write_summaries(self, step, values, metadata=None):
        logging.info('[%d] Got raw tensors: %s.', step, {k: np.shape(v) for k, v in values.items()})

    def write_scalars(self, step, scalars):
        logging.info('[%d] %s', step, ', '.join(f'{k}={v:.6g}' if isinstance(v, float) else f'{k}={v}'
                                                for k, v in sorted(scalars.items())))

    def write_images(self, step, images):
        logging.info('[%d] Got images: %s.', step, {k: np.shape(v) for k, v in images.items()})

    def write_videos(self, step, videos):
        logging.info('[%d] Got videos: %s.', step, {k: np.shape(v) for k, v in videos.items()})

    def write_audios(self, step, audios, *, sample_rate):
        logging.info('[%d] Got audios: %s.', step, {k: np.shape(v) for k, v in audios.items()})

    def write_texts(self, step, texts):
        logging.info('[%d] Got texts: %s.', step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        for key, value in arrays.items():
            value = np.asarray(value).ravel()
            if value.size:  # TF's bucketing, as clu logs it: 30 equal bins over [min, max]
                lo, hi = value.min(), value.max()
                counts, edges = (np.histogram(value, (num_buckets or {}).get(key) or 30, (lo, hi)) if hi > lo
                                 else ([value.size], [lo - 0.5, hi + 0.5]))
                items = [f'[{a:.3g}, {b:.3g}): {n}' for a, b, n in zip(edges[:-1], edges[1:], counts)]
                items[-1] = items[-1].replace('):', ']:')
                logging.info('[%d] Histogram for %r = {%s}', step, key, ', '.join(items))

    def write_hparams(self, hparams):
        logging.info('[Hyperparameters] %s', hparams)

    def flush(self):
        logging.flush()


class TensorBoardWriter(MetricWriter):
    """TensorBoard event files in ``logdir`` through tensorboardX."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_summaries(self, step, values, metadata=None):
        for key, value in values.items():
            value = np.asarray(value)
            if value.size == 1:
                self._writer.add_scalar(key, float(value), global_step=step)
            else:
                self._writer.add_histogram(key, value, global_step=step)

    def write_scalars(self, step, scalars):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_images(self, step, images):
        for key, value in images.items():
            value = np.asarray(value)
            self._writer.add_images(key, value[None] if value.ndim == 3 else value, global_step=step,
                                    dataformats='NHWC')

    def write_texts(self, step, texts):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step, arrays, num_buckets=None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step,
                                       bins=(num_buckets or {}).get(key) or 'tensorflow')

    def write_hparams(self, hparams):
        self._writer.add_text('hparams', '\n'.join(f'    {k}: {v}' for k, v in sorted(hparams.items())), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


class MultiWriter(MetricWriter):
    """Every call goes to each of ``writers``, in order."""

    def __init__(self, writers: Sequence[MetricWriter]):
        self.writers = tuple(writers)


def _fan_out(name):
    def method(self, *args, **kwargs):
        for w in self.writers:
            getattr(w, name)(*args, **kwargs)
    method.__name__ = name
    return method


for _name in WRITE_METHODS + ('flush', 'close'):
    setattr(MultiWriter, _name, _fan_out(_name))


class AsyncWriter(MetricWriter):
    """``writer``'s calls run in order on a background thread (a ``clu.asynclib`` pool, as clu's
    ``AsyncWriter``); an error there is raised (``asynclib.AsyncError``) by the next call.
    ``flush`` waits for the writes in flight."""

    def __init__(self, writer: MetricWriter):
        self.writer = writer
        self._pool = asynclib.Pool(thread_name_prefix='AsyncWriter', max_workers=1)

    def flush(self):
        try:
            self._pool.join()
        finally:
            self.writer.flush()

    def close(self):
        try:
            self.flush()
        finally:
            self.writer.close()


def _in_background(name):
    def method(self, *args, **kwargs):
        self._pool(getattr(self.writer, name))(*args, **kwargs)
    method.__name__ = name
    return method


for _name in WRITE_METHODS:
    setattr(AsyncWriter, _name, _in_background(_name))


def create_writer(logdir: str | None, asynchronous: bool = True) -> MetricWriter:
    """On process 0, console lines plus TensorBoard event files in ``logdir`` (none when it is
    None), asynchronous unless told otherwise; on other processes a writer that does nothing."""
    if jax.process_index() != 0:
        return MetricWriter()
    writer = MultiWriter([LoggingWriter()] + ([TensorBoardWriter(logdir)] if logdir is not None else []))
    return AsyncWriter(writer) if asynchronous else writer


def _format_secs(secs: float) -> str:
    """123456.7 -> '1d10h17m' (clu's format)."""
    days, secs = divmod(int(secs), 24 * 3600)
    hours, secs = divmod(secs, 3600)
    return (f'{days}d' if days else '') + (f'{hours}h' if hours else '') + f'{secs // 60}m'


@jax.jit
def _squareit(x):
    return x ** 2


class ReportProgress:
    """clu's ``periodic_actions.ReportProgress``: call it after every step (``progress(step)``);
    every ``every_steps`` steps, after ``every_secs`` seconds, on ``on_steps`` and at
    ``num_train_steps`` it sets the work-unit notes (logged locally), e.g.
    ``21.9 steps/s, 50.0% (10/20), ETA: 0m (0m : 6.6% data)`` (the share of the time since it was
    created spent in each :meth:`timed` section), and writes ``steps_per_sec`` and ``uptime``."""

    def __init__(self, *, num_train_steps: int | None = None, writer: MetricWriter | None = None,
                 every_steps: int | None = None, every_secs: float | None = 60.0,
                 on_steps: Iterable[int] | None = None):
        self._every_steps, self._every_secs = every_steps, every_secs
        self._on_steps = set(on_steps or ()) | ({num_train_steps} if num_train_steps is not None else set())
        self._num_train_steps = num_train_steps if num_train_steps is not None and num_train_steps >= 0 else None
        self._writer = writer
        self._previous_step = self._previous_time = self._last_step = None
        self._time_per_part = collections.defaultdict(float)
        self._t0 = time.monotonic()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)  # timings in order

    def __call__(self, step: int, t: float | None = None) -> bool:
        """Reports if due; True if it did. The first call only starts the clock."""
        t = time.monotonic() if t is None else t
        if self._previous_step is None:
            self._previous_step, self._previous_time = step, t
        elif self._every_steps is not None and step - self._last_step != 1:
            raise ValueError(f'ReportProgress must be called after every step once (every_steps={self._every_steps}, '
                             f'previous_step={self._previous_step}, step={step}).')
        self._last_step = step
        if step == self._previous_step or not (
                (self._every_steps is not None and step % self._every_steps == 0)
                or (self._every_secs is not None and t - self._previous_time > self._every_secs)
                or step in self._on_steps):
            return False
        self._report(step, t)
        self._previous_step, self._previous_time = step, t
        return True

    def _report(self, step: int, t: float):
        steps_per_sec = (step - self._previous_step) / (t - self._previous_time)
        message = f'{steps_per_sec:.1f} steps/s'
        if self._num_train_steps:
            eta = (self._num_train_steps - step) / steps_per_sec
            message += (f', {100 * step / self._num_train_steps:.1f}% ({step}/{self._num_train_steps}), '
                        f'ETA: {_format_secs(eta)}')
        if self._time_per_part:
            total = time.monotonic() - self._t0
            message += ' ({} : {})'.format(_format_secs(total), ', '.join(
                f'{100 * dt / total:.1f}% {name}' for name, dt in sorted(self._time_per_part.items())))
        platform.work_unit().set_notes(message)
        if self._writer is not None:
            self._writer.write_scalars(step, {'steps_per_sec': steps_per_sec, 'uptime': time.monotonic() - self._t0})

    @contextlib.contextmanager
    def timed(self, name: str, wait_jax_async_dispatch: bool = True):
        """Adds the time spent in the block to the ``name`` share of the report. With
        ``wait_jax_async_dispatch`` (clu's default), the time between the completion of the
        device work queued before the block and of the work queued inside it (measured on a
        background thread); without it, the block's wall time."""
        if not wait_jax_async_dispatch:
            start = time.monotonic()
            try:
                yield
            finally:
                self._time_per_part[name] += time.monotonic() - start
            return

        def start_measurement(barrier):
            barrier.block_until_ready()
            return time.monotonic()

        def stop_measurement(started, barrier):
            barrier.block_until_ready()
            self._time_per_part[name] += time.monotonic() - started.result()

        started = self._executor.submit(start_measurement, _squareit(jnp.array(0.0)))
        yield
        self._executor.submit(stop_measurement, started, _squareit(jnp.array(0.0)))

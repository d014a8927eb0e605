"""Metric writers: clu's, with TensorBoard event files written without TensorFlow.

``clu.metric_writers`` imports its TensorFlow ``SummaryWriter`` when the package is
imported, and TensorFlow is not a dependency. Before clu is imported we register, under
that module's name, a writer with the same interface backed by tensorboardX. Everything
else (console logging, fan-out, asynchronous writes, ``create_default_writer``,
``ReportProgress``) is clu's own code. Import clu through this module.
"""
from __future__ import annotations

import sys
import types
from typing import Any, Mapping, Optional

import numpy as np


class TensorBoardWriter:
    """clu ``MetricWriter`` interface over tensorboardX event files."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(logdir=str(logdir), flush_secs=30)

    def write_summaries(self, step, values, metadata=None):
        for key, value in values.items():
            self._writer.add_scalar(key, float(np.asarray(value)), global_step=step)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        for key, value in scalars.items():
            self._writer.add_scalar(key, float(value), global_step=step)

    def write_images(self, step: int, images: Mapping[str, Any]):
        for key, value in images.items():
            value = np.asarray(value)
            self._writer.add_images(key, value[None] if value.ndim == 3 else value, global_step=step,
                                    dataformats='NHWC')

    def write_videos(self, step, videos):
        pass

    def write_audios(self, step, audios, *, sample_rate):
        pass

    def write_texts(self, step: int, texts: Mapping[str, str]):
        for key, value in texts.items():
            self._writer.add_text(key, value, global_step=step)

    def write_histograms(self, step, arrays, num_buckets: Optional[Mapping[str, int]] = None):
        for key, value in arrays.items():
            self._writer.add_histogram(key, np.asarray(value), global_step=step)

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._writer.add_text('hparams', '\n'.join(f'    {k}: {v}' for k, v in sorted(hparams.items())), 0)

    def flush(self):
        self._writer.flush()

    def close(self):
        self._writer.close()


if 'clu.metric_writers' not in sys.modules:
    _shim = types.ModuleType('clu.metric_writers.summary_writer')
    _shim.SummaryWriter = TensorBoardWriter
    sys.modules['clu.metric_writers.summary_writer'] = _shim

import jax  # noqa: E402
from clu import metric_writers, periodic_actions  # noqa: E402,F401  (re-exported)


def create_writer(logdir: str | None, asynchronous: bool = True):
    """clu's default writer (console + TensorBoard) on process 0; nothing elsewhere."""
    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    return metric_writers.create_default_writer(logdir, asynchronous=asynchronous)

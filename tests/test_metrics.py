"""Metric writers and progress reports (colormae_jax.metrics): TensorBoard event files read back,
console lines in clu's format, steps/s and ETA notes, nothing written on processes other than 0,
and no TensorFlow imported."""
import logging
import os
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from clu import asynclib
from tensorboardX.proto import event_pb2

from colormae_jax import metrics


def read_events(logdir):
    """Every event of the event files in ``logdir`` (TFRecord framing, tensorboardX's protos)."""
    events = []
    for name in sorted(os.listdir(logdir)):
        with open(os.path.join(logdir, name), 'rb') as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack('<Q', data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4  # length, its crc, the record, its crc
    return events


def summaries(events):
    """``{tag: [(step, value or 'image' / 'text' / 'histogram')]}``."""
    out = {}
    for e in events:
        for v in e.summary.value:
            kind = v.WhichOneof('value')
            value = v.simple_value if kind == 'simple_value' else {'image': 'image', 'histo': 'histogram'}.get(
                kind, 'text')
            out.setdefault(v.tag, []).append((e.step, value))
    return out


class Recorder(metrics.MetricWriter):
    def __init__(self):
        self.scalars = []

    def write_scalars(self, step, scalars):
        self.scalars.append((step, dict(scalars)))


def test_no_tensorflow_is_imported():
    code = 'import sys, colormae_jax.metrics; print(sorted(m for m in sys.modules if m.split(".")[0] == "tensorflow"))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]'


@pytest.mark.parametrize('asynchronous', [True, False])
def test_event_files_and_console_lines(tmp_path, caplog, asynchronous):
    caplog.set_level(logging.INFO, logger='absl')
    writer = metrics.create_writer(str(tmp_path / 'tb'), asynchronous=asynchronous)
    assert isinstance(writer, metrics.AsyncWriter) == asynchronous
    writer.write_hparams({'lr': 0.1})
    writer.write_scalars(3, {'loss': 0.25, 'epoch': 1.5, 'n': 7})
    writer.write_scalars(4, {'loss': 0.125})
    writer.write_images(4, {'masks': np.zeros((8, 8, 3), np.float32)})
    writer.write_texts(5, {'note': 'hello'})
    writer.write_histograms(5, {'w': np.arange(10.0)})
    writer.flush()
    writer.close()

    got = summaries(read_events(tmp_path / 'tb'))
    assert got['loss'] == [(3, 0.25), (4, 0.125)] and got['n'] == [(3, 7.0)] and got['epoch'] == [(3, 1.5)]
    assert got['masks'] == [(4, 'image')] and got['w'] == [(5, 'histogram')]
    assert (5, 'text') in got['note/text_summary'] and 'hparams/text_summary' in got

    lines = [r.getMessage() for r in caplog.records if r.name == 'absl']
    assert '[3] epoch=1.5, loss=0.25, n=7' in lines and '[4] loss=0.125' in lines
    assert "[4] Got images: {'masks': (8, 8, 3)}." in lines and "[5] Got texts: {'note': 'hello'}." in lines
    assert "[Hyperparameters] {'lr': 0.1}" in lines
    assert any(s.startswith("[5] Histogram for 'w' = {[0, 0.3): 1,") and s.endswith('[8.7, 9]: 1}') for s in lines)


def test_other_processes_write_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(jax, 'process_index', lambda: 1)
    writer = metrics.create_writer(str(tmp_path / 'tb'))
    assert type(writer) is metrics.MetricWriter
    for name in metrics.WRITE_METHODS[:3]:
        getattr(writer, name)(1, {'x': 1.0})
    writer.write_hparams({'a': 1})
    writer.flush()
    writer.close()
    assert not (tmp_path / 'tb').exists()


def test_background_error_is_raised_by_the_next_call():
    class Broken(metrics.MetricWriter):
        def write_scalars(self, step, scalars):
            raise OSError('disk full')

    writer = metrics.AsyncWriter(Broken())
    writer.write_scalars(1, {'x': 1.0})
    with pytest.raises(asynclib.AsyncError, match='disk full'):
        writer.flush()


def test_progress_steps_per_sec_eta_and_time_shares(caplog):
    caplog.set_level(logging.INFO, logger='absl')
    rec = Recorder()
    progress = metrics.ReportProgress(num_train_steps=2000, writer=rec, every_steps=10, every_secs=None)
    with progress.timed('data', wait_jax_async_dispatch=False):
        time.sleep(0.02)
    with progress.timed('eval'):  # measured between device barriers, on a background thread
        jax.block_until_ready(jax.numpy.ones(3) * 2)
    progress._executor.submit(lambda: None).result()  # the measurement has been added
    reported = [progress(step, t=100.0 + 0.1 * (step - 1)) for step in range(1, 21)]
    assert [s for s, r in zip(range(1, 21), reported) if r] == [10, 20]  # the first call only starts the clock
    assert [s for s, _ in rec.scalars] == [10, 20]
    assert rec.scalars[0][1]['steps_per_sec'] == pytest.approx(10.0) and rec.scalars[0][1]['uptime'] > 0.02
    notes = [r.getMessage() for r in caplog.records if r.getMessage().startswith('Setting work unit notes')]
    assert notes[0].startswith('Setting work unit notes: 10.0 steps/s, 0.5% (10/2000), ETA: 3m (0m : ')
    assert '% data' in notes[0] and '% eval' in notes[-1]
    with pytest.raises(ValueError, match='called after every step'):
        progress(22)


def test_progress_reports_at_the_last_step_and_on_time():
    rec = Recorder()
    progress = metrics.ReportProgress(num_train_steps=5, writer=rec, every_steps=None, every_secs=1.0)
    for step, t in [(1, 0.0), (2, 0.5), (3, 1.6), (4, 1.8), (5, 1.9)]:
        progress(step, t=t)
    assert [s for s, _ in rec.scalars] == [3, 5]


def test_format_secs():
    assert metrics._format_secs(123456.7) == '1d10h17m'
    assert metrics._format_secs(59) == '0m' and metrics._format_secs(3600) == '1h0m'

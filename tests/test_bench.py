"""The benchmark harnesses run (their numbers are not tested)."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), '..')


@pytest.mark.slow
def test_perf_harness_tiny(tmp_path):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run([sys.executable, 'benchmarks/perf.py', '--tiny', '--steps=1', '--warmup=1', '--no_torch',
                        '--noinput', '--only=famt', f'--out={tmp_path}'], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (out,) = list(tmp_path.glob('*_tiny.json'))
    res = json.loads(out.read_text())
    (row,) = res['rows']
    assert row['name'] == 'famt/bf16/xla' and row['img_per_s'] > 0 and 0 < row['mfu']
    assert 0.5 < row['xla_vs_analytic'] < 2.0  # the analytic FLOP count agrees with XLA's
    assert '| famt/bf16/xla |' in r.stdout


def test_perf_harness_budget_skips_what_would_start_late_and_still_writes(tmp_path):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1')
    r = subprocess.run([sys.executable, 'benchmarks/perf.py', '--tiny', '--steps=1', '--warmup=1', '--no_torch',
                        '--noinput', '--grid=full', '--only=famt', '--budget_s=1', f'--out={tmp_path}'], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(tmp_path.glob('*_tiny.json')).read_text())
    assert [row['name'] for row in res['rows']] == ['famt/bf16/xla', 'famt/bf16/xla/remat', 'famt/fp32/xla',
                                                     'famt/fp32/xla/remat']
    # a row takes more than 1 s (it compiles): at most the first one ran
    assert sum(row.get('error', '').startswith('skipped') for row in res['rows']) >= 3
    assert '| famt/fp32/xla/remat | skipped: --budget_s spent |' in r.stdout

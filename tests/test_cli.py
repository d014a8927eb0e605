"""The README's quick-start command, through config_flags, on a tiny folder; user errors as
one line with exit code 2; SIGTERM's exit code."""
import logging as py_logging
import os
import signal
import subprocess
import sys

import pytest

from helpers import make_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*flags, env_extra=None):
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', **(env_extra or {}))
    return subprocess.run([sys.executable, '-m', 'colormae_jax.main', *flags], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_main_smoke_with_overrides(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=8, splits=('train', 'test'))
    wd = tmp_path / 'wd'
    r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={wd}', f'--config.data.root={root}',
                 f'--config.data.data_dir={tmp_path / "tfds"}', '--config.batch_size=4', '--config.total_steps=3',
                 '--config.ckpt.every_steps=3')
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.listdir(wd / 'checkpoints') == ['3']
    assert 'Training steps 1..3 of 3' in r.stderr
    assert 'loss=' in r.stderr
    last = [x for x in r.stderr.splitlines() if x.strip()][-1]  # the closing summary
    assert 'Done (pretrain): step 3 of 3; last loss ' in last and 'knn/cls_top1=' in last, last
    assert f'checkpoints in {wd}/checkpoints, TensorBoard in {wd}/tb.' in last
    assert 'Using custom data configuration' not in r.stderr  # TFDS's noise, filtered


_HELP = '--workdir: Checkpoints, TensorBoard logs'  # a line of absl's flag help


def assert_user_error(r, *expected):
    """Exit code 2; the last line is ``error: ...`` holding ``expected``; no traceback, no flag help."""
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert lines and lines[-1].startswith('error: '), r.stderr[-3000:]
    assert sum(x.startswith('error: ') for x in lines) == 1, r.stderr[-3000:]
    assert 'Traceback' not in r.stderr and _HELP not in r.stderr, r.stderr[-3000:]
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


BAD_CONFIGS = {
    'value': (['--config=configs/cifar10.py:smoke', '--config.mask.ratio=1.5'],
              'error: config.mask.ratio: must be in (0, 1), got 1.5'),
    'config argument': (['--config=configs/cifar10.py:smoke,colour=red'],
                        "error: config.arg.colour: unknown config argument 'colour'"),
    'empty workdir': (['--config=configs/cifar10.py:smoke', '--workdir='], 'error: --workdir: empty; give the folder'),
}


@pytest.mark.parametrize('case', sorted(BAD_CONFIGS))
def test_main_refuses_bad_config_before_compiling(tmp_path, case):
    flags, expected = BAD_CONFIGS[case]
    if not any(f.startswith('--workdir') for f in flags):
        flags = [*flags, f'--workdir={tmp_path}']
    assert_user_error(run_main(*flags), expected)


# Flag parsing errors (before main): one line each, with what to do.
FLAG_ERRORS = {
    'typo': (['--config.bathc_size=3'], 'error: config.bathc_size: no such key; did you mean config.batch_size?'),
    'bad value': (['--config.batch_size=abc'], "error: config.batch_size: cannot use 'abc' (invalid literal for int() "
                                               "with base 10: 'abc'); give an integer like the config's"),
    'no config file': (['--config=configs/nope.py'], 'error: configs/nope.py: config file not found'),
}


@pytest.mark.parametrize('case', sorted(FLAG_ERRORS))
def test_flag_errors_are_one_line(tmp_path, case):
    flags, expected = FLAG_ERRORS[case]
    if not any(f.startswith('--config=') for f in flags):
        flags = ['--config=configs/cifar10.py:smoke', *flags]
    if not any(f.startswith('--workdir') for f in flags):
        flags = [*flags, f'--workdir={tmp_path}']
    assert_user_error(run_main(*flags), expected)


def test_flag_error_messages():
    """More messages of cli._flag_error, in this process (the subprocess tests above cover the path)."""
    from absl import flags

    from colormae_jax import cli
    config = f'--config={REPO}/configs/cifar10.py:smoke'
    assert cli._flag_error(AttributeError('maks'), ['m', config, '--config.maks.ratio=0.5']) == \
        'config.maks.ratio: no such key; did you mean config.mask.ratio?'
    assert cli._flag_error(KeyError('x'), ['m', config, '--config.zzz_qqq=1']) == \
        'config.zzz_qqq: no such key; the keys are those of the config file and colormae_jax/defaults.py'
    assert cli._flag_error(flags.UnrecognizedFlagError('workdirr'), ['m', '--workdirr=/tmp/x']) == \
        '--workdirr: unknown flag; did you mean --workdir?'
    assert cli._flag_error(flags.UnrecognizedFlagError('config.batch_size'), ['m', '--config.batch_size=3']) == \
        '--config.batch_size: an override needs a config file; give --config first, e.g. ' \
        '--config=configs/cifar10.py:smoke --config.batch_size=...'
    e = flags.IllegalFlagValueError('flag --config=None: Flag --config must have a value other than None.')
    assert cli._flag_error(e, ['m']) == '--config: missing; give it, e.g. --config=configs/cifar10.py:smoke'
    e = flags.IllegalFlagValueError("flag --config.base_lr=x: could not convert string to float: 'x'")
    assert cli._flag_error(e, ['m', config, '--config.base_lr=x']) == \
        "config.base_lr: cannot use 'x' (could not convert string to float: 'x'); give a number like the config's 0.01"


@pytest.mark.parametrize('case', ['warmup', 'empty split', 'workdir'])
def test_run_time_errors_are_one_line(tmp_path, case):
    """Errors raised once the run has started (a ConfigError of the trainer, a DataError of the
    data check, a workdir that cannot be made) are printed as one line too."""
    splits = ('train',) if case == 'empty split' else ('train', 'test')
    root = make_folder(tmp_path / 'imgs', per_class=4, splits=splits)
    if case == 'empty split':
        os.makedirs(os.path.join(root, 'test', 'cat'))  # a split folder without images
    data = [f'--config.data.root={root}', f'--config.data.data_dir={tmp_path / "tfds"}']
    if case == 'warmup':
        r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={tmp_path / "wd"}', *data,
                     '--config.batch_size=4', '--config.total_steps=3', '--config.warmup_steps=5')
        assert_user_error(r, 'error: config.warmup_steps: warm-up (5 steps) is longer than training (3 steps)')
    elif case == 'empty split':
        r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={tmp_path / "wd"}', *data)
        assert_user_error(r, f'error: split folder {root}/test holds no images', 'Add images or remove the folder.')
    else:
        (tmp_path / 'file').write_text('')
        r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={tmp_path / "file" / "wd"}', *data)
        assert_user_error(r, f'error: {tmp_path / "file" / "wd"}: cannot create the workdir (Not a directory)')


def test_verbose_shows_the_traceback(tmp_path):
    r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={tmp_path}', '--config.bathc_size=3',
                 env_extra={'COLORMAE_VERBOSE': '1'})
    assert r.returncode not in (0, 2) and 'Traceback' in r.stderr


@pytest.mark.slow
def test_sigterm_exits_with_the_preemption_code(tmp_path):
    """A SIGTERM'd run saves, logs why it stopped and exits with main.EXIT_PREEMPTED (a finished
    run exits 0: test_main_smoke_with_overrides)."""
    from colormae_jax import main
    root = make_folder(tmp_path / 'imgs', per_class=8)
    wd = tmp_path / 'wd'
    env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
    p = subprocess.Popen([sys.executable, '-m', 'colormae_jax.main', '--config=configs/cifar10.py:smoke',
                          f'--workdir={wd}', f'--config.data.root={root}',
                          f'--config.data.data_dir={tmp_path / "tfds"}', '--config.batch_size=4',
                          '--config.total_steps=100000', '--config.knn.every_epochs=0',
                          '--config.image_summary_every_epochs=0', '--config.log_every_steps=1'],
                         cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    err = []
    try:
        for line in p.stderr:  # SIGTERM once the first step's metrics are out
            err.append(line)
            if 'loss=' in line:
                p.send_signal(signal.SIGTERM)
                break
        err.extend(p.stderr)
        rc = p.wait(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    err = ''.join(err)
    assert rc == main.EXIT_PREEMPTED == 75, err[-3000:]
    saved = os.listdir(wd / 'checkpoints')
    assert len(saved) == 1 and 0 < int(saved[0]) < 100000
    last = [x for x in err.splitlines() if x.strip()][-1]
    assert 'Stopped early (SIGTERM or deadline; exit code 75' in last and f'step {saved[0]} of 100000' in last


def test_noise_filter_keeps_real_warnings():
    from colormae_jax import cli

    def record(level, msg):
        return py_logging.LogRecord('x', level, __file__, 1, msg, None, None)

    assert not cli._drop_noise(record(py_logging.INFO, "Unable to initialize backend 'tpu': INTERNAL: no libtpu"))
    assert not cli._drop_noise(record(py_logging.WARNING, "Using custom data configuration: BuilderConfig(...)"))
    assert cli._drop_noise(record(py_logging.WARNING, "Unable to initialize backend 'tpu': ..."))  # not INFO
    assert cli._drop_noise(record(py_logging.ERROR, 'Using custom data configuration'))
    assert cli._drop_noise(record(py_logging.INFO, "Unable to initialize backend 'cuda'"))
    assert cli._drop_noise(record(py_logging.WARNING, 'a real warning'))


def test_error_line_of_a_checkpoint_mismatch():
    from colormae_jax import cli
    from colormae_jax.checkpoints import checkpointer as checkpoint
    e = checkpoint.CheckpointMismatch(
        'The checkpoint /w/checkpoints/4 does not match this config:\n'
        "  model.variant: checkpoint has 'Ti/4', config has 'S/4'\n"
        '  state/params/x: checkpoint has (1,), config needs (2,)\n'
        'Use a new --workdir for a different model, or restore the config (saved in /w/checkpoints/4/config).')
    assert cli.error_line(e) == (
        "error: /w/checkpoints/4: the checkpoint does not match this config: model.variant: checkpoint has 'Ti/4', "
        "config has 'S/4'; state/params/x: checkpoint has (1,), config needs (2,); Use a new --workdir for a "
        'different model, or restore the config (saved in /w/checkpoints/4/config).')
    assert cli.error_line(RuntimeError('a bug')) is None  # shown with its traceback
    assert cli.error_line(PermissionError(13, 'Permission denied', '/w/tb/x'), '/w') == (
        'error: /w/tb/x: Permission denied; give --workdir a folder this user can write (an existing one is resumed)')
    assert cli.error_line(PermissionError(13, 'Permission denied', '/elsewhere'), '/w') is None


def test_data_preparation_failure_on_process_0_reaches_every_process(tmp_path, monkeypatch):
    """With several processes, process 0 prepares the data; if it fails, the others are told
    at once (not left at a barrier until the heartbeat timeout)."""
    import jax
    import ml_collections
    import pytest

    from colormae_jax import defaults, errors, main
    told = []
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    monkeypatch.setattr(main.multihost_utils, 'broadcast_one_to_all', lambda x: told.append(bool(x)) or x)
    broken = make_folder(tmp_path / 'imgs', per_class=2)
    open(os.path.join(broken, 'train', 'cat', 'bad.jpg'), 'wb').write(b'not a jpeg')
    config = ml_collections.ConfigDict({'data': defaults.data_config()})
    config.data.root, config.data.data_dir = broken, str(tmp_path / 'tfds')
    monkeypatch.setattr(jax, 'process_index', lambda: 0)
    with pytest.raises(errors.DataError, match='bad.jpg'):
        main.prepare_data_once(config)
    assert told == [False]
    monkeypatch.setattr(jax, 'process_index', lambda: 1)  # another process: told by process 0's broadcast
    monkeypatch.setattr(main.multihost_utils, 'broadcast_one_to_all', lambda x: False)
    with pytest.raises(errors.DataError, match='process 0 could not prepare the data'):
        main.prepare_data_once(config)

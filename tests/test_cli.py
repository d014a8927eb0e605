"""The README's quick-start command, through config_flags, on a tiny folder."""
import os
import subprocess
import sys

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


def test_main_refuses_bad_config_before_compiling(tmp_path):
    r = run_main('--config=configs/cifar10.py:smoke', f'--workdir={tmp_path}', '--config.mask.ratio=1.5')
    assert r.returncode != 0
    assert 'config.mask.ratio: must be in (0, 1), got 1.5' in r.stderr
    r = run_main('--config=configs/cifar10.py:smoke,colour=red', f'--workdir={tmp_path}')
    assert r.returncode != 0 and "unknown config argument 'colour'" in r.stderr
    r = run_main('--config=configs/cifar10.py:smoke', '--workdir=')
    assert r.returncode != 0 and '--workdir is empty' in r.stderr


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

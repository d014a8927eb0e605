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

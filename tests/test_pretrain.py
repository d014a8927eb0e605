"""End to end: the real loop on a tiny folder, checkpoints, resume, bad input."""
import os
import signal

import jax
import numpy as np
import pytest

from colormae_jax import main
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.data import pipeline as data

from helpers import make_folder, smoke_config


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    root = make_folder(base / 'imgs', per_class=16)
    return root, str(base / 'tfds')


DEV = jax.devices()[:1]


@pytest.mark.slow
def test_resume_equals_uninterrupted(folder, tmp_path):
    root, data_dir = folder
    c = smoke_config(root, data_dir)
    full = main.run(c, str(tmp_path / 'a'), devices=DEV)
    assert len(full['losses']) == 12 and full['step'] == 12
    assert sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['12', '4', '8'] or \
        sorted(os.listdir(tmp_path / 'a' / 'checkpoints')) == ['12', '8', '4']
    assert any(f.startswith('events') for f in os.listdir(tmp_path / 'a' / 'tb'))
    # Killed after step 6: the checkpoint of step 4 survives; the relaunch redoes 5 and 6.
    first = main.run(c, str(tmp_path / 'b'), devices=DEV, stop_after=6)
    assert first['losses'] == full['losses'][:6]
    second = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert second['losses'] == full['losses'][4:]  # bitwise
    jax.tree.map(np.testing.assert_array_equal, second['state']['params'], full['state']['params'])


@pytest.mark.slow
def test_sigterm_saves_and_resumes(folder, tmp_path, monkeypatch):
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{'ckpt.every_steps': 100})
    calls = {'n': 0}
    real = data.to_global

    def to_global(batch, sh):
        calls['n'] += 1
        if calls['n'] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(batch, sh)

    monkeypatch.setattr(data, 'to_global', to_global)
    out = main.run(c, str(tmp_path), devices=DEV)
    assert out['step'] == 3 and os.listdir(tmp_path / 'checkpoints') == ['3']
    monkeypatch.setattr(data, 'to_global', real)
    rest = main.run(c, str(tmp_path), devices=DEV)
    assert rest['step'] == 12 and len(rest['losses']) == 9


@pytest.mark.slow
def test_mismatched_checkpoint_is_refused(folder, tmp_path):
    root, data_dir = folder
    main.run(smoke_config(root, data_dir, total_steps=4), str(tmp_path), devices=DEV)
    other = smoke_config(root, data_dir, total_steps=4, **{'model.decoder.width': 64})
    with pytest.raises(checkpoint.CheckpointMismatch) as e:
        main.run(other, str(tmp_path), devices=DEV)
    msg = str(e.value)
    assert 'model.decoder.width: checkpoint has 32, config has 64' in msg
    assert 'params/decoder/blocks/0/attn/proj/kernel: checkpoint has (32, 32), config needs (64, 64)' in msg
    assert str(tmp_path) in msg


@pytest.mark.slow
def test_nan_stops_and_keeps_last_good_checkpoint(folder, tmp_path):
    root, data_dir = folder
    c = smoke_config(root, data_dir, base_lr=1e12, total_steps=12, warmup_steps=0)
    with pytest.raises(FloatingPointError, match='non-finite training metrics at step') as e:
        main.run(c, str(tmp_path), devices=DEV)
    saved = os.listdir(tmp_path / 'checkpoints') if os.path.exists(tmp_path / 'checkpoints') else []
    assert 'last good checkpoint is' in str(e.value)
    for s in saved:  # whatever was saved holds finite parameters
        restored = checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).manager.restore(int(s))
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(restored['state']['params']))


@pytest.mark.slow
def test_gradient_clipping_can_be_turned_on_when_resuming(folder, tmp_path):
    """The NaN message advises setting grad_clip_norm and relaunching: the checkpoint must fit."""
    root, data_dir = folder
    main.run(smoke_config(root, data_dir, total_steps=8), str(tmp_path), devices=DEV, stop_after=4)
    rest = main.run(smoke_config(root, data_dir, total_steps=8, grad_clip_norm=1e-3), str(tmp_path),
                                    devices=DEV)
    assert rest['step'] == 8 and len(rest['losses']) == 4
    assert np.isfinite(rest['losses']).all()


def test_missing_dataset_is_refused_before_compiling(tmp_path):
    c = smoke_config(tmp_path / 'nope', tmp_path / 'tfds')
    from colormae_jax import config_lib
    with pytest.raises(config_lib.ConfigError, match='data.root'):
        main.run(c, str(tmp_path / 'wd'), devices=DEV)

import os
import re
import sys

import pytest

from colormae_jax import config_lib

from helpers import override

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10  # noqa: E402
import imagenet  # noqa: E402
import imagenet_eval  # noqa: E402


def smoke(tmp_path, **over):
    c = cifar10.get_config('smoke')
    c.data.root = str(tmp_path)
    (tmp_path / 'train').mkdir(exist_ok=True)
    (tmp_path / 'test').mkdir(exist_ok=True)
    return override(c, **over)


def test_shipped_configs_validate(tmp_path):
    config_lib.validate(smoke(tmp_path), num_devices=4)
    config_lib.validate(cifar10.get_config('mask=random,variant=S/2'), num_devices=4, check_data=False)
    c = imagenet.get_config()
    assert (c.model.variant, c.batch_size, c.total_epochs, c.warmup_epochs) == ('B/16', 4096, 800, 40)
    assert (c.model.decoder.depth, c.model.decoder.width) == (8, 512)
    assert (c.b1, c.b2, c.wd, c.base_lr) == (0.9, 0.95, 0.05, 1.5e-4)
    config_lib.validate(c, num_devices=4, check_data=False)
    config_lib.validate(imagenet.get_config('smoke'), num_devices=4, check_data=False)


def test_famt_update_batch_must_split_over_devices(tmp_path):
    c = smoke(tmp_path, **{'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.4,
                           'mask.famt.update_batch_size': 6})
    with pytest.raises(config_lib.ConfigError, match='config.mask.famt.update_batch_size: 6 is not divisible by'):
        config_lib.validate(c, num_devices=4)


def test_eval_configs_follow_mae_recipes():
    for task in ('linear_probe', 'finetune'):  # torchvision's RandomResizedCrop default, as MAE's eval scripts
        assert tuple(imagenet_eval.get_config(f'task={task}').data.crop_scale) == (0.08, 1.0)
    probe = imagenet_eval.get_config('task=linear_probe')
    assert (probe.base_lr, probe.wd, probe.total_epochs, probe.warmup_epochs) == (0.1, 0.0, 90, 10)


def test_config_arg_parsing():
    c = cifar10.get_config('mask=random,variant=S/2')
    assert c.model.variant == 'S/2' and c.mask.strategy == 'random'
    with pytest.raises(config_lib.ConfigError, match="unknown config argument 'colour'"):
        cifar10.get_config('colour=red')


@pytest.mark.parametrize('key,value,match', [
    ('model.variant', 'Ti/5', 'config.model.variant: patch 5 does not divide data.image_size=32'),
    ('model.variant', 'Q/4', 'config.model.variant: .*unknown size'),
    ('mask.ratio', 1.0, r'config.mask.ratio: must be in \(0, 1\)'),
    ('mask.ratio', 0.0, r'config.mask.ratio: must be in \(0, 1\)'),
    ('mask.throw_ratio', 0.25, 'config.mask.ratio: .*leave 0 visible'),
    ('batch_size', 30, 'config.batch_size: 30 is not divisible by the 4 devices'),
    ('mask.strategy', 'purple-ish', "config.mask.strategy: 'purple-ish' is unknown; valid: \\['blue', 'famt', 'green'"),
    ('data.root', '/nonexistent/cifar', "config.data.root: '/nonexistent/cifar' is not a directory"),
    ('data.split', 'val', 'config.data.split: .*does not exist; the splits'),
    ('mesh', (('data', 3),), 'config.mesh: .*does not fit 4 devices'),
    ('model.compute_dtype', 'float16', "config.model.compute_dtype: 'float16'; valid"),
    ('model.decoder.heads', 3, 'config.model.decoder.width: 32 must be divisible'),
    ('total_epochs', None, 'config.total_steps: set total_steps or total_epochs'),
    ('model.attn_impl', 'flash', "config.model.attn_impl: 'flash'; valid"),
    ('data.crop_scale', (0.5, 0.2), 'config.data.crop_scale'),
    # values that used to fail only after compiling, or hours in, or give wrong numbers
    ('ckpt.every_steps', 0, 'config.ckpt.every_steps: must be >= 1'),
    ('log_every_steps', 0, 'config.log_every_steps: must be >= 1'),
    ('knn.k', 0, 'config.knn.k: must be >= 1'),
    ('knn.temperature', 0.0, 'config.knn.temperature: must be positive'),
    ('knn.batch_size', 6, 'config.knn.batch_size: 6 is not divisible by the 4 devices'),
    ('b2', 1.5, r'config.b2: must be in \[0, 1\)'),
    ('min_lr', 1.0, r'config.min_lr: must be in \[0, the peak lr'),
    ('data.prefetch_buffer', 0, 'config.data.prefetch_buffer: must be >= 1'),
])
def test_invalid_configs(tmp_path, key, value, match):
    c = smoke(tmp_path, **{key: value})
    if key == 'total_epochs':
        c.total_steps = None
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c, num_devices=4)


def test_a_relative_data_root_is_shown_resolved(tmp_path, monkeypatch):
    (tmp_path / 'run').mkdir()
    c = smoke(tmp_path / 'run')
    monkeypatch.chdir(tmp_path)
    c.data.root = '../nope'
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"config.data.root: '../nope' (resolved: {tmp_path.parent / 'nope'}) is not a directory; point it at")):
        config_lib.validate(c, num_devices=4)
    c.data.root, c.data.split = 'run', 'val'
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"config.data.split: 'run/val' (resolved: {tmp_path / 'run' / 'val'}) does not exist")):
        config_lib.validate(c, num_devices=4)

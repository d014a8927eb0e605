import os
import sys

import pytest

from colormae_jax import config_lib
from helpers import override

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10  # noqa: E402
import imagenet  # noqa: E402


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
])
def test_invalid_configs(tmp_path, key, value, match):
    c = smoke(tmp_path, **{key: value})
    if key == 'total_epochs':
        c.total_steps = None
    with pytest.raises(config_lib.ConfigError, match=match):
        config_lib.validate(c, num_devices=4)

"""Config helpers: ``get_config(arg)`` argument parsing, step counts, and the checks every
task runs before anything is compiled (the defaults themselves: :mod:`colormae_jax.defaults`)."""
from __future__ import annotations

import importlib.util
import os

import jax
import ml_collections

from colormae_jax import masking, parallel
from colormae_jax.errors import ConfigError
from colormae_jax.models import mae as model


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``'configs/cifar10.py:smoke'`` -> that file's ``get_config('smoke')``, as ``config_flags`` reads
    ``--config`` (the text after the first ':' is the argument). Raises FileNotFoundError for a missing file."""
    path, sep, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise FileNotFoundError(path)
    module_spec = importlib.util.spec_from_file_location(f'_colormae_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if sep else module.get_config()

def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """``'mask=random,variant=Ti/4,smoke'`` -> ConfigDict, typed like ``defaults``.

    A bare word sets a boolean default to True. Unknown keys are refused.
    """
    out = dict(defaults)
    for item in filter(None, (arg or '').split(',')):
        key, eq, value = item.partition('=')
        key = key.strip()
        if key not in defaults:
            raise ConfigError(f'arg.{key}', f'unknown config argument {key!r}; valid: {sorted(defaults)}')
        default = defaults[key]
        if not eq:
            if not isinstance(default, bool):
                raise ConfigError(f'arg.{key}', f'{key!r} needs a value ({key}=...)')
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ('1', 'true', 'yes', 'on')
        elif isinstance(default, (int, float)):
            out[key] = type(default)(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def resolve_steps(config, name: str, steps_per_epoch: int) -> int:
    """``config.{name}_steps`` if set, else ``config.{name}_epochs`` -> steps."""
    steps, epochs = config[f'{name}_steps'], config[f'{name}_epochs']
    if steps is None and epochs is None:
        raise ConfigError(f'{name}_steps', f'set {name}_steps or {name}_epochs')
    return int(steps) if steps is not None else int(round(epochs * steps_per_epoch))


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


def validate(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad pre-training config with a :class:`ConfigError` before anything is compiled."""
    num_devices = num_devices or jax.device_count()
    try:
        name, patch = model.parse_variant(config.model.variant)
    except ValueError as e:
        raise ConfigError('model.variant', str(e).split(': ', 1)[1]) from None
    size = config.data.image_size
    _check(isinstance(size, int) and size > 0, 'data.image_size', f'must be a positive int, got {size!r}')
    _check(size % patch == 0, 'model.variant',
           f'patch {patch} does not divide data.image_size={size}; use a patch in '
           f'{[p for p in range(1, size + 1) if size % p == 0 and p >= 2]}')
    width = model.VARIANTS[name][0]
    _check(width % model.VARIANTS[name][3] == 0 and width % 4 == 0, 'model.variant', 'width/heads mismatch')
    dec = config.model.decoder
    _check(dec.depth >= 1, 'model.decoder.depth', f'must be >= 1, got {dec.depth}')
    _check(dec.width % 4 == 0 and dec.width % dec.heads == 0, 'model.decoder.width',
           f'{dec.width} must be divisible by 4 and by model.decoder.heads={dec.heads}')
    _check(config.model.compute_dtype in ('float32', 'bfloat16'), 'model.compute_dtype',
           f"{config.model.compute_dtype!r}; valid: 'float32', 'bfloat16'")
    _check(config.model.attn_impl in model.ATTN_IMPLS, 'model.attn_impl',
           f"{config.model.attn_impl!r}; valid: {model.ATTN_IMPLS}")
    ratio = config.mask.ratio
    _check(0 < ratio < 1, 'mask.ratio', f'must be in (0, 1), got {ratio}')
    throw = config.mask.throw_ratio
    _check(0 <= throw < 1, 'mask.throw_ratio', f'must be in [0, 1), got {throw}')
    phases = masking.parse_schedule(config.mask)
    for phase in phases:
        strategy = masking.create(config.mask, size // patch, phase.name, **phase.ratios())
        try:
            strategy.counts
        except ValueError as e:
            key = 'mask.schedule' if phase.ratios() or len(phases) > 1 else 'mask.ratio'
            raise ConfigError(key, f'{phase.name}: {e}') from None
        strategy.check(num_devices)
    _validate_run(config, num_devices)
    _validate_data(config.data, check_data)
    knn = config.knn
    if knn.every_epochs:
        _check(knn.every_epochs > 0, 'knn.every_epochs', f'must be >= 0 (0: off), got {knn.every_epochs}')
        _validate_knn(knn, num_devices)
        if check_data and config.data.source == 'folder':
            split = os.path.join(config.data.root, config.data.eval_split)
            root = config.data.root
            splits = sorted(x for x in os.listdir(root) if os.path.isdir(os.path.join(root, x)))
            _check(os.path.isdir(split), 'knn.every_epochs',
                   f'the kNN monitor needs the eval split {_shown(split)}, which does not exist; set data.eval_split '
                   f'to one of {splits} or turn the monitor off with --config.knn.every_epochs=0')


def _check_batch(bs, num_devices: int, key: str) -> None:
    _check(isinstance(bs, int) and bs > 0, key, f'must be a positive int, got {bs!r}')
    _check(bs % num_devices == 0, key, f'{bs} is not divisible by the {num_devices} devices; use a multiple of '
                                       f'{num_devices}')


def _validate_knn(knn, num_devices: int) -> None:
    _check(knn.k >= 1, 'knn.k', f'must be >= 1, got {knn.k}')
    _check(knn.temperature > 0, 'knn.temperature', f'must be positive, got {knn.temperature}')
    if knn.batch_size:
        _check_batch(knn.batch_size, num_devices, 'knn.batch_size')


def _validate_run(config, num_devices: int) -> None:
    """Batch, mesh, optimizer, durations, checkpoints, logging: shared by every task."""
    _check_batch(config.batch_size, num_devices, 'batch_size')
    try:
        parallel.mesh_shape(config.mesh, num_devices)
    except ValueError as e:
        raise ConfigError('mesh', str(e)) from None
    _check(config.base_lr > 0, 'base_lr', f'must be positive, got {config.base_lr}')
    _check(config.wd >= 0, 'wd', f'must be >= 0, got {config.wd}')
    _check(0 <= config.min_lr <= config.base_lr * config.batch_size / 256, 'min_lr',
           f'must be in [0, the peak lr base_lr * batch_size / 256 = {config.base_lr * config.batch_size / 256:g}], '
           f'got {config.min_lr}')
    for b in ('b1', 'b2'):
        _check(0 <= config[b] < 1, b, f'must be in [0, 1), got {config[b]}')
    _check(config.grad_clip_norm >= 0, 'grad_clip_norm', f'must be >= 0 (0: off), got {config.grad_clip_norm}')
    k = config.get('grad_accum_steps', 1)
    _check(isinstance(k, int) and k >= 1, 'grad_accum_steps', f'must be an int >= 1 (1: off), got {k!r}')
    _check(config.batch_size % (num_devices * k) == 0, 'grad_accum_steps',
           f'{k} micro-batches do not split batch_size={config.batch_size} evenly over {num_devices} devices (each '
           f'device holds {config.batch_size / num_devices:g} examples); use a k that divides '
           f'{config.batch_size // num_devices}, or a batch_size that is a multiple of {num_devices * k}')
    for n in ('total', 'warmup'):
        steps, epochs = config[f'{n}_steps'], config[f'{n}_epochs']
        _check(steps is not None or epochs is not None, f'{n}_steps', f'set {n}_steps or {n}_epochs')
        v = steps if steps is not None else epochs
        _check(v >= 0, f'{n}_steps' if steps is not None else f'{n}_epochs', f'must be >= 0, got {v}')
    _check(config.ckpt.keep >= 1, 'ckpt.keep', f'must be >= 1, got {config.ckpt.keep}')
    _check(config.ckpt.every_steps >= 1, 'ckpt.every_steps', f'must be >= 1, got {config.ckpt.every_steps}')
    _check(config.log_every_steps >= 1, 'log_every_steps', f'must be >= 1, got {config.log_every_steps}')


def _validate_data(d, check_data: bool) -> None:
    _check(d.source in ('folder', 'tfds'), 'data.source', f"{d.source!r}; valid: 'folder', 'tfds'")
    _check(d.normalize_on in ('device', 'host'), 'data.normalize_on', f"{d.normalize_on!r}; valid: 'device', 'host'")
    _check(d.prefetch_buffer >= 1, 'data.prefetch_buffer', f'must be >= 1, got {d.prefetch_buffer}')
    _check(d.num_workers >= 0, 'data.num_workers', f'must be >= 0 (0: decode in this process), got {d.num_workers}')
    pipeline = d.get('pipeline', 'grain')
    _check(pipeline in ('grain', 'device'), 'data.pipeline', f"{pipeline!r}; valid: 'grain', 'device'")
    _check(d.get('device_max_gb', 0.0) >= 0, 'data.device_max_gb',
           f'must be >= 0 (0: automatic), got {d.get("device_max_gb")}')
    if pipeline == 'device' and jax.process_count() > 1:
        raise ConfigError('data.pipeline', f"'device' runs in one process, this run has {jax.process_count()}; "
                                           f"use data.pipeline='grain'")
    lo, hi = d.crop_scale
    _check(0 < lo <= hi <= 1, 'data.crop_scale', f'must satisfy 0 < min <= max <= 1, got {tuple(d.crop_scale)}')
    if check_data and d.source == 'folder':
        _check(bool(d.root) and os.path.isdir(d.root), 'data.root',
               f'{_shown(d.root) if d.root else repr(d.root)} is not a directory; point it at a folder laid out as '
               f'<root>/<split>/<class>/*.jpg, e.g. --config.data.root=../shared/data/cifar10')
        _check(os.path.isdir(os.path.join(d.root, d.split)), 'data.split',
               f'{_shown(os.path.join(d.root, d.split))} does not exist; the splits in {d.root!r} are '
               f'{sorted(x for x in os.listdir(d.root) if os.path.isdir(os.path.join(d.root, x)))}')
    if check_data and d.source == 'tfds':
        _check(bool(d.name), 'data.name', "set the TFDS dataset name, e.g. 'imagenet2012'")


def _shown(path: str) -> str:
    """``'../x' (resolved: /abs/x)`` for a relative path, ``'/abs/x'`` for an absolute one."""
    return f'{path!r}' + ('' if os.path.isabs(path) else f' (resolved: {os.path.abspath(path)})')


def validate_eval(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad evaluation config (kNN, linear probe, fine-tuning) before compiling."""
    num_devices = num_devices or jax.device_count()
    _check(bool(config.init_from), 'init_from', 'set the pre-training run to evaluate, e.g. '
                                                       '--config.init_from=/tmp/mae_green (a workdir or its '
                                                       'checkpoints/STEP, or a tools.convert import folder)')
    _check(isinstance(config.num_classes, int) and config.num_classes >= 2, 'num_classes',
           f'must be an int >= 2, got {config.num_classes!r}')
    _validate_knn(config.knn, num_devices)
    _check(config.probe.pool in ('cls', 'mean'), 'probe.pool', f"{config.probe.pool!r}; valid: 'cls', 'mean'")
    _check(config.probe.mode in ('fast', 'faithful'), 'probe.mode', f"{config.probe.mode!r}; valid: 'fast', "
                                                                    "'faithful'")
    _check(config.eval_every_epochs > 0, 'eval_every_epochs', f'must be positive, got {config.eval_every_epochs}')
    if config.get('model') is not None:
        resize = config.model.get('pos_embed_resize', 'interpolate')
        _check(resize in ('interpolate', 'recompute'), 'model.pos_embed_resize',
               f"{resize!r}; valid: 'interpolate', 'recompute'")
    _validate_run(config, num_devices)
    _validate_data(config.data, check_data)
    if check_data and config.data.source == 'folder':
        split = os.path.join(config.data.root, config.data.eval_split)
        splits = sorted(os.listdir(config.data.root))
        _check(os.path.isdir(split), 'data.eval_split',
               f'{_shown(split)} does not exist; the splits in {config.data.root!r} are {splits}')

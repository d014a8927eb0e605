"""Pre-trained params: reading them from any source, and the folder ``tools.convert import`` writes.

:func:`load_pretrained` (what ``config.init_from`` names), :func:`load_any_params` (a run, an
import folder, a Hugging Face folder, a ``.pth`` / ``.safetensors`` file: foreign layouts through
:mod:`colormae_jax.interop.torch_hf`), :func:`load_training_params` (a run's checkpoint, its params verified
against the step's checksums), :func:`load_params` / :func:`save_params` (the import folder).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging as absl_logging

from colormae_jax.checkpoints.checkpointer import CheckpointError
from colormae_jax.checkpoints.checksums import (
    CHECKSUMS,
    compare as _compare,
    error_summary as _one_line,
    expect as _expect,
    fingerprints,
)
from colormae_jax.errors import ConfigError, DataError
from colormae_jax.interop import torch_hf as interop
from colormae_jax.models import mae as model_lib

Params = Any
PARAMS_ITEM, CONFIG_FILE = 'params', 'mae_config.json'  # the folder save_params writes

# orbax warns twice each time a checkpoint folder is opened read-only, which these readers do on purpose
_READ_ONLY_NOTES = ('CheckpointManagerOptions.read_only=True, setting', 'Given directory is read only=')


def _drop_read_only_notes(record) -> bool:
    try:
        return not record.getMessage().startswith(_READ_ONLY_NOTES)
    except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
        return True


def read_only_manager(directory: str, item_handlers: dict) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` that reads ``directory`` and never writes or creates it, without
    orbax's two warnings that it is read-only."""
    logger = absl_logging.get_absl_logger()
    if _drop_read_only_notes not in logger.filters:
        logger.addFilter(_drop_read_only_notes)
    return ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False, save_interval_steps=0), item_handlers=item_handlers)

def _config_to_json(c: model_lib.MAEConfig) -> dict:
    d = dataclasses.asdict(c)
    d['dtype'] = jnp.dtype(c.dtype).name
    return d


def _single_device(abstract: Params) -> Params:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def save_params(path: str, params: Params, mae_config: model_lib.MAEConfig) -> str:
    """Writes ``path/params`` (orbax StandardCheckpointer, the pure dict) and ``path/mae_config.json``
    into a new folder (an existing ``path`` is never overwritten)."""
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise CheckpointError(f'{path} exists; choose a new directory (it is never overwritten).')
    os.makedirs(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, PARAMS_ITEM), params)
    with open(os.path.join(path, CONFIG_FILE), 'w') as f:
        json.dump(_config_to_json(mae_config), f, indent=1)
    return path


def load_params(path: str) -> tuple[Params, model_lib.MAEConfig]:
    """Reads what :func:`save_params` (and ``convert import``) wrote: (params, MAEConfig)."""
    path = os.path.abspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(cfg_file):
        raise CheckpointError(f'{path} has no {CONFIG_FILE}: it was not written by convert import / save_params.')
    with open(cfg_file) as f:
        d = json.load(f)
    c = model_lib.MAEConfig(**dict(d, dtype=jnp.dtype(d['dtype'])))
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, PARAMS_ITEM), _single_device(model_lib.abstract_mae(c)[1]))
    return params, c


def load_training_params(directory: str, step: int | None = None) -> tuple[Params, model_lib.MAEConfig, int]:
    """The params of a checkpoint written by ``colormae_jax.main`` -> (params, MAEConfig, step).

    ``directory``: the run's ``--workdir`` or its ``checkpoints`` folder; ``step``: None for the newest.
    The model comes from the run's saved config; only the params are read (not the optimizer state).
    """
    directory = os.path.abspath(directory)
    if os.path.isdir(os.path.join(directory, 'checkpoints')):
        directory = os.path.join(directory, 'checkpoints')
    if not os.path.isdir(directory):
        raise CheckpointError(f'{directory}: no such directory')
    mgr = read_only_manager(directory, {'config': ocp.JsonCheckpointHandler(), CHECKSUMS: ocp.JsonCheckpointHandler()})
    try:
        steps = list(mgr.all_steps())
        if not steps:
            raise CheckpointError(f'{directory} holds no checkpoint (no step folders).')
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f'{directory} has no step {step}; it has {sorted(steps)}.')
        where = os.path.join(directory, str(step))
        try:
            cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
            record = None
            if os.path.isdir(os.path.join(where, CHECKSUMS)):
                record = mgr.restore(step, args=ocp.args.Composite(**{CHECKSUMS: ocp.args.JsonRestore()}))[CHECKSUMS]
                _expect(record, 'config', cfg)
        except Exception as e:  # noqa: BLE001 - a damaged step: say so in one line
            raise CheckpointError(f'{where} is damaged ({_one_line(e)}); name an older step '
                                  f'({directory}/STEP) or resume the run, which sets damaged steps aside') from None
    finally:
        mgr.close()
    c = model_lib.mae_config(ml_collections.ConfigDict(cfg['model']), cfg['data']['image_size'])
    abstract = _single_device(model_lib.abstract_mae(c)[1])
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract)
    try:
        state = ocp.PyTreeCheckpointer().restore(
            os.path.join(where, 'state'),
            args=ocp.args.PyTreeRestore(item={'params': abstract}, restore_args={'params': restore_args},
                                        partial_restore=True))
        bad = [] if record is None else _compare(record['state'], fingerprints({'params': state['params']}), 'state')
    except Exception as e:  # noqa: BLE001
        bad = [_one_line(e)]
    if bad:
        raise CheckpointError(f'{where} is damaged ({bad[0]}); name an older step ({directory}/STEP) or resume '
                              f'the run, which sets damaged steps aside')
    return state['params'], c, step


def _is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, interop.HF_CONFIG)) and (
        os.path.isfile(os.path.join(path, interop.HF_WEIGHTS)) or os.path.isfile(os.path.join(path, interop.HF_INDEX)))


def load_any_params(source: str, step: int | None = None) -> tuple[Params, model_lib.MAEConfig, str]:
    """Params of any pre-trained source -> (params, MAEConfig, description).

    ``source``: a training ``--workdir`` (or its ``checkpoints`` folder; ``step``: None for the newest),
    ``WORKDIR/checkpoints/STEP``, a ``tools.convert import`` folder, a Hugging Face ``save_pretrained``
    folder (``config.json`` + ``model.safetensors``), or a ``.pth`` / ``.safetensors`` file in any layout
    ``tools.convert import`` reads (the model from a ViTMAE ``config.json``, else from the shapes, the heads
    from the variant table; other models: ``tools.convert import`` with ``--heads``). Raises
    :class:`CheckpointError` / :class:`interop.ConversionError` (a ``ValueError``) saying what is wrong.
    """
    if os.path.isfile(source):
        try:
            params, report = interop.import_source(source)
        except interop.ConversionError as e:
            if 'heads are not in the shapes' not in str(e):
                raise
            raise interop.ConversionError(
                f'{e} Read directly, {source} cannot be given them: import it once with python -m '
                f'colormae_jax.tools.convert import {source} DIR --heads N --dec_heads N, and use DIR.') from None
        return params, report.config, f'{report.layout} weights {os.path.abspath(source)}'
    if os.path.isfile(os.path.join(source, CONFIG_FILE)):
        params, c = load_params(source)
        return params, c, f'imported params {os.path.abspath(source)}'
    if os.path.isdir(source) and _is_hf_folder(source):
        params, report = interop.import_source(source)
        return params, report.config, f'Hugging Face ViTMAE folder {os.path.abspath(source)}'
    m = re.match(r'^(.*?)/checkpoints/(\d+)/?$', source)
    if m and step is None:
        source, step = m.group(1), int(m.group(2))
    params, c, step = load_training_params(source, step)
    return params, c, f'training checkpoint {os.path.abspath(source)} step {step}'


def load_pretrained(init_from: str) -> tuple[dict, model_lib.MAEConfig, str]:
    """(MAE params as a pure dict, its MAEConfig, a description) from ``config.init_from``: any source
    :func:`load_any_params` reads (a pre-training workdir, ``WORKDIR/checkpoints/STEP``, a ``tools.convert
    import`` folder, a Hugging Face folder, a ``.pth`` / ``.safetensors`` file)."""
    if not init_from:
        raise ConfigError('init_from', 'set the pre-training run to evaluate, e.g. '
                                       '--config.init_from=/tmp/mae_green (a workdir or its checkpoints/STEP)')
    if not os.path.exists(init_from):
        raise ConfigError('init_from', f'{init_from!r} is not a directory or a weights file (it does not exist)')
    try:
        return load_any_params(init_from)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError('init_from', f'cannot read pre-trained params from {init_from!r}: {e}') from None


def run_config(source: str, step: int | None = None) -> tuple[str, int, dict] | None:
    """(checkpoints folder, step, saved config) of a training run (``--workdir``, its
    ``checkpoints`` folder or ``WORKDIR/checkpoints/STEP``; ``step``: None for the newest);
    None for any other source. The config's ``task`` says which task wrote it."""
    source = str(source)
    m = re.match(r'^(.*?)/checkpoints/(\d+)/?$', source)
    if m and step is None:
        source, step = m.group(1), int(m.group(2))
    directory = os.path.abspath(source)
    if os.path.isdir(os.path.join(directory, 'checkpoints')):
        directory = os.path.join(directory, 'checkpoints')
    if not os.path.isdir(directory) or os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return None
    steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit() and os.path.isdir(os.path.join(directory, d)))
    if not steps:
        return None
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise DataError(f'{directory}: no step {step}; it has {steps}; name one of them (--step or '
                        f'WORKDIR/checkpoints/STEP)')
    mgr = read_only_manager(directory, {'config': ocp.JsonCheckpointHandler()})
    try:
        cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    except Exception as e:  # noqa: BLE001 - a damaged step: one line
        raise DataError(f'{directory}/{step}: cannot read its saved config ({type(e).__name__}); name another step '
                        f'(WORKDIR/checkpoints/STEP)') from None
    finally:
        mgr.close()
    return directory, step, cfg

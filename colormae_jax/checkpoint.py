"""Checkpoints: writing and reading them (orbax).

:class:`Checkpointer` is a run's CheckpointManager (asynchronous, atomic, keep the last K).
Each step directory holds four items:
  state  - the train state (sharded arrays; restored onto the current mesh),
  data   - the grain iterator state (one file per process), so a resumed run sees
           exactly the batches it would have seen (with another process count: the
           same batch count, in a new order, see ``Checkpointer._restart_data``),
  config - the run's config as JSON, to explain a mismatch in words,
  layout - the process count that wrote the step,
and the task's extra items (e.g. a masking strategy's host state, the best accuracy).

The readers of pre-trained params: :func:`load_pretrained` (what ``config.init_from``
names), :func:`load_training_params` (a run's checkpoint), :func:`load_params` /
:func:`save_params` (the folder ``tools.convert import`` writes).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import traverse_util

from colormae_jax import model as model_lib
from colormae_jax.errors import ConfigError

Params = Any
PARAMS_ITEM, CONFIG_FILE = 'params', 'mae_config.json'  # the folder save_params writes
# Keys of a data iterator state that depend on the process layout (data.TrainIterator's fingerprint).
PROCESS_LAYOUT_KEYS = ('process_index', 'process_count', 'batch')

# Config keys that fix the shapes of the train state.
SHAPE_KEYS = ('model.variant', 'model.decoder.width', 'model.decoder.depth', 'model.decoder.heads',
              'data.image_size')


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the current config."""


class CheckpointError(ValueError):
    """A folder does not hold the params it should; the message says which and what to do."""


def flat_config(config) -> dict:
    """``{'model.decoder.width': 128, ...}`` of a ConfigDict (or its dict)."""
    d = config.to_dict() if hasattr(config, 'to_dict') else config
    return traverse_util.flatten_dict(d, sep='.')


def _keystr(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator='/')


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, extra_items=()):
        """``extra_items``: the names of the task's extra items (see :meth:`save`)."""
        self.directory = os.path.abspath(directory) if '://' not in directory else directory
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_handlers={'state': ocp.StandardCheckpointHandler(),
                           'data': grain.checkpoint.CheckpointHandler(),
                           'config': ocp.JsonCheckpointHandler(),
                           'layout': ocp.JsonCheckpointHandler(),
                           **{k: ocp.StandardCheckpointHandler() for k in extra_items}},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: Any, *, force: bool = False,
             extra: dict | None = None) -> bool:
        args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(json.loads(config.to_json())),
                'layout': ocp.args.JsonSave({'process_count': jax.process_count(),
                                             'data': None if data_iter is None else data_iter.get_state()})}
        args.update({k: ocp.args.StandardSave(v) for k, v in (extra or {}).items()})
        if data_iter is not None:
            args['data'] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def check_compatible(self, step: int, abstract_state: Any, config: Any, extra: dict | None = None) -> None:
        """Raises CheckpointMismatch naming what differs between the checkpoint and the config."""
        where = f'{self.directory}/{step}'
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        now, then = flat_config(json.loads(config.to_json())), flat_config(saved)
        diffs = [f'  {k}: checkpoint has {then.get(k)!r}, config has {now.get(k)!r}'
                 for k in SHAPE_KEYS if then.get(k) != now.get(k)]
        meta = self.manager.item_metadata(step)['state']
        saved_shapes = {_keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(meta)
                        if hasattr(m, 'shape')}
        want_shapes = {_keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
        differ = [k for k in sorted(set(saved_shapes) | set(want_shapes)) if saved_shapes.get(k) != want_shapes.get(k)]
        shown = [k for k in differ if k.startswith('params/')][:8] or differ[:8]
        for k in shown:
            a, b = saved_shapes.get(k), want_shapes.get(k)
            diffs.append(f'  state/{k}: checkpoint has {a if a is not None else "nothing"}, '
                         f'config needs {b if b is not None else "nothing"}')
        if len(differ) > len(shown):
            diffs.append(f'  ... and {len(differ) - len(shown)} more arrays (optimizer state included)')
        metas = self.manager.item_metadata(step)
        for name, abstract in (extra or {}).items():
            have = metas.get(name) if hasattr(metas, 'get') else None
            if have is None:
                diffs.append(f'  {name}: the checkpoint has no {name!r} item, the config needs one')
                continue
            for p, x in jax.tree_util.tree_leaves_with_path(abstract):
                m = dict((_keystr(q), v) for q, v in jax.tree_util.tree_leaves_with_path(have)).get(_keystr(p))
                if m is not None and tuple(m.shape) != tuple(np.shape(x)):
                    diffs.append(f'  {name}/{_keystr(p)}: checkpoint has {tuple(m.shape)}, config needs '
                                 f'{tuple(np.shape(x))} (this run\'s {name!r} item: another dataset size or patch '
                                 f'grid?)')
        if diffs:
            raise CheckpointMismatch(
                f'The checkpoint {where} does not match this config:\n' + '\n'.join(diffs) +
                '\nUse a new --workdir for a different model, or restore the config the checkpoint was written with '
                f'(saved in {where}/config).')

    def restore(self, step: int, abstract_state: Any, data_iter: Any, config: Any,
                extra: dict | None = None) -> Any:
        """Restores the state onto the shardings of ``abstract_state`` (ShapeDtypeStructs with
        shardings: resharding across meshes and process counts is orbax's job) and sets
        ``data_iter`` in place. Returns ``(state, {item: restored tree})`` for the items of
        ``extra`` ({item: abstract tree, or a function of the item's saved metadata that
        returns one}, or None).

        A checkpoint written by another number of processes restores the state as usual; the
        data iterator restarts at the saved batch count (see :meth:`_restart_data`)."""
        if extra:
            metas = self.manager.item_metadata(step)
            extra = {k: v(metas.get(k)) if callable(v) else v for k, v in extra.items()}
        self.check_compatible(step, abstract_state, config, extra)
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        args.update({k: ocp.args.StandardRestore(v) for k, v in (extra or {}).items()})
        written_by = self.data_process_count(step) if data_iter is not None else None
        if data_iter is not None and written_by in (None, jax.process_count()):
            args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        if 'data' not in args and data_iter is not None:
            self._restart_data(step, data_iter, written_by)
        return out['state'], {k: out[k] for k in (extra or {})}

    def _layout(self, step: int) -> dict:
        """The ``layout`` item of ``step``: ``{'process_count', 'data'}`` (process 0's iterator state)."""
        return self.manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))['layout']

    def data_process_count(self, step: int) -> int | None:
        """How many processes wrote ``step``, or None for a step without a data iterator state."""
        layout = self._layout(step)
        return None if layout['data'] is None else int(layout['process_count'])

    def _restart_data(self, step: int, data_iter: Any, written_by: int) -> None:
        """The iterator state of a run with another process count cannot be carried over
        (each process read its own shard). Sets ``data_iter`` to the saved batch count with
        this run's layout: the same position in the epoch, in a new order of the examples."""
        saved = self._layout(step)['data']
        now = data_iter.get_state()
        if not (isinstance(saved, dict) and isinstance(now, dict) and 'step' in saved and 'step' in now):
            raise CheckpointMismatch(f'{self.directory}/{step} was written by {written_by} processes and the data '
                                     f'iterator state cannot be carried over to {jax.process_count()}; relaunch with '
                                     f'{written_by} processes')
        if 'batch' in saved and 'batch' in now and saved['batch'] * written_by != now['batch'] * jax.process_count():
            raise CheckpointMismatch(f'{self.directory}/{step}: global batch {saved["batch"] * written_by} in the '
                                     f'checkpoint, {now["batch"] * jax.process_count()} now')
        data_iter.set_state({**saved, **{k: now[k] for k in PROCESS_LAYOUT_KEYS if k in now}})
        logging.warning('%s/%d was written by %d processes, this run has %d: the train state is resharded; the '
                        'data iterator restarts at batch %d (epoch %.2f) in a new order of the examples.',
                        self.directory, step, written_by, jax.process_count(), saved['step'],
                        saved['step'] * now.get('batch', 0) * jax.process_count() / max(now.get('examples', 1), 1))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


# ------------------------------------------------------------------------------ pre-trained params

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
    mgr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True, create=False),
                                item_handlers={'config': ocp.JsonCheckpointHandler()})
    try:
        steps = list(mgr.all_steps())
        if not steps:
            raise CheckpointError(f'{directory} holds no checkpoint (no step folders).')
        step = max(steps) if step is None else step
        if step not in steps:
            raise CheckpointError(f'{directory} has no step {step}; it has {sorted(steps)}.')
        cfg = mgr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
    finally:
        mgr.close()
    c = model_lib.mae_config(ml_collections.ConfigDict(cfg['model']), cfg['data']['image_size'])
    abstract = _single_device(model_lib.abstract_mae(c)[1])
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype), abstract)
    state = ocp.PyTreeCheckpointer().restore(
        os.path.join(directory, str(step), 'state'),
        args=ocp.args.PyTreeRestore(item={'params': abstract}, restore_args={'params': restore_args},
                                    partial_restore=True))
    return state['params'], c, step


def load_any_params(source: str, step: int | None = None) -> tuple[Params, model_lib.MAEConfig, str]:
    """Params from an ``import`` output directory or a training run -> (params, MAEConfig, description)."""
    if os.path.isfile(os.path.join(source, CONFIG_FILE)):
        params, c = load_params(source)
        return params, c, f'imported params {os.path.abspath(source)}'
    params, c, step = load_training_params(source, step)
    return params, c, f'training checkpoint {os.path.abspath(source)} step {step}'


def load_pretrained(init_from: str) -> tuple[dict, model_lib.MAEConfig, str]:
    """(MAE params as a pure dict, its MAEConfig, a description) from ``config.init_from``: a
    pre-training workdir, ``WORKDIR/checkpoints/STEP``, or a ``tools.convert import`` folder."""
    if not init_from:
        raise ConfigError('init_from', 'set the pre-training run to evaluate, e.g. '
                                       '--config.init_from=/tmp/mae_green (a workdir or its checkpoints/STEP)')
    step = None
    m = re.match(r'^(.*?)/checkpoints/(\d+)/?$', init_from)
    if m:
        init_from, step = m.group(1), int(m.group(2))
    if not os.path.isdir(init_from):
        raise ConfigError('init_from', f'{init_from!r} is not a directory')
    try:
        return load_any_params(init_from, step)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError('init_from', f'cannot read pre-trained params from {init_from!r}: {e}') from None

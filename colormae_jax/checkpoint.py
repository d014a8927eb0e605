"""Checkpoints: orbax CheckpointManager (asynchronous, atomic, keep the last K).

Each step directory holds three items:
  state  - the train state (sharded arrays; restored onto the current mesh),
  data   - the grain iterator state (one file per process), so a resumed run sees
           exactly the batches it would have seen (with another process count: the
           same batch count, in a new order, see ``Checkpointer._restart_data``),
  config - the run's config as JSON, to explain a mismatch in words,
and optional extra items, e.g. ``famt`` (the FAMT weight store, sharded per process).
"""
from __future__ import annotations

import json
import os
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

EXTRA_ITEMS = ('famt', 'eval')
# Keys of a data iterator state that depend on the process layout (data.TrainIterator's fingerprint).
PROCESS_LAYOUT_KEYS = ('process_index', 'process_count', 'batch')

# Config keys that fix the shapes of the train state.
SHAPE_KEYS = ('model.variant', 'model.decoder.width', 'model.decoder.depth', 'model.decoder.heads',
              'data.image_size')


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the current config."""


def _flat(d: dict, prefix: str = '') -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _keystr(path) -> str:
    return '/'.join(str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory) if '://' not in directory else directory
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_handlers={'state': ocp.StandardCheckpointHandler(),
                           'data': grain.checkpoint.CheckpointHandler(),
                           'config': ocp.JsonCheckpointHandler(),
                           **{k: ocp.StandardCheckpointHandler() for k in EXTRA_ITEMS}},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: Any, *, force: bool = False,
             extra: dict | None = None) -> bool:
        args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(json.loads(config.to_json()))}
        args.update({k: ocp.args.StandardSave(v) for k, v in (extra or {}).items()})
        if data_iter is not None:
            args['data'] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def check_compatible(self, step: int, abstract_state: Any, config: Any, extra: dict | None = None) -> None:
        """Raises CheckpointMismatch naming what differs between the checkpoint and the config."""
        where = f'{self.directory}/{step}'
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))['config']
        now, then = _flat(json.loads(config.to_json())), _flat(saved)
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
                                 f'{tuple(np.shape(x))}' + (' (the FAMT weight store does not match the size of the '
                                                             'dataset or the patch grid)' if name == 'famt' else ''))
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

    def _data_dir(self, step: int) -> epath.Path:
        return epath.Path(self.directory) / str(step) / 'data'

    def data_process_count(self, step: int) -> int | None:
        """How many processes wrote the data iterator state of ``step`` (grain writes one
        ``process_<i>-of-<n>.json`` per process), or None without one."""
        d = self._data_dir(step)
        counts = {int(m.group(1)) for f in (d.iterdir() if d.exists() else ())
                  if (m := re.fullmatch(r'process_\d+-of-(\d+)\.json', f.name))}
        return counts.pop() if len(counts) == 1 else None

    def _restart_data(self, step: int, data_iter: Any, written_by: int) -> None:
        """The iterator state of a run with another process count cannot be carried over
        (each process read its own shard). Sets ``data_iter`` to the saved batch count with
        this run's layout: the same position in the epoch, in a new order of the examples."""
        saved = json.loads((self._data_dir(step) / f'process_0-of-{written_by}.json').read_text())
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

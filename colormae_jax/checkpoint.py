"""Checkpoints: orbax CheckpointManager (asynchronous, atomic, keep the last K).

Each step directory holds three items:
  state  - the train state (sharded arrays; restored onto the current mesh),
  data   - the grain iterator state (one file per process), so a resumed run sees
           exactly the batches it would have seen,
  config - the run's config as JSON, to explain a mismatch in words,
and optional extra items, e.g. ``famt`` (the FAMT weight store, sharded per process).
"""
from __future__ import annotations

import json
import os
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

EXTRA_ITEMS = ('famt', 'eval')

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
        ``extra`` ({item: abstract tree}, or None)."""
        self.check_compatible(step, abstract_state, config, extra)
        args = {'state': ocp.args.StandardRestore(abstract_state)}
        args.update({k: ocp.args.StandardRestore(v) for k, v in (extra or {}).items()})
        if data_iter is not None:
            args['data'] = grain.checkpoint.CheckpointRestore(data_iter)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out['state'], {k: out[k] for k in (extra or {})}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

"""Checkpoints: writing and reading them (orbax), verified.

:class:`Checkpointer` is a run's CheckpointManager (asynchronous, atomic, keep the last K).
Each step directory holds five items:
  state     - the train state (sharded arrays; restored onto the current mesh),
  data      - the grain iterator state (one file per process), so a resumed run sees
              exactly the batches it would have seen (with another process count: the
              same batch count, in a new order, see ``Checkpointer._restart_data``),
  config    - the run's config as JSON, to explain a mismatch in words,
  layout    - the process count that wrote the step,
  checksums - a fingerprint of every array (state and extra items) and a digest of the
              other items (see "Verification" below),
and the task's extra items (e.g. a masking strategy's host state, the best accuracy).

Verification: :func:`colormae_jax.checkpoints.checksums.fingerprints` reduces each array to 64 bits,
the same whatever its sharding or process count (:mod:`colormae_jax.checkpoints.checksums`); the
``checksums`` item is written in the same orbax save as the step (so it commits atomically
with it). On resume, :meth:`Checkpointer.restore_newest` restores and verifies the newest
step; a step that fails either is renamed ``STEP.damaged`` (never deleted) and the previous
one is tried; if none is left, :class:`CheckpointDamaged` says what to do.

The readers of pre-trained params are in :mod:`colormae_jax.interop.weights`.
"""
from __future__ import annotations

import gc
import inspect
import json
import os
import re
import sys
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import traverse_util
from jax.experimental import multihost_utils

from colormae_jax.checkpoints.checksums import (  # noqa: F401 - _keystr, fingerprints: also used as checkpoint.X
    CHECKSUMS,
    RECORD_VERSION,
    agree,
    all_digests,
    compare,
    digest,
    error_summary,
    expect,
    fingerprints,
    keystr,
    keystr as _keystr,
)

Params = Any
# Keys of a data iterator state that depend on the process layout (data.TrainIterator's fingerprint).
PROCESS_LAYOUT_KEYS = ('process_index', 'process_count', 'batch')

# Config keys that fix the shapes of the train state.
SHAPE_KEYS = ('model.variant', 'model.decoder.width', 'model.decoder.depth', 'model.decoder.heads',
              'data.image_size')


class CheckpointMismatch(ValueError):
    """The checkpoint does not fit the current config."""


class CheckpointError(ValueError):
    """A folder does not hold the params it should; the message says which and what to do."""


class StepDamaged(CheckpointError):
    """One step does not restore or does not verify; ``reason`` names what failed."""

    def __init__(self, where: str, reason: str):
        super().__init__(f'{where}: {reason}')
        self.reason = reason


class CheckpointDamaged(CheckpointError):
    """A run has checkpoints, but none restores and verifies: all are set aside as ``STEP.damaged``."""


DAMAGED = '.damaged'     # the suffix of a step folder set aside


def flat_config(config) -> dict:
    """``{'model.decoder.width': 128, ...}`` of a ConfigDict (or its dict)."""
    d = config.to_dict() if hasattr(config, 'to_dict') else config
    return traverse_util.flatten_dict(d, sep='.')


def _abandoned_read(u) -> bool:
    """An unraisable exception of the reads orbax abandons after one of them failed: its
    other coroutines, and tensorstore's callbacks into its closed event loop."""
    if isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == 'Event loop is closed':
        return True
    code = getattr(u.object, 'cr_code', None) if inspect.iscoroutine(u.object) else None
    return code is not None and f'{os.sep}orbax{os.sep}' in code.co_filename


def _quiet_abandoned_reads(collect: bool = True) -> None:
    """After a failed restore, the step's other reads still end in tensorstore's threads and
    Python prints each as a traceback ("Exception ignored in ..."): hundreds of lines after
    the one-line warning. Drops those (only those: anything else goes to the previous hook).
    The writes of a save that failed (disk full, file-size limit) end the same way."""
    previous = sys.unraisablehook
    if getattr(previous, '_colormae_quiet', False):
        if collect:
            gc.collect()
        return

    def hook(u):
        if not _abandoned_read(u):
            previous(u)

    hook._colormae_quiet = True
    sys.unraisablehook = hook
    if collect:
        gc.collect()  # the abandoned coroutines now, under the hook


class _Failed:
    """What a :func:`_tolerant` handler restores when reading its item raised ``error``."""

    def __init__(self, error: BaseException):
        self.error = error


def _tolerant(handler):
    """``handler`` (an orbax item handler), its ``restore`` returning :class:`_Failed` instead
    of raising. Orbax ends every restore with a barrier that is a collective: a process whose
    read fails (its own iterator file, the shards only it reads) must still reach it, or the
    processes would run different collectives (gloo aborts) before they can agree that the
    step is damaged. (The instance keeps its class: orbax matches handlers to args by class.)"""
    restore = handler.restore

    def tolerant_restore(*args, **kwargs):
        try:
            return restore(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - handed on as _Failed, raised after the barrier
            return _Failed(e)

    handler.restore = tolerant_restore
    return handler


def _raise_failed(out, names) -> None:
    for k in names:
        if isinstance(out[k], _Failed):
            raise out[k].error


class _StateCatcher(grain.DatasetIterator):
    """A restore target for the ``data`` item: keeps the state, so that it is verified
    before it reaches the run's iterator (whose ``set_state`` refuses other settings)."""

    def __init__(self):
        super().__init__()
        self.state = None

    def __next__(self):
        raise StopIteration

    def get_state(self):
        return self.state

    def set_state(self, state):
        self.state = state

    def start_prefetch(self) -> None:
        pass


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True, extra_items=()):
        """``extra_items``: the names of the task's extra items (see :meth:`save`)."""
        self.directory = os.path.abspath(directory) if '://' not in directory else directory
        self.extra_items = tuple(extra_items)
        _quiet_abandoned_reads(collect=False)  # a save that fails in the background leaves its writes too
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                                 create=True),
            item_handlers={k: _tolerant(h) for k, h in {
                'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                'config': ocp.JsonCheckpointHandler(), 'layout': ocp.JsonCheckpointHandler(),
                CHECKSUMS: ocp.JsonCheckpointHandler(),
                **{k: ocp.StandardCheckpointHandler() for k in extra_items}}.items()},
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_iter: Any, config: Any, *, force: bool = False,
             extra: dict | None = None) -> bool:
        """Saves ``step`` (asynchronously), with the checksum record of what it saves. The
        fingerprints are computed here, from the arrays being saved, before the caller's next
        step can donate them. Every process calls it."""
        if not force and not self.manager.should_save(step):
            return False
        data_state = None if data_iter is None else data_iter.get_state()
        cfg = json.loads(config.to_json())
        layout = {'process_count': jax.process_count(), 'data': data_state}
        record = {'version': RECORD_VERSION, 'state': fingerprints(state),
                  'extra': {k: fingerprints(v) for k, v in (extra or {}).items()},
                  'config': digest(cfg), 'layout': digest(layout),
                  'data': all_digests(None if data_state is None else digest(data_state))}
        args = {'state': ocp.args.StandardSave(state), 'config': ocp.args.JsonSave(cfg),
                'layout': ocp.args.JsonSave(layout), CHECKSUMS: ocp.args.JsonSave(record)}
        args.update({k: ocp.args.StandardSave(v) for k, v in (extra or {}).items()})
        if data_iter is not None:
            args['data'] = grain.checkpoint.CheckpointSave(data_iter)
        return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

    def check_compatible(self, step: int, abstract_state: Any, config: Any, extra: dict | None = None,
                         saved_config: dict | None = None) -> None:
        """Raises CheckpointMismatch naming what differs between the checkpoint and the config."""
        where = f'{self.directory}/{step}'
        saved = saved_config if saved_config is not None else self._item(step, 'config')
        now, then = flat_config(json.loads(config.to_json())), flat_config(saved)
        diffs = [f'  {k}: checkpoint has {then.get(k)!r}, config has {now.get(k)!r}'
                 for k in SHAPE_KEYS if then.get(k) != now.get(k)]
        meta = self.manager.item_metadata(step)['state']
        saved_shapes = {keystr(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(meta)
                        if hasattr(m, 'shape')}
        want_shapes = {keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract_state)}
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
                m = dict((keystr(q), v) for q, v in jax.tree_util.tree_leaves_with_path(have)).get(keystr(p))
                if m is not None and tuple(m.shape) != tuple(np.shape(x)):
                    diffs.append(f'  {name}/{keystr(p)}: checkpoint has {tuple(m.shape)}, config needs '
                                 f'{tuple(np.shape(x))} (this run\'s {name!r} item: another dataset size or patch '
                                 f'grid?)')
        if diffs:
            raise CheckpointMismatch(
                f'The checkpoint {where} does not match this config:\n' + '\n'.join(diffs) +
                '\nUse a new --workdir for a different model, or restore the config the checkpoint was written with '
                f'(saved in {where}/config).')

    # -- restoring, verified
    def restore(self, step: int, abstract_state: Any, data_iter: Any, config: Any,
                extra: dict | None = None) -> Any:
        """Restores the state onto the shardings of ``abstract_state`` (ShapeDtypeStructs with
        shardings: resharding across meshes and process counts is orbax's job) and sets
        ``data_iter`` in place. Returns ``(state, {item: restored tree})`` for the items of
        ``extra`` ({item: abstract tree, or a function of the item's saved metadata that
        returns one}, or None).

        Everything restored is verified against the step's checksum record first (a step
        written before the record existed is restored unverified, with a note); a step that
        does not restore or verify raises :class:`StepDamaged` on every process (they agree)
        and leaves ``data_iter`` untouched. A config that does not fit raises
        :class:`CheckpointMismatch`.

        A checkpoint written by another number of processes restores the state as usual; the
        data iterator restarts at the saved batch count (see :meth:`_restart_data`)."""
        where = f'{self.directory}/{step}'
        phase, got, reason = 'checksums', None, None
        try:
            record = self._record(step)
            phase = 'config'
            saved_cfg = self._item(step, 'config')
            expect(record, 'config', saved_cfg)
            phase = 'layout'
            layout = self._item(step, 'layout')
            expect(record, 'layout', layout)
            phase = 'metadata'
            metas = self.manager.item_metadata(step)
            if record is not None:
                self._check_metadata(metas, record)
            if extra:
                extra = {k: v(metas.get(k)) if callable(v) else v for k, v in extra.items()}
            self.check_compatible(step, abstract_state, config, extra, saved_config=saved_cfg)
            phase = 'state'
            args = {'state': ocp.args.StandardRestore(abstract_state)}
            args.update({k: ocp.args.StandardRestore(v) for k, v in (extra or {}).items()})
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
            for k in args:
                phase = k
                _raise_failed(out, [k])
            written_by = None if layout.get('data') is None else int(layout['process_count'])
            data_state = None
            if data_iter is not None and written_by == jax.process_count():
                phase = 'data'
                catcher = _StateCatcher()
                _raise_failed(self.manager.restore(
                    step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(catcher))), ['data'])
                if not isinstance(catcher.state, dict):
                    raise ValueError(f'not an iterator state: {catcher.state!r:.80}')
                data_state = catcher.state
            got = (record, layout, written_by, out, data_state)
        except CheckpointMismatch:
            raise
        except Exception as e:  # noqa: BLE001 - whatever orbax, tensorstore or JSON raise: the step is damaged
            reason = f'{phase}: {error_summary(e)}'
            _quiet_abandoned_reads()
        reason = agree(reason)
        if reason is None:
            reason = agree(self._verify(*got, extra))  # every process: the fingerprints are collective
        if reason is not None:
            raise StepDamaged(where, reason)
        record, layout, written_by, out, data_state = got
        if record is None:
            logging.warning('%s was written without checksums (by an older version): restored unverified.', where)
        if data_iter is not None:
            if data_state is not None:
                data_iter.set_state(data_state)
                data_iter.start_prefetch()
            elif written_by is None:
                logging.warning('%s holds no data iterator state: the data starts from the first batch.', where)
            else:
                self._restart_data(step, data_iter, written_by, layout['data'])
        return out['state'], {k: out[k] for k in (extra or {})}

    def restore_newest(self, abstract_state: Any, data_iter: Any, config: Any,
                       extra: dict | None = None) -> tuple[int, Any, dict] | None:
        """``(step, state, extra items)`` of the newest step that restores and verifies (see
        :meth:`restore`), or None when the directory holds no step. A step that fails is renamed
        ``STEP.damaged`` (by process 0; never deleted), with a one-line warning, and the one
        before is tried. Raises :class:`CheckpointDamaged` when steps exist (or were set aside,
        now or before) and none verifies: a run never silently starts again from scratch."""
        failed = []
        while (step := self.manager.latest_step()) is not None:
            try:
                state, restored = self.restore(step, abstract_state, data_iter, config, extra)
            except StepDamaged as e:
                failed.append(f'{step} ({e.reason})')
                self._set_aside(step, e.reason)
                continue
            return step, state, restored
        aside = self.damaged_steps()
        if failed or aside:
            what = (f'no step restores and verifies ({"; ".join(failed)}; set aside as {", ".join(aside)})'
                    if failed else f'every step was set aside as damaged by an earlier launch ({", ".join(aside)})')
            raise CheckpointDamaged(
                f'{self.directory}: {what}; copy a good step folder back from a backup (or rename one back if you '
                f'know it is good), or move the *{DAMAGED} folders away to start from scratch (or use a new '
                f'--workdir)')
        return None

    def damaged_steps(self) -> list[str]:
        """The folders set aside as damaged (``STEP.damaged``, ``STEP.damaged.N``), newest step first."""
        d = epath.Path(self.directory)
        names = [p.name for p in d.iterdir()] if d.exists() else []
        found = [n for n in names if re.fullmatch(rf'\d+{re.escape(DAMAGED)}(\.\d+)?', n)]
        return sorted(found, key=lambda n: (-int(n.split('.')[0]), n))

    def _set_aside(self, step: int, reason: str) -> None:
        """Renames ``step`` to ``STEP.damaged`` (process 0), waits for it on every process and
        re-reads the step list (orbax caches it)."""
        d = epath.Path(self.directory)
        n = 0
        while (d / (f'{step}{DAMAGED}' + (f'.{n}' if n else ''))).exists():
            n += 1
        if jax.process_count() > 1:  # process 0's choice, made before it renames
            n = int(multihost_utils.broadcast_one_to_all(np.asarray(n, np.int32)))
        target = d / (f'{step}{DAMAGED}' + (f'.{n}' if n else ''))
        if jax.process_index() == 0:
            (d / str(step)).rename(target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f'colormae_set_aside_{step}')
        self.manager.reload()
        logging.warning('%s/%d is damaged (%s): renamed to %s; trying the step before.', self.directory, step,
                        reason, target.name)

    def _item(self, step: int, name: str) -> Any:
        """A JSON item of ``step``."""
        out = self.manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.JsonRestore()}))
        _raise_failed(out, [name])
        return out[name]

    def _record(self, step: int) -> dict | None:
        """The checksum record of ``step``; None for a step written before records existed."""
        step_dir = epath.Path(self.directory) / str(step)
        if not (step_dir / CHECKSUMS).exists():
            try:  # orbax's list of the step's items
                listed = json.loads((step_dir / '_CHECKPOINT_METADATA').read_text()).get('item_handlers') or {}
            except (OSError, ValueError, AttributeError):
                listed = {}
            if CHECKSUMS in listed:
                raise ValueError('the checksums item is missing')
            return None
        record = self._item(step, CHECKSUMS)
        if not isinstance(record, dict) or record.get('version') != RECORD_VERSION:
            raise ValueError(f'not a checksum record of version {RECORD_VERSION}')
        return record

    def _check_metadata(self, metas, record: dict) -> None:
        """The arrays orbax's metadata describes are those the record holds (a damaged
        metadata file would otherwise pass for a config mismatch)."""
        items = {'state': record['state'], **record.get('extra', {})}
        for name, rec in items.items():
            meta = metas.get(name) if hasattr(metas, 'get') else None
            if meta is None:
                raise ValueError(f'no metadata of the {name!r} item')
            shapes = {keystr(p): list(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(meta)
                      if hasattr(m, 'shape')}
            want = {k: v['shape'] for k, v in rec.items()}
            if shapes != want:
                k = sorted(set(shapes) ^ set(want)) or [k for k in sorted(want) if shapes[k] != want[k]]
                raise ValueError(f'the metadata of {name}/{k[0]} differs from the checksum record')

    def _verify(self, record, layout, written_by, out, data_state, extra) -> str | None:
        """What does not match the record (None when all does, or when there is no record)."""
        if record is None:
            return None
        bad = compare(record['state'], fingerprints(out['state']), 'state')
        for k in extra or {}:
            bad += compare(record.get('extra', {}).get(k, {}), fingerprints(out[k]), k)
        if data_state is not None:
            saved = record.get('data') or []
            if len(saved) != jax.process_count() or saved[jax.process_index()] != digest(data_state):
                bad.append(f'data: the iterator state of process {jax.process_index()} differs from its checksum')
        if not bad:
            return None
        return bad[0] + (f' (and {len(bad) - 1} more)' if len(bad) > 1 else '')

    def _layout(self, step: int) -> dict:
        """The ``layout`` item of ``step``: ``{'process_count', 'data'}`` (process 0's iterator state)."""
        return self._item(step, 'layout')

    def data_process_count(self, step: int) -> int | None:
        """How many processes wrote ``step``, or None for a step without a data iterator state."""
        layout = self._layout(step)
        return None if layout['data'] is None else int(layout['process_count'])

    def _restart_data(self, step: int, data_iter: Any, written_by: int, saved: dict | None = None) -> None:
        """The iterator state of a run with another process count cannot be carried over
        (each process read its own shard). Sets ``data_iter`` to the saved batch count with
        this run's layout: the same position in the epoch, in a new order of the examples."""
        saved = self._layout(step)['data'] if saved is None else saved
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

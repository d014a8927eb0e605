"""FAMT: Frequency- and Attention-driven Masking and Throwing (Gui et al., IEEE TIP 2025).

Three parts:

* :func:`weight_maps` (jitted in :func:`update_pass`): per image, the encoder's last-block
  [CLS]-to-patch attention on the whole (resized, unmasked) image, min-max normalised per
  head and averaged over heads, fused with a frequency map computed with ``jnp.fft``: the
  per-patch energy of a Gaussian low-passed view of the image (see docs/design.md for the
  reading and the alternatives). ``freq_weight`` 0 is attention alone, 1 frequency alone.
* :class:`WeightStore`: the per-example table of those maps over the patch grid, on the
  host of each process (only its own examples), indexed by the dataset index the pipeline
  carries; :class:`FAMTState` (the strategy's host state) refreshes it on schedule, looks it
  up per batch and checkpoints it with the train state. With ``data.pipeline='device'`` the
  table is :class:`DeviceWeightStore` instead: ``[num_examples, N]`` on the mesh, written by
  jitted scatters of the update pass and gathered inside the step by the batch's ``index``
  (it reaches the step as its ``aux``, :meth:`FAMTState.step_aux`); nothing per step on the host.
* :class:`FAMTMasking`: in the jitted step, the map is resampled onto the training crop
  (box and flip from the pipeline), and a weighted order of the patches without
  replacement is drawn by Gumbel top-k. The first ``mask_ratio N`` drawn are masked, the
  next ``throw_ratio N`` thrown (they enter neither encoder, decoder nor loss), the rest are
  visible. Before the first update the table is uniform, i.e. random masking (and throwing).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from colormae_jax import loop, parallel
from colormae_jax.data import device as device_data, pipeline as data, sources as datasets
from colormae_jax.errors import ConfigError
from colormae_jax.masking import core

WEIGHT_KEY = 'famt_weight'  # the batch entry the loop adds: [B, N] weights over the whole image


# ----------------------------------------------------------------------------- weight maps

def minmax(x: jax.Array, axis=-1, eps: float = 1e-12) -> jax.Array:
    lo = x.min(axis=axis, keepdims=True)
    hi = x.max(axis=axis, keepdims=True)
    return (x - lo) / jnp.maximum(hi - lo, eps)


def attention_map(cls_attn: jax.Array) -> jax.Array:
    """[B, heads, N] [CLS]-to-patch attention -> [B, N]: min-max per head, mean over heads."""
    return minmax(cls_attn.astype(jnp.float32), axis=-1).mean(axis=1)


def lowpass(images: jax.Array, sigma: float) -> jax.Array:
    """Gaussian low-pass of ``images`` [B, H, W, C] (std ``sigma`` pixels), applied with the FFT
    (periodic boundaries)."""
    _, h, w, _ = images.shape
    fy = jnp.fft.fftfreq(h)[:, None]
    fx = jnp.fft.rfftfreq(w)[None, :]
    g = jnp.exp(-2.0 * (jnp.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))
    spec = jnp.fft.rfft2(images.astype(jnp.float32), axes=(1, 2))
    return jnp.fft.irfft2(spec * g[None, :, :, None], s=(h, w), axes=(1, 2))


def frequency_map(images: jax.Array, patch: int, sigma: float) -> jax.Array:
    """[B, H, W, C] -> [B, N]: per patch, the energy of the low-passed view around its image
    mean (where the coarse structure departs from the average colour), min-max normalised."""
    low = lowpass(images, sigma)
    low = low - low.mean(axis=(1, 2), keepdims=True)
    b, h, w, c = low.shape
    e = jnp.square(low).reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4, 5))
    return minmax(e.reshape(b, -1))


def fuse(attn: jax.Array, freq: jax.Array, freq_weight: float) -> jax.Array:
    """Convex combination of two [B, N] maps, each in [0, 1]."""
    return (1.0 - freq_weight) * attn + freq_weight * freq


def weight_maps(encoder, images: jax.Array, *, patch: int, freq_weight: float, freq_sigma: float) -> jax.Array:
    """The FAMT weight map [B, N] of whole, normalised images [B, H, W, C]."""
    attn = attention_map(encoder.cls_attention(images)) if freq_weight < 1 else 0.0
    freq = frequency_map(images, patch, freq_sigma * patch) if freq_weight > 0 else 0.0
    return fuse(attn, freq, freq_weight)


# ----------------------------------------------------------------------------- alignment

def align(wmap: jax.Array, crop: jax.Array, flip: jax.Array, out_grid: int) -> jax.Array:
    """Resamples whole-image maps onto training crops.

    wmap [B, g, g] over the whole image; crop [B, 4] = (top, left, height, width) relative to
    the image; flip [B] (the crop was flipped left-right after resizing). Returns
    [B, out_grid, out_grid]: for each training patch, the map bilinearly interpolated at the
    patch centre's position in the whole image.
    """
    g = wmap.shape[-1]
    u = (jnp.arange(out_grid, dtype=jnp.float32) + 0.5) / out_grid  # patch centres in the crop, [0, 1]

    def one(m, box, fl):
        top, left, h, w = box[0], box[1], box[2], box[3]
        ux = jnp.where(fl, 1.0 - u, u)
        ys = (top + u * h) * g - 0.5  # map cell c has its centre at (c + 0.5) / g
        xs = (left + ux * w) * g - 0.5
        yy, xx = jnp.meshgrid(ys, xs, indexing='ij')
        return jax.scipy.ndimage.map_coordinates(m, [yy, xx], order=1, mode='nearest')

    return jax.vmap(one)(wmap, crop, flip)


def gumbel_keys(rng: jax.Array, weights: jax.Array, floor: float) -> jax.Array:
    """log w + Gumbel noise: sorting these in descending order draws a weighted order
    without replacement (the Gumbel top-k trick). Weights below ``floor`` count as ``floor``."""
    logw = jnp.log(jnp.maximum(weights, floor))
    return logw + jax.random.gumbel(rng, weights.shape, jnp.float32)


# ----------------------------------------------------------------------------- the strategy

@dataclasses.dataclass(frozen=True)
class FAMTMasking(core.Strategy):
    """Weighted masking and throwing by ``batch[WEIGHT_KEY]``, or by the rows ``batch['index']``
    of ``aux['table']`` (the device store); with neither, uniform weights."""
    warmup_epochs: float = 40.0
    update_every_epochs: float = 40.0
    freq_weight: float = 0.5
    freq_sigma: float = 0.5
    min_weight: float = 1e-3
    update_batch_size: int = 0
    warmup_steps: int | None = None        # override the epoch values when set
    update_every_steps: int | None = None

    def _first_and_every(self, steps_per_epoch: int) -> tuple[int, int]:
        first = self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_epochs * steps_per_epoch))
        every = (self.update_every_steps if self.update_every_steps is not None
                 else int(round(self.update_every_epochs * steps_per_epoch)))
        return first, every

    @property
    def counts(self) -> core.Counts:
        return core.amt_counts(self.grid * self.grid, self.mask_ratio, self.throw_ratio)  # AMT's, throw or not

    def check(self, num_devices: int) -> None:
        bs = self.update_batch_size  # 0: the training batch size
        if bs and not (isinstance(bs, int) and bs > 0):
            raise ConfigError('mask.famt.update_batch_size', f'must be a positive int, got {bs!r}')
        if bs and bs % num_devices:
            raise ConfigError('mask.famt.update_batch_size', f'{bs} is not divisible by the {num_devices} devices; '
                                                             f'use a multiple of {num_devices}')
        if not 0 <= self.freq_weight <= 1:
            raise ConfigError('mask.famt.freq_weight', f'must be in [0, 1] (0: attention only, 1: frequency '
                                                                f'only), got {self.freq_weight}')
        if not self.freq_sigma > 0:
            raise ConfigError('mask.famt.freq_sigma', f'must be positive, got {self.freq_sigma}')
        if not 0 < self.min_weight < 1:
            raise ConfigError('mask.famt.min_weight', f'must be in (0, 1), got {self.min_weight}')
        if self.warmup_epochs < 0:
            raise ConfigError('mask.famt.warmup_epochs', f'must be >= 0, got {self.warmup_epochs}')
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ConfigError('mask.famt.warmup_steps', f'must be >= 0 (or unset), got {self.warmup_steps}')
        if self.update_every_steps is not None and self.update_every_steps < 1:
            raise ConfigError('mask.famt.update_every_steps',
                                       f'must be >= 1 (or unset), got {self.update_every_steps}')
        if not self.update_every_epochs > 0:
            raise ConfigError('mask.famt.update_every_epochs',
                                       f'must be positive, got {self.update_every_epochs}')
        if self.mask_ratio + self.throw_ratio >= 1:
            raise ConfigError('mask.throw_ratio', f'mask.ratio + mask.throw_ratio must be < 1, got '
                                                           f'{self.mask_ratio} + {self.throw_ratio}')

    def update_steps(self, steps_per_epoch: int, total_steps: int) -> list[int]:
        """0-based steps before which the weights are recomputed."""
        first, every = self._first_and_every(steps_per_epoch)
        return list(range(first, total_steps, max(every, 1)))

    def check_schedule(self, steps_per_epoch: int, total_steps: int) -> None:
        first, every = self._first_and_every(steps_per_epoch)
        if every < 1:
            raise ConfigError('mask.famt.update_every_epochs',
                                       f'the update interval is {every} steps; it must be at least 1')
        if first >= total_steps:
            raise ConfigError(
                'mask.famt.warmup_epochs', f'the first weight update would come at step {first}, after training ends '
                f'(step {total_steps}); lower mask.famt.warmup_epochs (or mask.famt.warmup_steps)')

    def scores(self, rng, batch, aux):
        b = batch['image'].shape[0]
        g = self.grid
        if WEIGHT_KEY in batch:
            w = batch[WEIGHT_KEY].astype(jnp.float32)
        elif isinstance(aux, dict) and 'table' in aux:  # DeviceWeightStore: gathered on the device
            w = aux['table'][batch['index']]
        else:
            w = None
        if w is not None:
            gw = int(round(math.sqrt(w.shape[-1])))
            w = w.reshape(b, gw, gw)
            if 'crop' in batch:
                w = align(w, batch['crop'], batch['flip'], g)
            elif gw != g:
                raise ValueError(f'weights over a {gw}x{gw} grid need crop boxes to align with the {g}x{g} grid')
            w = w.reshape(b, g * g)
        else:
            w = jnp.ones((b, g * g), jnp.float32)
        w = w / jnp.maximum(w.max(axis=-1, keepdims=True), 1e-12)
        # First drawn = highest key = masked. The partition keeps the highest *scores* visible
        # and masks the lowest, so the score is the negated key.
        return -gumbel_keys(rng, w, self.min_weight)


    def host_state(self, run: core.RunContext) -> FAMTState:
        return FAMTState(self, run)


def _factory(name: str, grid: int, cfg: Any, **ratios) -> FAMTMasking:
    return core.from_config(FAMTMasking, name, grid, cfg, 'famt', **ratios)


STRATEGIES = {'famt': _factory}


# ----------------------------------------------------------------------------- the store

class WeightStore:
    """Per-example weight maps of this process's examples, on the host.

    Process ``p`` of ``P`` reads examples ``p, p + P, ...``; example ``i`` lives in row
    ``i // P``. Rows are padded to a multiple of ``pad_to`` (the local device count) so
    that the table is a global array sharded over all devices for checkpointing.
    """

    def __init__(self, num_examples: int, grid: int, process_index: int = 0, process_count: int = 1,
                 pad_to: int = 1):
        self.num_examples, self.grid = num_examples, grid
        self.process_index, self.process_count = process_index, process_count
        rows = math.ceil(num_examples / process_count)
        self.rows = math.ceil(rows / pad_to) * pad_to
        self.table = np.ones((self.rows, grid * grid), np.float32)
        self.updated_at = np.full((), -1, np.int64)  # the step of the last update (-1: uniform)

    def rows_of(self, index: np.ndarray) -> np.ndarray:
        index = np.asarray(index)
        if (index % self.process_count != self.process_index).any():
            raise ValueError('an example of another process reached this process\'s weight store')
        return index // self.process_count

    def lookup(self, index: np.ndarray) -> np.ndarray:
        return self.table[self.rows_of(index)]

    def write(self, index: np.ndarray, weights: np.ndarray, valid: np.ndarray | None = None) -> None:
        index, weights = np.asarray(index), np.asarray(weights, np.float32)
        if valid is not None:
            index, weights = index[np.asarray(valid)], weights[np.asarray(valid)]
        self.table[self.rows_of(index)] = weights

    def begin_pass(self) -> None:
        """Called before an update pass (the device store's first write keeps the old table)."""

    def write_batch(self, index: np.ndarray, weights: jax.Array, valid: np.ndarray, mesh) -> None:
        """One batch of the update pass: ``weights`` a global [B, N] array, this process's rows kept."""
        self.write(index, parallel.local_rows(weights, mesh), valid)

    # -- checkpointing: a global array [process_count * rows, N], process p's rows at
    # [p * rows, (p + 1) * rows) on its own devices (a 1-D mesh of the devices in process
    # order, whatever the training mesh's device order), so that every process saves and
    # restores its part; ``process_examples`` (examples per process, one entry per process)
    # records the layout, so that a checkpoint written by another process count is remapped.
    def to_global(self, mesh) -> dict:
        table = multihost_utils.host_local_array_to_global_array(self.table, _store_mesh(mesh),
                                                                 parallel.batch_spec(_store_mesh(mesh)))
        return {'table': table, 'process_examples': self._process_examples(self.process_count),
                'updated_at': self.updated_at}

    def _process_examples(self, process_count: int) -> np.ndarray:
        return np.asarray([len(range(p, self.num_examples, process_count)) for p in range(process_count)],
                          np.int64)

    def abstract(self, mesh):
        """The restore target, as a function of the saved item's metadata (see
        ``checkpoint.Checkpointer.restore``): this layout's sharded table when the checkpoint
        was written with it; the whole table on every host (to remap in :meth:`load`) when it
        was written by another process count or padding; this layout's shapes otherwise, so
        that the mismatch is reported (another dataset size or patch grid)."""
        n_cells = self.grid * self.grid
        own = {'table': jax.ShapeDtypeStruct((self.rows * self.process_count, n_cells), jnp.float32,
                                             sharding=parallel.batch_sharding(_store_mesh(mesh))),
               'process_examples': np.zeros((self.process_count,), np.int64),
               'updated_at': np.zeros((), np.int64)}

        def target(saved) -> dict:
            saved = getattr(saved, 'tree', saved)
            if saved is None or 'process_examples' not in saved:  # written before the layout was recorded
                return {k: v for k, v in own.items() if k != 'process_examples'}
            shape, p_old = tuple(saved['table'].shape), int(saved['process_examples'].shape[0])
            if (p_old, shape) == (self.process_count, own['table'].shape):
                return own
            if shape[1] != n_cells or shape[0] % p_old or shape[0] // p_old < math.ceil(self.num_examples / p_old):
                return own  # not this dataset or grid: check_compatible names the difference
            return {'table': np.empty(shape, np.float32), 'process_examples': np.zeros((p_old,), np.int64),
                    'updated_at': np.zeros((), np.int64)}
        return target

    def load(self, restored: dict, mesh) -> None:
        self.updated_at = np.asarray(restored['updated_at'], np.int64)
        table, counts = restored['table'], restored.get('process_examples')
        if counts is not None and int(np.sum(counts)) != self.num_examples:
            raise ValueError(f'the checkpoint\'s FAMT weight store holds {int(np.sum(counts))} examples, the dataset '
                             f'{self.num_examples}: use a new --workdir for another dataset')
        if isinstance(table, jax.Array):  # written with this layout: each process restored its rows
            self.table = np.array(parallel.local_rows(table, _store_mesh(mesh)))
            return
        # Written by len(counts) processes: every host read the whole table; take this process's examples.
        p_old = len(counts)
        rows_old = table.shape[0] // p_old
        examples = np.arange(self.rows) * self.process_count + self.process_index
        ok = examples < self.num_examples
        self.table = np.ones((self.rows, self.grid * self.grid), np.float32)
        self.table[ok] = np.asarray(table)[(examples[ok] % p_old) * rows_old + examples[ok] // p_old]
        logging.warning('FAMT weight store written by %d processes (%d rows each) remapped to %d processes (%d rows '
                        'each; this is process %d).', p_old, rows_old, self.process_count, self.rows,
                        self.process_index)


def _store_mesh(mesh) -> jax.sharding.Mesh:
    """The devices of ``mesh`` in process order, as one 'data' axis: the store's global layout
    is [process 0's rows, process 1's rows, ...] whatever the training mesh's device order."""
    devices = sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id))
    return jax.sharding.Mesh(np.asarray(devices), ('data',))


def _scatter(table: jax.Array, index: jax.Array, weights: jax.Array, valid: jax.Array) -> jax.Array:
    rows = jnp.where(valid, index, table.shape[0])  # padding rows: out of bounds, dropped
    return table.at[rows].set(weights.astype(table.dtype), mode='drop')


class DeviceWeightStore:
    """Per-example weight maps ``[num_examples, N]`` float32 on the mesh, replicated like the
    resident split (``data.pipeline='device'``, one process): row ``i`` is example ``i``.

    The update pass writes each batch with a jitted scatter on the device (the first write of
    a pass makes a new table, the next ones update it in place, donated), and the step gathers
    its batch's rows from :attr:`table`, its ``aux``. Checkpointed as the host store's item
    (``table``, ``process_examples`` = [num_examples], ``updated_at``), the table as a
    replicated array.
    """

    def __init__(self, num_examples: int, grid: int, mesh):
        self.num_examples, self.grid = num_examples, grid
        self.sharding = parallel.replicated(mesh)
        self.table = jax.device_put(np.ones((num_examples, grid * grid), np.float32), self.sharding)
        self.updated_at = np.full((), -1, np.int64)
        self._write = jax.jit(_scatter, out_shardings=self.sharding)
        self._write_donated = jax.jit(_scatter, out_shardings=self.sharding, donate_argnums=0)
        self._fresh = True

    def begin_pass(self) -> None:
        self._fresh = True  # the table of the last pass may be held by a step or a checkpoint: not donated

    def write_batch(self, index: np.ndarray, weights: jax.Array, valid: np.ndarray, mesh=None) -> None:
        write = self._write if self._fresh else self._write_donated
        self.table = write(self.table, np.asarray(index, np.int32), weights, np.asarray(valid, bool))
        self._fresh = False

    def to_global(self, mesh=None) -> dict:
        return {'table': self.table, 'process_examples': np.asarray([self.num_examples], np.int64),
                'updated_at': self.updated_at}

    def abstract(self, mesh=None) -> dict:
        """The restore target (a checkpoint of another shape is named by ``check_compatible``)."""
        return {'table': jax.ShapeDtypeStruct((self.num_examples, self.grid * self.grid), jnp.float32,
                                              sharding=self.sharding),
                'process_examples': np.zeros((1,), np.int64), 'updated_at': np.zeros((), np.int64)}

    def load(self, restored: dict, mesh=None) -> None:
        counts = restored.get('process_examples')
        if counts is not None and int(np.sum(counts)) != self.num_examples:
            raise ValueError(f'the checkpoint\'s FAMT weight store holds {int(np.sum(counts))} examples, the dataset '
                             f'{self.num_examples}: use a new --workdir for another dataset')
        self.updated_at = np.asarray(restored['updated_at'], np.int64)
        self.table = jax.device_put(restored['table'], self.sharding)
        self._fresh = True


def update_pass(store: WeightStore | DeviceWeightStore, weights_fn, batches, mesh, *, show_progress: bool,
                total: int | None = None, should_stop: Callable[[], bool] | None = None) -> float | None:
    """Recomputes every row of ``store``. ``batches``: this process's examples, whole images,
    padded (``data.make_eval_iterator(view='resize')``, or ``device_data.eval_batches`` for the
    device store, whose rows never leave the device); ``weights_fn``: jitted, global images
    -> global [B, N] maps. Returns the seconds taken, or None when ``should_stop()`` turned
    True between two batches: the pass then stops there (``batches`` closed), the rows written
    so far stay, and the caller leaves ``store.updated_at`` as it was, so that the update is
    redone in full (see :meth:`FAMTState.refresh`)."""
    t0 = time.perf_counter()
    sharding = parallel.batch_sharding(mesh)
    store.begin_pass()
    try:
        progress = (loop.PassProgress('FAMT weight update', total or 0, unit='batches', interruptible=False)
                    if show_progress else None)  # in the log; SIGTERM: should_stop
        for batch in batches:
            images = batch['image']
            if not isinstance(images, jax.Array):  # the grain pass's numpy; the device pass's is global already
                images = jax.make_array_from_process_local_data(sharding, images)
            store.write_batch(batch['index'], weights_fn(images), batch['valid'], mesh)
            if progress is not None:
                progress.update(1)
            if should_stop is not None and should_stop():
                return None
    finally:
        close = getattr(batches, 'close', None)
        if close is not None:
            close()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the host state

class FAMTState(core.HostState):
    """The weight store of a run, refreshed by a jitted pass over the training split on
    schedule (only the updates whose weights some FAMT step uses) and checkpointed as ``famt``:
    a host :class:`WeightStore` looked up per batch (grain), or a :class:`DeviceWeightStore`
    passed to the step as its ``aux`` (``data.pipeline='device'``)."""

    def __init__(self, f: FAMTMasking, run: core.RunContext):
        self.f, self.run = f, run
        f.check_schedule(run.steps_per_epoch, run.total_steps)
        self.update_steps = self._useful(f.update_steps(run.steps_per_epoch, run.total_steps))
        first, _ = f._first_and_every(run.steps_per_epoch)
        if run.active[0][0] < first:
            logging.warning('FAMT masks from step %d with uniform weights (random masking and throwing) until its '
                            'first weight update before step %d; AMT runs random masking at 0.75 until then '
                            "(mask.schedule='random:0.75,famt@...').", run.active[0][0] + 1, first + 1)
        n = datasets.num_examples(run.config.data)
        self.on_device = run.config.data.get('pipeline', 'grain') == 'device'  # one process (config_lib)
        self.store = (DeviceWeightStore(n, run.model.grid, run.mesh) if self.on_device else
                      WeightStore(n, run.model.grid, jax.process_index(), jax.process_count(),
                                  pad_to=len(run.mesh.local_devices)))
        self._weights_fn = None

    def _useful(self, updates: list[int]) -> set[int]:
        """An update before step u serves the steps up to the next update; it is skipped where
        no FAMT phase overlaps them (e.g. every update after ``'famt,green@100'`` switches)."""
        nexts = updates[1:] + [self.run.total_steps]
        return {u for u, n in zip(updates, nexts) if any(a < n and u < b for a, b in self.run.active)}

    def batch_fields(self, batch: dict) -> dict:
        if self.on_device:  # the step gathers its rows from step_aux's table
            return {}
        return {WEIGHT_KEY: self.store.lookup(batch['index'])}

    def step_aux(self) -> dict | None:
        return {'table': self.store.table} if self.on_device else None

    def items(self) -> dict:
        return {'famt': self.store.to_global(self.run.mesh)}

    def abstract_items(self) -> dict:
        return {'famt': self.store.abstract(self.run.mesh)}

    def load_items(self, restored: dict) -> None:
        self.store.load(restored['famt'], self.run.mesh)

    def refresh(self, step: int, params: Any, writer: Any) -> None:
        """Before 0-based ``step``: recompute the weights if the schedule says so."""
        if step not in self.update_steps or int(self.store.updated_at) == step:
            return
        run, f = self.run, self.f
        if self._weights_fn is None:
            def weights(p, images):
                encoder = nnx.merge(run.graphdef, p).encoder
                x = data.model_input(images, run.config.data)
                return weight_maps(encoder, x.astype(run.model.dtype), patch=run.model.patch,
                                   freq_weight=f.freq_weight, freq_sigma=f.freq_sigma)
            self._weights_fn = jax.jit(weights, out_shardings=parallel.batch_sharding(run.mesh))
        bs = f.update_batch_size or run.config.batch_size
        n_local = math.ceil(self.store.num_examples / jax.process_count())
        if self.on_device:  # the resident split, in order, on the device
            batches = device_data.eval_batches(run.config.data, split=run.config.data.split, global_batch_size=bs,
                                               mesh=run.mesh, view='resize')
        else:
            batches = data.make_eval_iterator(run.config.data, split=run.config.data.split, global_batch_size=bs,
                                              process_index=jax.process_index(), process_count=jax.process_count(),
                                              view='resize')
        secs = update_pass(self.store, functools.partial(self._weights_fn, params), batches, run.mesh,
                           show_progress=jax.process_index() == 0,
                           total=math.ceil(n_local / (bs // jax.process_count())), should_stop=loop.stop_requested)
        if secs is None:  # SIGTERM: the loop saves the state before this step and exits; the resumed run redoes it
            logging.warning('FAMT weight update before step %d interrupted by SIGTERM; it is redone in full when the '
                            'run resumes.', step + 1)
            return
        self.store.updated_at = np.asarray(step, np.int64)
        logging.info('FAMT weights of %d examples updated before step %d (epoch %.1f) in %.1f s.',
                     self.store.num_examples, step + 1, step / run.steps_per_epoch, secs)
        writer.write_scalars(step, {'famt/update_seconds': secs})

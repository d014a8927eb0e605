"""The input pipeline: grain batches (train and eval) from a dataset's source, and global arrays.

The sources come from :mod:`colormae_jax.data.sources` (prepared once per run); this module turns
them into batches. Training pipeline, per process (``make_train_iterator``)::

    source -> attach the index in the full split -> this process's shard (equal sizes)
    -> shuffle (a new order every epoch) -> repeat -> RandomResizedCrop + flip -> batch

Every example carries ``index`` (its position in the full split, for per-example tables
such as FAMT's) and the crop box and flip that were applied, so per-patch maps can follow
the image: output pixel (row r, column c) of an S x S image comes from the source point
(relative coordinates) ``y = y0 + h * (r + .5) / S`` and ``x = x0 + w * u`` with
``u = (c + .5) / S``, or ``u = 1 - (c + .5) / S`` when ``flip``.

(``data.pipeline='device'`` replaces this with :mod:`colormae_jax.data.device`: the split
resident on the accelerator, cropped there; :func:`to_global` passes its arrays through.)

Everything is a function of ``seed`` (and the process index): the same seed gives the
same batches, with or without worker processes, and ``iterator.get_state()`` /
``set_state()`` (or orbax with ``grain.checkpoint.CheckpointSave``) resume exactly.
"""
from __future__ import annotations

import io
import math
from typing import Any, Callable, Iterator

import grain
import jax
import numpy as np
from PIL import Image

from colormae_jax.data import sources as datasets
from colormae_jax.errors import DataError

MAE_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
MAE_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
EVAL_CROP_FRACTION = 0.875


# ------------------------------------------------------------------------------ transforms

def normalize(images, mean, std):
    """uint8 (or float in 0..255) -> float32 ``(x - mean) / std`` (mean/std in 0..255 scale).

    numpy in, numpy out; jax arrays (also under jit) in, jax out.
    """
    xp = np if isinstance(images, (np.ndarray, np.generic)) else jax.numpy
    return (xp.asarray(images).astype(xp.float32) - xp.asarray(mean, xp.float32)) / xp.asarray(std, xp.float32)


def model_input(images, data_cfg):
    """What the model takes: float32 normalised images. A batch arrives as uint8 (normalised
    here, on the device: ``data.normalize_on='device'``) or already normalised as float
    (``'host'``); every task goes through this, so no image is normalised twice."""
    if images.dtype == np.uint8:
        return normalize(images, data_cfg.mean, data_cfg.std)
    return images.astype(np.float32)


def decode_image(encoded) -> Image.Image:
    """Encoded image bytes (or an already decoded uint8 array) -> RGB PIL image."""
    if isinstance(encoded, np.ndarray) and encoded.dtype == np.uint8 and encoded.ndim == 3:
        im = Image.fromarray(encoded[..., 0] if encoded.shape[-1] == 1 else encoded)
    else:
        im = Image.open(io.BytesIO(bytes(encoded)))
    return im if im.mode == 'RGB' else im.convert('RGB')


def random_resized_crop_box(h: int, w: int, rng: np.random.Generator, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's ``RandomResizedCrop.get_params``: (top, left, height, width) in pixels.

    Ten tries at a random area fraction in ``scale`` and log-uniform aspect ratio in ``ratio``;
    then the largest centred crop whose aspect ratio is within ``ratio``.
    """
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


class AttachIndex(grain.transforms.MapWithIndex):
    """Adds ``index``: the example's position in the full split (applied before sharding/shuffling).

    Past the first epoch grain hands over ``epoch * size + index``, hence the modulo.
    """

    def __init__(self, size: int):
        self.size = size

    def map_with_index(self, index: int, element: dict) -> dict:
        return {'image': element['image'], 'label': element['label'], 'index': np.int32(index % self.size)}


class RandomResizedCropFlip(grain.transforms.RandomMap):
    """Decode, RandomResizedCrop (bicubic) to ``size``, horizontal flip (p=0.5); records box and flip."""

    def __init__(self, size: int, scale=(0.2, 1.0), hflip: bool = True, mean=None, std=None,
                 ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio, self.hflip = int(size), tuple(scale), tuple(ratio), bool(hflip)
        self.mean, self.std = mean, std

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        im = decode_image(element['image'])
        w, h = im.size
        top, left, ch, cw = random_resized_crop_box(h, w, rng, self.scale, self.ratio)
        im = im.crop((left, top, left + cw, top + ch)).resize((self.size, self.size), Image.BICUBIC)
        flip = self.hflip and rng.random() < 0.5
        if flip:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        out = np.asarray(im, np.uint8)
        if self.mean is not None:
            out = normalize(out, self.mean, self.std)
        return {'image': out, 'label': np.int32(element['label']), 'index': np.int32(element['index']),
                'crop': np.asarray([top / h, left / w, ch / h, cw / w], np.float32), 'flip': np.bool_(flip)}


class CenterCrop(grain.transforms.Map):
    """Eval transform: resize the shorter side to ``floor(size / 0.875)`` (bicubic) and crop the
    centre ``size`` x ``size`` (torchvision ``Resize`` + ``CenterCrop``); skipped for images
    that already are ``size`` x ``size``."""

    def __init__(self, size: int, mean=None, std=None):
        self.size, self.mean, self.std = int(size), mean, std

    def map(self, element: dict) -> dict:
        im = decode_image(element['image'])
        w, h = im.size
        s = self.size
        if (h, w) != (s, s):
            short = int(s / EVAL_CROP_FRACTION)
            nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
            im = im.resize((nw, nh), Image.BICUBIC)
            top, left = int(round((nh - s) / 2)), int(round((nw - s) / 2))
            im = im.crop((left, top, left + s, top + s))
        out = np.asarray(im, np.uint8)
        if self.mean is not None:
            out = normalize(out, self.mean, self.std)
        return {'image': out, 'label': np.int32(element['label']), 'index': np.int32(element['index']),
                'valid': np.bool_(True)}


class ResizeWhole(grain.transforms.Map):
    """The whole image resized to ``size`` x ``size`` (bicubic, aspect not kept): the view
    whose patch grid the training crop boxes are relative to (FAMT's weight pass)."""

    def __init__(self, size: int, mean=None, std=None):
        self.size, self.mean, self.std = int(size), mean, std

    def map(self, element: dict) -> dict:
        im = decode_image(element['image'])
        if im.size != (self.size, self.size):
            im = im.resize((self.size, self.size), Image.BICUBIC)
        out = np.asarray(im, np.uint8)
        if self.mean is not None:
            out = normalize(out, self.mean, self.std)
        return {'image': out, 'label': np.int32(element['label']), 'index': np.int32(element['index']),
                'valid': np.bool_(True)}


# ------------------------------------------------------------------------------ iterators

def _per_process_batch(global_batch_size: int, process_count: int) -> int:
    if not isinstance(global_batch_size, (int, np.integer)) or global_batch_size <= 0:
        raise DataError(f'batch_size={global_batch_size!r} must be a positive int')
    if global_batch_size % process_count:
        example = process_count * max(1, global_batch_size // process_count)
        raise DataError(f'batch_size={global_batch_size} is not divisible by the {process_count} processes; '
                        f'use a multiple of {process_count} (e.g. {example})')
    return global_batch_size // process_count


def _host_norm(data_cfg):
    mode = data_cfg.normalize_on
    if mode not in ('device', 'host'):
        raise DataError(f"data.normalize_on={mode!r} is not valid; use 'device' or 'host'")
    if mode == 'host':
        return tuple(data_cfg.mean), tuple(data_cfg.std)
    return None, None


def _derived_seed(*parts: int) -> int:
    """A uint32 seed from ints (grain wants seeds in [0, 2**32)); unrelated for nearby inputs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _read_options(data_cfg) -> grain.ReadOptions:
    # Elements of the MapDataset are whole batches: grain's default buffer (500) would decode
    # hundreds of batches ahead. ``n`` batches are prepared in ``n`` threads.
    n = max(1, int(data_cfg.prefetch_buffer))
    return grain.ReadOptions(num_threads=n, prefetch_buffer_size=n)


def check_fingerprint(state: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Refuses a saved iterator state whose pipeline settings differ from ``fingerprint``'s."""
    diff = {k: (state.get(k), v) for k, v in fingerprint.items() if state.get(k, v) != v}
    if diff:
        raise DataError('the saved data iterator state does not match this pipeline ('
                        + ', '.join(f'{k}: saved {a!r}, now {b!r}' for k, (a, b) in diff.items())
                        + '); resume with the settings the checkpoint was written with')


class TrainIterator(grain.DatasetIterator):
    """Iterator over a ``MapDataset`` of batches whose state is just the batch count.

    Batch ``k`` is a pure function of (seed, split, batch size, process layout, k), so the
    state ``{'step': k, ...}`` does not depend on ``num_workers`` or prefetching: a state
    saved with 0 workers restores with 8 and vice versa (grain's own ``mp_prefetch`` state
    does not). ``set_state`` restarts reading at batch ``k`` without replaying anything.
    Works with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (orbax).
    """

    def __init__(self, batches: grain.MapDataset, read_options: grain.ReadOptions,
                 mp_options: grain.MultiprocessingOptions | None, fingerprint: dict[str, Any]):
        self._it = None
        super().__init__()
        self._batches, self._read_options, self._mp_options = batches, read_options, mp_options
        self._fingerprint = dict(fingerprint)
        self._step = 0

    def _start(self) -> None:
        ds = self._batches[self._step:].to_iter_dataset(self._read_options)
        if self._mp_options is not None:
            ds = ds.mp_prefetch(self._mp_options)
        self._it = iter(ds)

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._it is None:
            self._start()
        batch = next(self._it)  # StopIteration at the end of ``num_epochs``
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {'step': self._step, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if 'step' not in state:
            raise DataError(f'iterator state {state} was not saved by colormae_jax.data.pipeline.make_train_iterator; '
                            f'start without restoring the data state, or restore a checkpoint written by this code')
        check_fingerprint(state, self._fingerprint)
        if self._it is not None:
            self._it.close()
            self._it = None
        self._step = int(state['step'])

    def start_prefetch(self) -> None:
        self._assert_not_closed()
        if self._it is None:
            self._start()
        self._it.start_prefetch()

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
            self._it = None
        super().close()

    def __str__(self) -> str:
        return f'TrainIterator(step={self._step}, {self._fingerprint})'


def steps_per_epoch(data_cfg, global_batch_size: int, split: str | None = None) -> int:
    """``num_examples // global_batch_size``: the train iterator's full batches per pass over
    ``split`` (default ``data_cfg.split``; batches run across epoch boundaries)."""
    return datasets.num_examples(data_cfg, split) // global_batch_size


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1, num_epochs: int | None = None,
                        transform: grain.transforms.RandomMap | None = None) -> TrainIterator:
    """A checkpointable iterator of this process's batches (infinite unless ``num_epochs``).

    Batches (numpy): ``image`` uint8 [b, S, S, 3] (float32 normalised if ``normalize_on='host'``),
    ``label`` int32 [b], ``index`` int32 [b] (position in the full split), ``crop`` float32 [b, 4]
    (y0, x0, h, w relative to the source image), ``flip`` bool [b]; b = global_batch_size //
    process_count. Each process reads every ``process_count``-th example (shards of equal size:
    the last ``len % process_count`` examples of the split are never read); batches run across
    epoch boundaries. ``num_workers > 0`` decodes in that many spawned processes (same batches).
    """
    if not 0 <= process_index < process_count:
        raise DataError(f'process_index={process_index} must be in [0, process_count={process_count})')
    batch = _per_process_batch(global_batch_size, process_count)
    source = datasets.data_source(data_cfg, data_cfg.split)
    n = len(source)
    per_process = n // process_count
    if per_process < batch:
        raise DataError(f'split {data_cfg.split!r} has {n} examples: {per_process} per process, fewer than one batch '
                        f'of {batch}; lower batch_size to at most {per_process * process_count}')
    mean, std = _host_norm(data_cfg)
    ds = grain.MapDataset.source(source).map_with_index(AttachIndex(n))
    ds = ds[process_index:per_process * process_count:process_count]
    ds = ds.shuffle(seed=_derived_seed(seed, 0)).repeat(num_epochs)
    if transform is None:  # ``transform``: another augmentation, e.g. fine-tuning's RandAugment
        transform = RandomResizedCropFlip(data_cfg.image_size, data_cfg.crop_scale, data_cfg.hflip, mean, std)
    ds = ds.random_map(transform, seed=_derived_seed(seed, 1, process_index))
    ds = ds.batch(batch, drop_remainder=True)
    workers = int(data_cfg.num_workers)
    mp_options = None
    if workers > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():  # grain reads absl flags; outside an absl app use the defaults
            flags.FLAGS.mark_as_parsed()
        mp_options = grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, int(data_cfg.prefetch_buffer)))
    fingerprint = dict(seed=int(seed), examples=n, batch=batch, process_index=process_index,
                       process_count=process_count)
    return TrainIterator(ds, _read_options(data_cfg), mp_options, fingerprint)


def make_eval_iterator(data_cfg, *, split: str, global_batch_size: int, process_index: int = 0,
                       process_count: int = 1, view: str = 'center_crop', limit: int = 0) -> Iterator[dict]:
    """One pass over ``split`` in order, no randomness: centre crops (``view='center_crop'``)
    or whole images resized (``view='resize'``).

    Process p reads examples p, p + process_count, ...; every process yields the same number
    of full batches (``image``, ``label``, ``index``, ``valid``); padding rows are zeros with
    ``valid`` False. A plain generator (not checkpointable).
    """
    if not 0 <= process_index < process_count:
        raise DataError(f'process_index={process_index} must be in [0, process_count={process_count})')
    source = datasets.data_source(data_cfg, split)
    used = min(len(source), limit) if limit else len(source)  # ``limit``: the first examples only
    mean, std = _host_norm(data_cfg)
    s = int(data_cfg.image_size)
    views = {'center_crop': CenterCrop, 'resize': ResizeWhole}
    if view not in views:
        raise DataError(f'view={view!r}; valid: {sorted(views)}')
    ds = grain.MapDataset.source(source).map_with_index(AttachIndex(len(source)))[:used]
    image_dtype = np.float32 if mean is not None else np.uint8
    return padded_pass(ds, views[view](s, mean, std), global_batch_size=global_batch_size,
                       process_index=process_index, process_count=process_count,
                       template={'image': ((s, s, 3), image_dtype), 'label': ((), np.int32),
                                 'index': ((), np.int32), 'valid': ((), np.bool_)},
                       read_options=_read_options(data_cfg))


def padded_pass(ds: grain.MapDataset, transform=None, *, global_batch_size: int, process_index: int,
                process_count: int, template: dict, read_options: grain.ReadOptions | None = None
                ) -> Iterator[dict]:
    """One pass, in order, over the examples (dicts) of ``ds``, ``transform`` (a grain map
    transform) applied: process p reads examples p, p + process_count, ... and every process
    yields the same number of full batches, so that none waits in a collective for a batch
    another never runs. Padding rows are zeros, shaped and typed as ``template``
    (``{key: (shape of one row, dtype)}``); ``valid`` (in the template) is False for them."""
    batch = _per_process_batch(global_batch_size, process_count)
    num_batches = math.ceil(math.ceil(len(ds) / process_count) / batch)
    ds = ds[process_index::process_count]
    if transform is not None:
        ds = ds.map(transform)
    it = iter(ds.batch(batch, drop_remainder=False).to_iter_dataset(read_options))

    def pad(b: dict | None) -> dict:
        m = 0 if b is None else len(b['valid'])
        zeros = {k: np.zeros((batch - m, *shape), dtype) for k, (shape, dtype) in template.items()}
        return zeros if b is None else {k: np.concatenate([b[k], zeros[k]]) for k in zeros}

    try:
        for _ in range(num_batches):
            b = next(it, None)
            yield b if b is not None and len(b['valid']) == batch else pad(b)
    finally:
        it.close()


def to_global(batch: dict, sharding_for: Callable[[str, np.ndarray], jax.sharding.Sharding]) -> dict:
    """Process-local numpy batch -> global ``jax.Array`` s, entry by entry, with
    ``jax.make_array_from_process_local_data(sharding_for(name, array), array)``. Entries that
    already are global arrays (the device pipeline's) stay on the device, resharded if needed."""
    def one(k, v):
        if isinstance(v, jax.Array):
            s = sharding_for(k, v)
            return v if v.sharding == s else jax.device_put(v, s)
        return jax.make_array_from_process_local_data(sharding_for(k, v), np.asarray(v))
    return {k: one(k, v) for k, v in batch.items()}


__all__ = ['MAE_MEAN', 'MAE_STD', 'EVAL_CROP_FRACTION', 'steps_per_epoch', 'normalize', 'model_input',
           'decode_image', 'random_resized_crop_box', 'AttachIndex', 'RandomResizedCropFlip', 'CenterCrop',
           'ResizeWhole', 'TrainIterator', 'make_train_iterator', 'make_eval_iterator', 'padded_pass', 'to_global']

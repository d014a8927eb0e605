"""The device-resident input pipeline (``data.pipeline='device'``) for datasets that fit in
accelerator memory (CIFAR-10/100, STL-10, Tiny ImageNet, any prepared folder or TFDS dataset).

* Each split is decoded once into uint8 ``[N, H, W, 3]`` (+ int32 labels), cached as ``.npy``
  next to the prepared array_record (``<builder.data_dir>/decoded/``) with a record of its shape,
  dtype, SHA-256 and source (verified on every read, decoded again when it does not verify:
  :func:`decoded_split`), and placed on the mesh
  replicated on every device (docs/design.md, "The device-resident pipeline"). A split that
  does not fit is refused before anything is placed (:func:`check_fits`).
* Training batches come from a jitted companion of the train step (:func:`train_batch`): the
  epoch order is ``jax.random.permutation(fold_in(fold_in(KEY, seed), epoch), N)``; every image
  gets its own RandomResizedCrop box (torchvision's ten tries with its fallback, vectorised:
  :func:`sample_boxes`), bicubic resize with antialiasing (as PIL), and a 50/50 flip. The batch
  carries ``index``, ``crop`` and ``flip`` exactly as the grain pipeline's
  (:class:`colormae_jax.data.pipeline.RandomResizedCropFlip`), so FAMT aligns its maps the same way.
* :class:`DeviceTrainIterator`'s state is ``(epoch, position)``: checkpointed as grain's
  iterators are, it resumes exactly.
* :func:`eval_batches`: one pass in order over a resident split (centre crops or whole images
  resized), for the kNN / linear-probe features and FAMT's weight update.

One process only (several are refused by ``config_lib``): every batch is computed from the
replicated split inside a jitted function, so the batch a process gets is its shard of a global
batch, and FAMT's device weight store would be written by a pass collective over the processes
(not tested, hence refused).
"""
from __future__ import annotations

import concurrent.futures
import functools
import glob
import hashlib
import json
import math
import os
import threading
import time
from typing import Any, Iterator, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from colormae_jax import parallel
from colormae_jax.checkpoints import workdir as storage
from colormae_jax.data import pipeline as data, sources as datasets
from colormae_jax.errors import ConfigError, DataError

KEY = 0x5EED  # the data streams: jax.random.PRNGKey(KEY), folded with the seed, then the epoch
RATIO = (3 / 4, 4 / 3)
TRIES = 10
CPU_DEFAULT_GB = 4.0  # the cap where a device reports no memory statistics (CPU)


# ------------------------------------------------------------------------------ decoding, cached

def cache_dir(data_cfg) -> str:
    """``<prepared dataset dir>/decoded``: beside the array_record files of the dataset."""
    return os.path.join(datasets.prepare(data_cfg).data_dir, 'decoded')


def _cache_paths(data_cfg, split: str) -> tuple[str, str, str]:
    """(images ``.npy``, labels ``.npy``, the cache's record ``.json``) of ``split``."""
    d = cache_dir(data_cfg)
    return (os.path.join(d, f'{split}_images.npy'), os.path.join(d, f'{split}_labels.npy'),
            os.path.join(d, f'{split}_cache.json'))


def _decode(item) -> np.ndarray:
    return np.asarray(data.decode_image(item), np.uint8)


def first_image_shape(data_cfg, split: str) -> tuple[int, int, int]:
    """(H, W, 3) of example 0 of ``split``: the shape of every image of the cache (decoded from
    the prepared data, never read from a cache that may be damaged)."""
    return _decode(datasets.data_source(data_cfg, split)[0]['image']).shape


CACHE_VERSION = 1


def _digest(arr: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(arr)).cast('B')).hexdigest()[:32]


def _load_cache(paths: tuple[str, str, str], n: int, shape: tuple, source: str) -> tuple | None:
    """The cached (images, labels) when they verify against their record: written from these
    prepared data (``source``, :func:`datasets.prepared_fingerprint`), ``n`` images of ``shape``
    uint8 and int32 labels, with the SHA-256 of their bytes; else None, with a warning that says
    why when a cache was there (it is then decoded again)."""
    images_path, labels_path, record_path = paths
    if not os.path.exists(record_path):
        if os.path.exists(images_path):
            logging.warning('The device cache %s has no record (written by an earlier version, or its writing was '
                            'interrupted): decoding the split again.', images_path)
        return None
    why = None
    t0 = time.perf_counter()
    try:
        with open(record_path) as f:
            rec = json.load(f)
        want = {'version': CACHE_VERSION, 'source': source, 'shape': [n, *shape]}
        for k, v in want.items():
            if rec.get(k) != v:
                why = {'source': 'decoded from other prepared data (they were prepared again)',
                       'shape': f'shape {rec.get("shape")}, the split is {[n, *shape]}'}.get(k, f'record {k} differs')
                break
        if why is None:
            images, labels = np.load(images_path), np.load(labels_path)
            if images.dtype != np.uint8 or list(images.shape) != rec['shape']:
                why = f'{images_path} holds {images.dtype} {list(images.shape)}, its record says uint8 {rec["shape"]}'
            elif labels.dtype != np.int32 or labels.shape != (n,):
                why = f'{labels_path} holds {labels.dtype} {list(labels.shape)}, not int32 [{n}]'
            elif _digest(images) != rec['images_sha256']:
                why = f'the bytes of {images_path} differ from its record (SHA-256)'
            elif _digest(labels) != rec['labels_sha256']:
                why = f'the bytes of {labels_path} differ from its record (SHA-256)'
    except (OSError, ValueError, KeyError, TypeError, EOFError) as e:  # truncated .npy, unreadable JSON, ...
        why = f'unreadable: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ""}'
    if why is not None:
        logging.warning('The device cache of %s is damaged (%s): decoding the split again.',
                        os.path.dirname(images_path), why)
        return None
    logging.info('Verified the device cache %s: %d images, %.1f MB, SHA-256 in %.2f s (read included).', images_path,
                 n, images.nbytes / 2 ** 20, time.perf_counter() - t0)
    return images, labels


def _write_cache(paths: tuple[str, str, str], images: np.ndarray, labels: np.ndarray, source: str) -> None:
    """Writes the cache (temporary files renamed into place, the record last: a cache without its
    record is never used). A failure (read-only, disk full, file-size limit) is a warning: the
    run goes on with the decoded split, and the next one decodes it again."""
    images_path, labels_path, record_path = paths
    rec = {'version': CACHE_VERSION, 'source': source, 'shape': list(images.shape), 'dtype': 'uint8',
           'images_sha256': _digest(images), 'labels_sha256': _digest(labels)}
    tmps = []
    try:
        os.makedirs(os.path.dirname(images_path), exist_ok=True)
        if os.path.exists(record_path):
            os.remove(record_path)  # the old record goes first: a half-replaced cache never verifies
        for path, arr in ((labels_path, labels), (images_path, images)):
            tmps.append(f'{path}.{os.getpid()}.tmp.npy')
            np.save(tmps[-1], arr)
            os.replace(tmps[-1], path)
        tmps.append(f'{record_path}.{os.getpid()}.tmp')
        with open(tmps[-1], 'w') as f:
            json.dump(rec, f)
        os.replace(tmps[-1], record_path)
    except OSError as e:
        for t in tmps:
            if os.path.exists(t):
                os.remove(t)
        err = storage.storage_error(e) or e
        logging.warning('Could not cache the decoded split in %s (%s: %s); the run goes on, the next one decodes '
                        'it again.', os.path.dirname(images_path), err.filename or images_path, err.strerror or e)


def decoded_split(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images ``[N, H, W, 3]`` and int32 labels ``[N]`` of ``split``, decoded once and cached.

    The cache is verified each time it is read (:func:`_load_cache`: its shape, dtype, SHA-256
    and the prepared data it came from) and decoded again, with a warning, when it does not
    verify. Decoding holds the dataset's lock (:func:`datasets.dataset_lock`: a second process
    waits, then reads the cache), removes leftovers of killed decodings, and stops on SIGTERM
    (:class:`datasets.PreparationStopped`). All images must share one size (the resident array is
    one block); a split with several sizes is refused, naming two of them.
    """
    paths = _cache_paths(data_cfg, split)
    n = datasets.num_examples(data_cfg, split)
    source = datasets.prepared_fingerprint(data_cfg)
    first = first_image_shape(data_cfg, split)
    got = _load_cache(paths, n, first, source)
    if got is not None:
        return got
    lock = datasets.dataset_lock(data_cfg, f'decode split {split!r} for the device pipeline')
    try:
        lock.acquire()
    except OSError as e:  # a read-only data_dir: decoded here, not cached
        logging.warning('Cannot cache the decoded split beside the prepared data (%s: %s): it is decoded now and '
                        'again by the next run.', e.filename or lock.path, e.strerror or e)
        lock = None
    try:
        if lock is not None:
            datasets.remove_leftovers(glob.glob(os.path.join(glob.escape(os.path.dirname(paths[0])), '*.tmp*')))
            if lock.waited and (got := _load_cache(paths, n, first, source)) is not None:
                return got
        images, labels = _decode_split(data_cfg, split, n, first)
        if lock is not None:
            _write_cache(paths, images, labels, source)
        return images, labels
    finally:
        if lock is not None:
            lock.release()


def _decode_split(data_cfg, split: str, n: int, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
    source = datasets.data_source(data_cfg, split)
    images = np.empty((n,) + tuple(shape), np.uint8)
    labels = np.empty((n,), np.int32)
    lock = threading.Lock()
    odd: list[tuple[int, tuple]] = []

    def one(i: int) -> None:
        ex = source[i]
        im = _decode(ex['image'])
        if im.shape != tuple(shape):
            with lock:
                odd.append((i, im.shape))
            return
        images[i], labels[i] = im, ex['label']

    logging.info('Decoding the %d images of split %r once for the device pipeline ...', n, split)
    t0 = time.perf_counter()
    what = f'decoding split {split!r} for the device pipeline'
    next_log = t0 + datasets.PROGRESS_EVERY_S
    with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
        for start in range(0, n, 1024):
            datasets.check_stop(what)
            if start and time.perf_counter() >= next_log:
                logging.info('%s', datasets.progress_line(what, start, n, t0))
                next_log += datasets.PROGRESS_EVERY_S
            list(pool.map(one, range(start, min(n, start + 1024))))
    if odd:
        i, odd_shape = min(odd)
        raise DataError(f'split {split!r}: images differ in size (example 0 is {shape[1]}x{shape[0]}, '
                        f'example {i} {odd_shape[1]}x{odd_shape[0]}, {len(odd)} differ); data.pipeline=\'device\' '
                        f'needs one size: resize the images, or use data.pipeline=\'grain\'')
    logging.info('Decoded split %r (%d images) in %.1f s.', split, n, time.perf_counter() - t0)
    return images, labels


# ------------------------------------------------------------------------------ placing, refused if too large

def split_bytes(n: int, shape: tuple[int, ...]) -> int:
    """Bytes one device holds for a split of ``n`` uint8 images of ``shape`` and int32 labels."""
    return n * (math.prod(shape) + 4)


def memory_allowed(data_cfg, devices) -> tuple[int, str]:
    """(bytes a split may take on each device, how that figure was found).

    ``data.device_max_gb`` when set; else half of the smallest free memory among ``devices``
    (``memory_stats``: the rest is for the model, its activations and the optimizer), or
    :data:`CPU_DEFAULT_GB` where a device reports no statistics (CPU).
    """
    cap = float(data_cfg.get('device_max_gb', 0.0) or 0.0)
    if cap > 0:
        return int(cap * 2 ** 30), f'data.device_max_gb={cap:g}'
    free = []
    for d in devices:
        stats = d.memory_stats() or {}
        if 'bytes_limit' in stats:
            free.append(stats['bytes_limit'] - stats.get('bytes_in_use', 0))
    if free:
        return min(free) // 2, f'half of the {min(free) / 2 ** 30:.2f} GB free on {devices[0].device_kind}'
    return int(CPU_DEFAULT_GB * 2 ** 30), f'the {CPU_DEFAULT_GB:g} GB cap of devices without memory statistics'


def check_fits(data_cfg, split: str, n: int, shape: tuple[int, ...], devices) -> None:
    """Refuses (``ConfigError('data.pipeline')``) a split larger than :func:`memory_allowed`."""
    need = split_bytes(n, shape)
    allowed, how = memory_allowed(data_cfg, devices)
    if need > allowed:
        raise ConfigError('data.pipeline', f"split {split!r} ({n} images of {'x'.join(map(str, shape))} uint8) needs "
                                           f'{need / 2 ** 30:.2f} GB on each device, more than the '
                                           f'{allowed / 2 ** 30:.2f} GB allowed ({how}); use '
                                           f"data.pipeline='grain' (or raise data.device_max_gb)")


class Resident(NamedTuple):
    """A split on the mesh: ``images`` uint8 [N, H, W, 3] and ``labels`` int32 [N], replicated."""
    images: jax.Array
    labels: jax.Array
    labels_np: np.ndarray

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


_RESIDENT: dict[tuple, Resident] = {}
_LOCK = threading.Lock()


def resident(data_cfg, split: str, mesh) -> Resident:
    """``split`` decoded (cached) and placed on ``mesh``, replicated; once per (dataset, split,
    mesh) in a process, shared by the train iterator, FAMT's update pass and the features."""
    key = (datasets._dataset_key(data_cfg), split, tuple(d.id for d in mesh.devices.flat), mesh.axis_names)
    with _LOCK:
        if key not in _RESIDENT:
            n = datasets.num_examples(data_cfg, split)
            check_fits(data_cfg, split, n, first_image_shape(data_cfg, split), list(mesh.local_devices))
            images, labels = decoded_split(data_cfg, split)
            rep = parallel.replicated(mesh)
            _RESIDENT[key] = Resident(jax.device_put(images, rep), jax.device_put(labels, rep), labels)
        return _RESIDENT[key]


def clear() -> None:
    """Drops the resident splits of this process (tests)."""
    with _LOCK:
        _RESIDENT.clear()


# ------------------------------------------------------------------------------ sampling, jittable

def base_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(KEY), seed)


def epoch_permutation(seed: int, epoch, n: int) -> jax.Array:
    """The order of epoch ``epoch``: ``permutation(fold_in(fold_in(PRNGKey(KEY), seed), epoch), n)``."""
    return jax.random.permutation(jax.random.fold_in(base_key(seed), epoch), n)


def sample_boxes(key: jax.Array, b: int, h: int, w: int, scale=(0.2, 1.0), ratio=RATIO, tries: int = TRIES):
    """torchvision's ``RandomResizedCrop.get_params`` for ``b`` images of h x w, vectorised:
    ``tries`` draws each of an area fraction ~ U(scale) and a log-uniform aspect ratio, sides
    rounded half to even (Python's ``round``); the first try that fits wins, at a uniform
    position; none fits: the largest centred crop with its aspect ratio in ``ratio``
    (:func:`colormae_jax.data.pipeline.random_resized_crop_box`). Returns int32 (top, left, height, width) [b]."""
    u = jax.random.uniform(key, (b * (2 * tries + 2),)).reshape(b, 2 * tries + 2)
    target = (h * w) * (scale[0] + (scale[1] - scale[0]) * u[:, :tries])
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = jnp.exp(lo + (hi - lo) * u[:, tries:2 * tries])
    cw = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    ch = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = jnp.argmax(fits, axis=1)[:, None]
    cw = jnp.take_along_axis(cw, first, 1)[:, 0]
    ch = jnp.take_along_axis(ch, first, 1)[:, 0]
    top = jnp.minimum((u[:, -2] * (h - ch + 1)).astype(jnp.int32), h - ch)
    left = jnp.minimum((u[:, -1] * (w - cw + 1)).astype(jnp.int32), w - cw)
    in_ratio = w / h  # the fallback, static
    if in_ratio < min(ratio):
        fw, fh = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        fh, fw = h, int(round(h * max(ratio)))
    else:
        fw, fh = w, h
    any_fit = fits.any(axis=1)
    return (jnp.where(any_fit, top, (h - fh) // 2), jnp.where(any_fit, left, (w - fw) // 2),
            jnp.where(any_fit, ch, fh), jnp.where(any_fit, cw, fw))


def _keys(x: jax.Array, a: float = -0.5) -> jax.Array:
    """The Keys cubic kernel (PIL's BICUBIC: a = -0.5)."""
    x = jnp.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return jnp.where(x < 1.0, near, jnp.where(x < 2.0, far, 0.0))


def _weights(start, length, in_size: int, out_size: int, clip_to_box: bool) -> jax.Array:
    """[out_size, in_size] resampling weights of PIL's ``ImagingResample`` for the source span
    [start, start + length): output pixel i samples at ``start + (i + .5) * scale`` with the
    kernel widened by ``max(scale, 1)`` (antialiasing), normalised over the pixels it may read:
    those of the box (``clip_to_box``: crop, then resize) or of the whole image (resize, then crop)."""
    scale = length / out_size
    support = jnp.maximum(scale, 1.0)
    centre = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
    x = jnp.arange(in_size, dtype=jnp.float32) + 0.5
    w = _keys((x[None, :] - centre[:, None]) / support)
    if clip_to_box:
        w = jnp.where((x >= start) & (x < start + length), w, 0.0)
    return w / jnp.sum(w, axis=1, keepdims=True)


def resample(images: jax.Array, size: int, top, left, ch, cw, clip_to_box: bool = True) -> jax.Array:
    """uint8 [B, H, W, C] -> uint8 [B, size, size, C]: the box (top, left, ch, cw) in pixels (per
    image, or one for all) resized bicubic as PIL's ``crop(box).resize(BICUBIC)`` does (or, with
    ``clip_to_box=False``, as resizing the whole image and cropping): Keys a=-0.5, antialiased
    when shrinking, the horizontal pass first, each pass rounded to uint8."""
    b, h, w, _ = images.shape
    hi = jax.lax.Precision.HIGHEST

    def one(im, t, lf, hh, ww):
        wy = _weights(t, hh, h, size, clip_to_box)
        wx = _weights(lf, ww, w, size, clip_to_box)
        rows = jnp.clip(jnp.floor(jnp.einsum('hwc,tw->htc', im.astype(jnp.float32), wx, precision=hi) + 0.5), 0, 255)
        out = jnp.clip(jnp.floor(jnp.einsum('sh,htc->stc', wy, rows, precision=hi) + 0.5), 0, 255)
        return out.astype(jnp.uint8)

    args = [jnp.broadcast_to(jnp.asarray(x, jnp.float32), (b,)) for x in (top, left, ch, cw)]
    return jax.vmap(one)(images, *args)


def train_batch(images: jax.Array, labels: jax.Array, index: jax.Array, key: jax.Array, *, size: int,
                scale=(0.2, 1.0), hflip: bool = True, mean=None, std=None) -> dict:
    """One training batch from a resident split: the rows ``index`` [B], each with its own
    RandomResizedCrop box and flip (from ``key``), resized to ``size``. Keys as the grain
    pipeline's: ``image`` (uint8, or float32 normalised when ``mean`` is given), ``label``,
    ``index``, ``crop`` (y0, x0, h, w relative) and ``flip``."""
    _, h, w, _ = images.shape
    b = index.shape[0]
    k_box, k_flip = jax.random.split(key)
    top, left, ch, cw = sample_boxes(k_box, b, h, w, scale)
    out = resample(images[index], size, top, left, ch, cw)
    flip = (jax.random.uniform(k_flip, (b,)) < 0.5) & hflip
    out = jnp.where(flip[:, None, None, None], out[:, :, ::-1], out)
    if mean is not None:
        out = data.normalize(out, mean, std)
    crop = jnp.stack([top / h, left / w, ch / h, cw / w], axis=1).astype(jnp.float32)
    return {'image': out, 'label': labels[index], 'index': index.astype(jnp.int32), 'crop': crop, 'flip': flip}


def eval_box(h: int, w: int, size: int, view: str) -> tuple[float, float, float, float]:
    """The source box (top, left, height, width in pixels) whose bicubic resize to ``size``
    is the eval view of an h x w image: ``'center_crop'`` (:class:`data.CenterCrop`: shorter
    side to ``int(size / 0.875)``, centre crop) or ``'resize'`` (:class:`data.ResizeWhole`)."""
    if view == 'resize' or (h, w) == (size, size):
        return 0.0, 0.0, float(h), float(w)
    if view != 'center_crop':
        raise DataError(f"view={view!r}; valid: ['center_crop', 'resize']")
    short = int(size / data.EVAL_CROP_FRACTION)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    return top * h / nh, left * w / nw, size * h / nh, size * w / nw


# ------------------------------------------------------------------------------ iterators

class DeviceTrainIterator(grain.DatasetIterator):
    """Training batches made on the device; the state is ``(epoch, position)``.

    Epoch ``e`` visits ``N // B`` batches of ``epoch_permutation(seed, e, N)`` (the last
    ``N % B`` examples of each order are not visited); batch ``(e, p)`` is a pure function of
    (seed, e, p), so ``set_state`` resumes exactly. Each batch: ``image``, ``label``, ``crop``,
    ``flip`` as global arrays sharded over the batch axes, ``index`` as numpy (from the host
    copy of the epoch's order, fetched one epoch ahead: the host never waits on the device for it).
    Works with ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``.
    """

    def __init__(self, split: Resident, mesh, data_cfg, *, global_batch_size: int, seed: int,
                 num_epochs: int | None = None):
        super().__init__()
        self._split, self._mesh = split, mesh
        self._b, self._seed, self._num_epochs = int(global_batch_size), int(seed), num_epochs
        self.steps_per_epoch = split.n // self._b
        if self.steps_per_epoch < 1:
            raise DataError(f'split {data_cfg.split!r} has {split.n} examples, fewer than one batch of {self._b}; '
                            f'lower batch_size to at most {split.n}')
        self._epoch = self._pos = 0
        self._fingerprint = dict(pipeline='device', seed=self._seed, examples=split.n, batch=self._b)
        mean, std = data._host_norm(data_cfg)
        rep, bs = parallel.replicated(mesh), parallel.batch_sharding(mesh)
        self._perm_fn = jax.jit(functools.partial(epoch_permutation, self._seed, n=split.n), out_shardings=rep)
        augment = functools.partial(train_batch, size=int(data_cfg.image_size), scale=tuple(data_cfg.crop_scale),
                                    hflip=bool(data_cfg.hflip), mean=mean, std=std)
        seed, b = self._seed, self._b

        def batch(images, labels, perm, epoch, position):  # one dispatch per batch: the keys are folded inside
            index = jax.lax.dynamic_slice_in_dim(perm, position * b, b)
            key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base_key(seed), 1 << 20), epoch),
                                     position)
            return augment(images, labels, index, key)

        self._batch_fn = jax.jit(batch, out_shardings={k: bs for k in ('image', 'label', 'index', 'crop', 'flip')})
        self._perms: dict[int, jax.Array] = {}
        self._host: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._host:
            for e in (epoch, epoch + 1):  # the next epoch's order is computed and copied ahead
                if e not in self._perms:
                    self._perms[e] = self._perm_fn(np.int32(e))
                    self._perms[e].copy_to_host_async()
            for e in [e for e in self._perms if e < epoch]:
                del self._perms[e]
            self._host = {epoch: np.asarray(self._perms[epoch])}
        return self._host[epoch]

    def __next__(self) -> dict:
        self._assert_not_closed()
        if self._pos >= self.steps_per_epoch:
            self._epoch, self._pos = self._epoch + 1, 0
        if self._num_epochs is not None and self._epoch >= self._num_epochs:
            raise StopIteration
        e, p, b = self._epoch, self._pos, self._b
        index = self._order(e)[p * b:(p + 1) * b]
        out = self._batch_fn(self._split.images, self._split.labels, self._perms[e], np.int32(e), np.int32(p))
        self._pos += 1
        out['index'] = index.astype(np.int32)  # the host copy, as the grain path's (known without a sync)
        return out

    def get_state(self) -> dict[str, Any]:
        return {'epoch': self._epoch, 'position': self._pos, **self._fingerprint}

    def set_state(self, state: dict[str, Any]) -> None:
        if 'epoch' not in state or 'position' not in state:
            raise DataError(f"iterator state {state} was not saved by data.pipeline='device'; resume with the "
                            f'pipeline the checkpoint was written with (data.pipeline)')
        data.check_fingerprint(state, self._fingerprint)
        self._epoch, self._pos = int(state['epoch']), int(state['position'])

    def start_prefetch(self) -> None:  # batches are dispatched asynchronously: nothing to start
        self._assert_not_closed()

    def __str__(self) -> str:
        return f'DeviceTrainIterator(epoch={self._epoch}, position={self._pos}, {self._fingerprint})'


def make_train_iterator(data_cfg, *, global_batch_size: int, seed: int, mesh,
                        num_epochs: int | None = None) -> DeviceTrainIterator:
    """:class:`DeviceTrainIterator` over ``data_cfg.split``, resident on ``mesh``."""
    if jax.process_count() > 1:
        raise ConfigError('data.pipeline', f"'device' runs in one process, this run has {jax.process_count()}; "
                                           f"use data.pipeline='grain'")
    split = resident(data_cfg, data_cfg.split, mesh)
    return DeviceTrainIterator(split, mesh, data_cfg, global_batch_size=global_batch_size, seed=seed,
                               num_epochs=num_epochs)


@functools.lru_cache(maxsize=32)
def _eval_view(size: int, box: tuple, mean, std, sharding):
    """jit(resident images, index [B]) -> the eval view of those rows, sharded as ``sharding``."""
    def view(images, index):
        out = resample(images[jnp.minimum(index, images.shape[0] - 1)], size, *box, clip_to_box=False)
        return out if mean is None else data.normalize(out, mean, std)
    return jax.jit(view, out_shardings=sharding)


def eval_batches(data_cfg, *, split: str, global_batch_size: int, mesh, view: str = 'center_crop',
                 limit: int = 0) -> Iterator[dict]:
    """One pass in order over the resident ``split`` (the first ``limit`` examples when set):
    the keys of :func:`colormae_jax.data.pipeline.make_eval_iterator`; ``image`` a global array sharded
    over the batch axes, ``label`` / ``index`` / ``valid`` numpy (padding rows: ``valid`` False)."""
    res = resident(data_cfg, split, mesh)
    used = min(res.n, limit) if limit else res.n
    _, h, w, _ = res.images.shape
    size = int(data_cfg.image_size)
    box = eval_box(h, w, size, view)
    mean, std = data._host_norm(data_cfg)
    bs = parallel.batch_sharding(mesh)
    for start in range(0, used, global_batch_size):
        index = np.arange(start, start + global_batch_size, dtype=np.int32)
        valid = index < used
        images = _eval_view(size, box, mean, std, bs)(res.images, jax.device_put(index, bs))
        label = np.where(valid, res.labels_np[np.minimum(index, res.n - 1)], 0).astype(np.int32)
        yield {'image': images, 'label': label, 'index': np.where(valid, index, 0).astype(np.int32), 'valid': valid}


__all__ = ['KEY', 'cache_dir', 'decoded_split', 'first_image_shape', 'split_bytes', 'memory_allowed', 'check_fits',
           'Resident', 'resident', 'clear', 'base_key', 'epoch_permutation', 'sample_boxes', 'resample',
           'train_batch', 'eval_box', 'DeviceTrainIterator', 'make_train_iterator', 'eval_batches']

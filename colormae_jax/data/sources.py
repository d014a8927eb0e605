"""The datasets: where examples come from, prepared once per run, read by index.

Two sources, both read as TFDS array_record data sources (random access, no TensorFlow):
  * ``source='folder'``: ``<root>/<split>/<class>/*.{jpg,jpeg,png}`` (any case), prepared once
    into array_record under ``data_dir`` by :class:`ImageFolder`;
  * ``source='tfds'``: any TFDS dataset already prepared as array_record (``imagenet2012``, ...),
    with an ``image`` and a ``label`` feature.

:func:`prepare` checks and (for a folder, the first time) prepares a dataset, once per process:
later calls for the same dataset are a lookup. :func:`data_source` is a split's random-access
source (images still encoded), :func:`num_examples` its size. The grain pipeline that reads
these sources is :mod:`colormae_jax.data.pipeline`.

Prepared data are trusted only once verified (docs/pretraining.md, "Data you can trust"): a
folder is prepared with a record (:data:`RECORD_FILE`) of every prepared file (size, SHA-256)
and of every source image (path, size, mtime, SHA-256). Each run checks the folder against it
(a stat per image; the content of those whose size or mtime changed) and hashes the prepared
files before anything reads them: a changed folder or damaged prepared data is refused in one
line naming the files, or prepared again with ``data.reprepare``. Preparing (and the device
pipeline's decoding) holds a per-dataset lock (:class:`DatasetLock`): a second process waits,
then uses the result; leftovers of killed preparations are removed under it; SIGTERM stops it
between two pieces of work (:class:`PreparationStopped`, exit 75).
"""
from __future__ import annotations

import concurrent.futures
import datetime
import fcntl
import glob
import hashlib
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from typing import Callable, NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from colormae_jax.checkpoints import workdir as storage
from colormae_jax.errors import DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _data_dir(data_cfg) -> str:
    return os.path.expanduser(data_cfg.data_dir or '~/tensorflow_datasets')


# ------------------------------------------------------------------------------ image folders

def _visible_dirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if not d.startswith('.') and os.path.isdir(os.path.join(path, d)))


def _is_image(name: str) -> bool:
    return not name.startswith('.') and name.lower().endswith(IMAGE_EXTENSIONS)


def _split_names(root: str) -> list[str]:
    """The subfolders of ``root`` that hold class folders."""
    return [s for s in _visible_dirs(root) if _visible_dirs(os.path.join(root, s))]


def _class_names(root: str) -> list[str]:
    """Sorted union of the class folders of all splits (a split may lack some classes)."""
    return sorted({c for s in _split_names(root) for c in _visible_dirs(os.path.join(root, s))})


def _list_split(split_dir: str) -> list[tuple[str, str]]:
    """(class, file name) of every image of a split, in a fixed order."""
    return [(c, f) for c in _visible_dirs(split_dir)
            for f in sorted(os.listdir(os.path.join(split_dir, c))) if _is_image(f)]


def _scan(root: str) -> dict[str, int]:
    """Checks the layout; returns the number of images per split. Cheap (no decoding)."""
    layout = f'{root}/<split>/<class>/*.jpg (or .jpeg/.png), e.g. {root}/train/cat/0001.jpg'
    splits = _split_names(root)
    if not splits:
        loose = [d for d in _visible_dirs(root) if any(_is_image(f) for f in os.listdir(os.path.join(root, d)))]
        hint = (f' It holds images directly in class-like folders ({", ".join(loose[:3])}): did you point root at a '
                f'split folder? Use its parent, with the split as a subfolder.' if loose else '')
        raise DataError(f'data.root={root} holds no <split>/<class>/ folders; expected {layout}.{hint}')
    counts = {}
    for s in splits:
        if not re.fullmatch(r'\w+', s):
            raise DataError(f'split folder {os.path.join(root, s)!r}: split names may hold only letters, digits and _; '
                            f'rename the folder (e.g. {re.sub(r"[^0-9A-Za-z_]", "_", s)!r})')
        counts[s] = len(_list_split(os.path.join(root, s)))
        if not counts[s]:
            raise DataError(f'split folder {os.path.join(root, s)} holds no images ({"/".join(IMAGE_EXTENSIONS)}); '
                            f'expected {layout}. Add images or remove the folder.')
    return counts


def _folder_config_name(root: str) -> str:
    """``<basename>_<hash of the absolute path>``: different folders never share prepared files."""
    root = os.path.abspath(root)
    base = re.sub(r'[^a-z0-9]+', '_', os.path.basename(root.rstrip('/')).lower()).strip('_') or 'root'
    return f'{base}_{hashlib.sha1(root.encode()).hexdigest()[:8]}'


def _shown(path: str) -> str:
    """``'../x' (resolved: /abs/x)`` for a relative path, ``'/abs/x'`` for an absolute one."""
    return f'{path!r}' + ('' if os.path.isabs(path) else f' (resolved: {os.path.abspath(path)})')


def _workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


PROGRESS_EVERY_S = 30.0


def progress_line(what: str, done: int, total: int, t0: float) -> str:
    """``<what>: 1,234/50,000 (2%), ETA 3 min``: the log line of long data work."""
    secs = (time.perf_counter() - t0) * (total - done) / max(done, 1)
    eta = f'{secs:.0f} s' if secs < 90 else f'{secs / 60:.1f} min' if secs < 5400 else f'{secs / 3600:.1f} h'
    return f'{what}: {done:,}/{total:,} ({100 * done / max(total, 1):.0f}%), ETA {eta}'


def _threaded(fn, items: list, chunk: int = 1024, what: str | None = None):
    """``fn(item)`` for every item, in order, in threads (PIL releases the GIL while decoding);
    chunked so that a million files do not make a million futures at once. With ``what``, a
    progress line every :data:`PROGRESS_EVERY_S`, and SIGTERM stops it between two chunks
    (:func:`check_stop`)."""
    t0 = time.perf_counter()
    next_log = t0 + PROGRESS_EVERY_S
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for start in range(0, len(items), chunk):
            if what is not None:
                check_stop(what)
                if start and time.perf_counter() >= next_log:
                    logging.info('%s', progress_line(what, start, len(items), t0))
                    next_log += PROGRESS_EVERY_S
            yield from pool.map(fn, items[start:start + chunk])


STORE_AS_IS, RE_ENCODE = 'as is', 're-encode'


def _check_image(path: str) -> tuple[str, list | None]:
    """Reads and decodes the file once: (how, its fingerprint ``[size, mtime_ns, ctime_ns, sha256]``,
    the hash None when unreadable). How: :data:`STORE_AS_IS` (an RGB JPEG/PNG, stored as its bytes),
    :data:`RE_ENCODE` (another mode or format: stored as an RGB PNG), or why it cannot be used:
    ``empty (0 bytes)``, ``not an image (...)``, ``truncated or corrupt (...)``, ``unreadable (...)``."""
    try:
        with open(path, 'rb') as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        st = _stat(path)
        return f'unreadable ({type(e).__name__}: {e.strerror})', None if st is None else st + [None]
    fingerprint = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, _sha(raw)]
    if not raw:
        return 'empty (0 bytes)', fingerprint
    try:
        with Image.open(io.BytesIO(raw)) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Image.UnidentifiedImageError:
        return 'not an image (PIL cannot identify it)', fingerprint
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for broken files
        first = (str(e).strip().splitlines() or [''])[0][:160]
        return f'truncated or corrupt ({type(e).__name__}: {first})', fingerprint
    return (STORE_AS_IS if mode == 'RGB' and fmt in ('JPEG', 'PNG') else RE_ENCODE), fingerprint


def _encoded(path: str, how: str) -> bytes:
    """The bytes to store for a file that :func:`_check_image` found usable."""
    if how == STORE_AS_IS:
        with open(path, 'rb') as f:
            return f.read()
    with Image.open(path) as im:  # grayscale, palette, RGBA, CMYK, other formats: store RGB
        out = io.BytesIO()
        im.convert('RGB').save(out, format='PNG')
        return out.getvalue()


class ImageCheck(NamedTuple):
    """What decoding every image of a folder found (:meth:`ImageFolder.check_images`)."""
    total: int
    bad: list[tuple[str, str]]  # (path relative to the root, why it cannot be used), in listing order
    re_encode: frozenset[str]  # relative paths stored as RGB PNG
    source: dict  # {relative path: [size, mtime_ns, ctime_ns, sha256]} of every file (the source's fingerprint)

    def per_split(self) -> dict[str, int]:
        """Bad images per split."""
        return _per_split(self.bad)


def _per_split(items: list[tuple[str, str]]) -> dict[str, int]:
    """{split: count} of (``<split>/<class>/<file>``, why) items."""
    out: dict[str, int] = {}
    for rel, _ in items:
        split = rel.split('/', 1)[0]
        out[split] = out.get(split, 0) + 1
    return out


MAX_LISTED = 20  # bad images named in an error
SKIPPED_FILE = 'skipped_images.txt'
_SKIPPED_KEY = 'skipped_images'  # in the prepared dataset's metadata.json: [[relative path, why], ...]


BAD_FILE_SUFFIX = '.bad_images.txt'  # a refused folder's full list: <data_dir>/image_folder/<config>.bad_images.txt


def _bad_images_error(builder: ImageFolder, check: ImageCheck) -> DataError:
    """One line: the count, the first :data:`MAX_LISTED` bad files with their reasons, and the
    file that lists them all (written here, next to where the prepared data would go)."""
    root = builder.root
    shown = ' | '.join(f'{os.path.join(root, rel)}: {why}' for rel, why in check.bad[:MAX_LISTED])
    if len(check.bad) > MAX_LISTED:
        shown += f' | ... and {len(check.bad) - MAX_LISTED} more'
    folders = os.path.dirname(os.path.dirname(builder.data_dir))  # <data_dir>/image_folder
    path = os.path.join(folders, builder.builder_config.name + BAD_FILE_SUFFIX)
    try:
        _write_list(path, f'images of {root} that cannot be used (nothing was prepared)', root, check.bad)
        where = f'all listed in {path}'
    except OSError as e:
        where = f'the full list could not be written to {path}: {e.strerror}'
    return DataError(f'data.root={root}: {len(check.bad)} of {check.total} images cannot be used (empty, not an '
                     f'image, or truncated / corrupt), so nothing was prepared ({shown}; {where}); remove or replace '
                     f'them, or set --config.data.skip_bad_images=True to leave them out (then listed in '
                     f'{SKIPPED_FILE} next to the prepared data and in the workdir)')


def _write_list(path: str, what: str, root: str, items: list[tuple[str, str]]) -> str:
    """``path``: a ``# <what>: path<TAB>why`` header, then one ``<path><TAB><why>`` line per item
    (written atomically)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        f.write(f'# {what}: path<TAB>why\n')
        f.writelines(f'{os.path.join(root, rel)}\t{why}\n' for rel, why in items)
    os.replace(path + '.tmp', path)
    return path


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """``<root>/<split>/<class>/*.jpg`` as a TFDS dataset (array_record), without TensorFlow.

    Prepared under ``<data_dir>/image_folder/<basename>_<hash of the absolute root>/1.0.0``.
    Features: ``image`` (uint8, (None, None, 3)), ``label`` (class names = sorted class folders
    of all splits), ``file_name`` (``<class>/<file>``). Not registered with TFDS by name
    (no clash with ``tfds.folder_dataset``); ``tfds.builder('image_folder/<config>', data_dir=...)``
    still reads a prepared folder from its files.

    Every image is decoded once before anything is written (:meth:`check_images`). Files that
    cannot be used (empty, not an image, truncated / corrupt) refuse the folder, all of them
    named (the first 20 in the one-line error, all in ``<config>.bad_images.txt`` beside the
    dataset folder); with ``skip_bad_images`` they are left out, and listed in the prepared
    dataset's metadata (:meth:`skipped`), in ``skipped_images.txt`` next to it and, for a run,
    in ``<workdir>/skipped_images.txt`` (:func:`write_skipped`).
    """
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, root: str, data_dir: str | None = None, skip_bad_images: bool = False, **kwargs):
        kwargs.pop('config', None)  # always derived from the root
        kwargs.pop('file_format', None)
        self._root = os.path.abspath(root)
        self._skip_bad_images = bool(skip_bad_images)
        self._check: ImageCheck | None = None
        config = tfds.core.BuilderConfig(name=_folder_config_name(root), description=f'image folder {self._root}')
        super().__init__(config=config, data_dir=data_dir, file_format='array_record', **kwargs)

    @property
    def root(self) -> str:
        return self._root

    def __getstate__(self):  # grain workers unpickle the data source, and with it the builder
        return {'_original_state': {'root': self._root, 'data_dir': self._original_state['data_dir']}}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=_class_names(self._root) if os.path.isdir(self._root) else []),
            'file_name': tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, description=f'Image folder {self._root}', features=features,
                                     supervised_keys=('image', 'label'), metadata=tfds.core.MetadataDict())

    def check_images(self) -> ImageCheck:
        """Decodes every image of every split once (in threads); remembered for the preparation."""
        if self._check is None:
            rels = [f'{s}/{c}/{f}' for s in _split_names(self._root)
                    for c, f in _list_split(os.path.join(self._root, s))]
            logging.info('Checking the %d images of %s (each decoded once) ...', len(rels), self._root)
            found = dict(zip(rels, _threaded(_check_image, [os.path.join(self._root, r) for r in rels],
                                             what=f'checking the images of {self._root}')))
            self._check = ImageCheck(
                total=len(rels), bad=[(r, why) for r, (why, _) in found.items() if why not in (STORE_AS_IS, RE_ENCODE)],
                re_encode=frozenset(r for r, (how, _) in found.items() if how == RE_ENCODE),
                source={r: fp for r, (_, fp) in found.items() if fp is not None})
        return self._check

    def skipped(self) -> list[tuple[str, str]]:
        """(path relative to the root, why) of the images left out when the folder was prepared."""
        metadata = self.info.metadata
        try:  # by item: tfds' LazyMetadataDict reads metadata.json on __getitem__, not on get / in / len
            return [tuple(x) for x in metadata[_SKIPPED_KEY]] if metadata is not None else []
        except KeyError:  # prepared before bad images could be left out
            return []

    def _split_generators(self, dl_manager):
        del dl_manager
        check = self.check_images()
        if check.bad and not self._skip_bad_images:
            raise _bad_images_error(self, check)
        self.info.metadata[_SKIPPED_KEY] = [list(x) for x in check.bad]  # written with the dataset's info
        skip = {r for r, _ in check.bad}
        return {s: self._generate_examples(s, check.re_encode, skip) for s in _split_names(self._root)}

    def _generate_examples(self, split: str, re_encode: frozenset[str], skip: set[str]):
        files = [(c, f) for c, f in _list_split(os.path.join(self._root, split)) if f'{split}/{c}/{f}' not in skip]

        def encoded(item):
            rel = f'{split}/{item[0]}/{item[1]}'
            return _encoded(os.path.join(self._root, rel), RE_ENCODE if rel in re_encode else STORE_AS_IS)

        for (label, name), image in zip(files, _threaded(encoded, files, what=f'preparing {self._root}')):
            key = f'{label}/{name}'
            yield key, {'image': image, 'label': label, 'file_name': key}


# ------------------------------------------------------------------------------ builders

def get_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The TFDS builder for ``data_cfg`` (nothing is prepared or read here)."""
    data_dir = _data_dir(data_cfg)
    if data_cfg.source == 'folder':
        root = data_cfg.root
        if not root or not os.path.isdir(root):
            raise DataError(f'data.root={_shown(root) if root else repr(root)} is not a directory; point it at a '
                            f'folder laid out as <root>/<split>/<class>/*.jpg, e.g. '
                            f'--config.data.root=../shared/data/cifar10')
        return ImageFolder(root=root, data_dir=data_dir, skip_bad_images=data_cfg.get('skip_bad_images', False))
    if data_cfg.source == 'tfds':
        if not data_cfg.name:
            raise DataError("data.name is empty; with data.source='tfds' set the TFDS dataset name, "
                            "e.g. --config.data.name=imagenet2012")
        try:
            return tfds.builder(data_cfg.name, data_dir=data_dir, file_format='array_record')
        except Exception as e:  # unknown name, bad config/version, ...
            raise DataError(f'TFDS dataset {data_cfg.name!r} is not available under {data_dir}: '
                            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}. Check data.name '
                            f'(tfds name, optionally name/config:version) and data.data_dir.') from None
    raise DataError(f"data.source={data_cfg.source!r} is not valid; use 'folder' or 'tfds'")


def _check_tfds_prepared(builder, data_cfg) -> None:
    how = (f'Prepare it as array_record under that data_dir, on a machine with TensorFlow: '
           f'`tfds build {data_cfg.name} --file_format=array_record --data_dir={_data_dir(data_cfg)}`, '
           f"or use data.source='folder' with a <root>/<split>/<class>/*.jpg folder.")
    if not builder.is_prepared():
        raise DataError(f'TFDS dataset {data_cfg.name!r} is not prepared under {_data_dir(data_cfg)} '
                        f'(looked in {builder.data_dir}). {how}')
    formats = {f.value for f in builder.info.available_file_formats()}
    if 'array_record' not in formats:
        raise DataError(f'TFDS dataset {data_cfg.name!r} under {builder.data_dir} is prepared as {sorted(formats)}, '
                        f'not array_record (random access). {how}')
    feats = dict(builder.info.features.items())
    if not (isinstance(feats.get('image'), tfds.features.Image) and isinstance(feats.get('label'),
                                                                                tfds.features.ClassLabel)):
        raise DataError(f'TFDS dataset {data_cfg.name!r} has features {sorted(feats.keys())}; the pipeline needs an '
                        f"'image' (Image) and a 'label' (ClassLabel) feature.")


def _prepare(data_cfg) -> tfds.core.DatasetBuilder:
    """The work behind :func:`prepare`, for a dataset not yet prepared in this process."""
    if data_cfg.source == 'folder':
        return _prepare_folder_source(data_cfg)
    builder = get_builder(data_cfg)
    _check_tfds_prepared(builder, data_cfg)
    broken = _check_structure(builder)
    if broken is not None:
        raise DataError(f'{broken[0]}: the prepared TFDS dataset {data_cfg.name!r} is damaged ({broken[1]}); prepare '
                        f'it again as array_record, on a machine with TensorFlow: `tfds build {data_cfg.name} '
                        f'--file_format=array_record --data_dir={_data_dir(data_cfg)} --overwrite`')
    _tidy(data_cfg, builder)
    return builder


def _prepare_folder_source(data_cfg) -> ImageFolder:
    """An image folder, prepared (or reused once verified: :func:`_check_folder`). A damaged or
    outdated preparation is refused, or with ``data.reprepare`` prepared again; preparing holds
    the dataset's :class:`DatasetLock`, and a process that waited for it checks again first."""
    builder, problem = _open_folder(data_cfg)
    counts = _scan(builder.root if builder is not None else os.path.abspath(data_cfg.root))
    if problem is None:
        problem = _check_folder(builder, counts)
    if problem is None:
        _tidy(data_cfg, builder)
        return _reuse(builder)
    reprepare = bool(data_cfg.get('reprepare', False))
    if problem.kind in ('damaged', 'changed') and not reprepare:
        raise DataError(problem.message)
    root = os.path.abspath(data_cfg.root)
    lock = DatasetLock(_lock_path(data_cfg), f'prepare {root}')
    try:
        lock.acquire()
    except OSError as e:  # the data_dir cannot be written
        if problem.kind == 'legacy':
            logging.info('%s was prepared without a record of its files, and %s cannot be written: used unrecorded '
                         '(the shards were checked against dataset_info.json).', builder.data_dir, _data_dir(data_cfg))
            return _reuse(builder)
        raise _storage_data_error(e, root) from None
    try:
        remove_leftovers(_leftovers(data_cfg))
        if lock.waited or (problem.kind == 'missing' and os.path.isdir(_folder_paths(data_cfg)[2])):
            # another process held the lock, or prepared and released it meanwhile: its result is looked at again
            builder, problem = _open_folder(data_cfg)
            problem = problem or _check_folder(builder, counts)
            if problem is None:
                return _reuse(builder)
            if problem.kind in ('damaged', 'changed') and not reprepare:
                raise DataError(problem.message)
        if problem.kind == 'legacy':
            _record_legacy(builder)
            return _reuse(builder)
        if problem.kind in ('damaged', 'changed'):
            logging.warning('%s. Preparing it again (data.reprepare=True).', problem.short)
            shutil.rmtree(_folder_paths(data_cfg)[2], ignore_errors=True)
            builder, problem = _open_folder(data_cfg)
        _prepare_folder(builder, counts, data_cfg.get('skip_bad_images', False))
        return builder
    finally:
        lock.release()


def _reuse(builder: ImageFolder) -> ImageFolder:
    """A verified folder: says which images were left out when it was prepared (if any)."""
    skipped = _per_split(builder.skipped())
    if skipped:
        try:
            _write_skipped(builder)
        except OSError:  # a read-only data_dir: the list stays in the dataset's metadata
            pass
        logging.warning('%s: %d bad images were left out when it was prepared (data.skip_bad_images); '
                        'they are listed in %s', builder.root, sum(skipped.values()),
                        os.path.join(builder.data_dir, SKIPPED_FILE))
    return builder


def _prepare_folder(builder: ImageFolder, counts: dict[str, int], skip_bad_images: bool) -> None:
    """Decodes every image, refuses (or, with ``skip_bad_images``, leaves out) the bad ones, then
    writes the array_record files and their record (:func:`_write_record`). A storage failure
    (disk full, file-size limit, permissions) is one :class:`DataError` naming the file; tfds
    removes what it had written."""
    check = builder.check_images()
    if check.bad:
        if not skip_bad_images:
            raise _bad_images_error(builder, check)
        bad = check.per_split()
        empty = sorted(s for s in counts if bad.get(s, 0) == counts[s])
        if empty:
            raise DataError(f'split folder {os.path.join(builder.root, empty[0])}: all its {counts[empty[0]]} images '
                            f'cannot be used (e.g. {check.bad[0][0]}: {check.bad[0][1]}); replace them, or remove '
                            f'the folder')
    t0 = time.perf_counter()
    logging.info('Writing the %d images of %s as array_record into %s ...', check.total - len(check.bad),
                 builder.root, builder.data_dir)
    tfds.disable_progress_bar()  # progress goes to the log (_threaded); a bar would share the line of an error
    try:
        builder.download_and_prepare(file_format='array_record')
        _write_record(builder, check.source)
    except (PreparationStopped, DataError):
        raise
    except Exception as e:  # noqa: BLE001 - tfds and array_record report storage failures as many types
        if storage.storage_error(e) is None:
            raise
        shutil.rmtree(builder.data_dir, ignore_errors=True)  # a record could not be written: nothing half-done kept
        raise _storage_data_error(e, builder.root) from None
    logging.info('Prepared %s into %s in %.1f s.', builder.root, builder.data_dir, time.perf_counter() - t0)
    if check.bad:
        path = _write_skipped(builder)
        logging.warning('%s: left out %d of %d images that cannot be used (data.skip_bad_images=True); the list, '
                        'with the reasons, is in %s', builder.root, len(check.bad), check.total, path)


def _storage_data_error(e: BaseException, root: str) -> DataError:
    err = storage.storage_error(e) or OSError(getattr(e, 'errno', None), str(e), getattr(e, 'filename', None))
    return DataError(storage.storage_message(err, key='--config.data.data_dir', doing=f'preparing {root}',
                                             then='it prepares the data again (nothing half-written was kept)'))


# ------------------------------------------------------------------------------ stopping on SIGTERM

class PreparationStopped(Exception):
    """SIGTERM reached the preparation of a dataset, the device pipeline's decoding, their
    verification or the wait for another process's: it stopped between two pieces of work,
    nothing half-written kept. ``main`` ends the run as preempted (exit 75); the relaunch
    starts the work again."""


_STOP_CHECKS: list[Callable[[], bool]] = []


def set_stop_check(fn: Callable[[], bool]) -> None:
    """Registers what says that the run must stop (the training loop's ``stop_requested``: True
    once SIGTERM has arrived); :func:`check_stop` polls it."""
    if fn not in _STOP_CHECKS:
        _STOP_CHECKS.append(fn)


def check_stop(what: str) -> None:
    """Raises :class:`PreparationStopped` (``<what>: stopped by SIGTERM``) once a registered
    check (:func:`set_stop_check`) says so; called between two pieces of long data work."""
    if any(f() for f in _STOP_CHECKS):
        raise PreparationStopped(f'{what}: stopped by SIGTERM')


# ------------------------------------------------------------------------------ the dataset lock, leftovers

WAIT_LOG_EVERY_S = 30.0


class DatasetLock:
    """An exclusive lock on one dataset's preparation or decoding: ``flock`` on ``path``. The
    kernel drops it when its holder dies (``kill -9`` included), so it is never stale. A second
    process waits: one log line at once and every :data:`WAIT_LOG_EVERY_S` naming the holder,
    and SIGTERM stops the wait (:func:`check_stop`); :attr:`waited` tells it to look at the
    holder's result. The holder removes the file on release (a waiter that locked the removed
    file locks the new one). Creating the file raises ``OSError`` where the folder cannot be
    written; a file system without ``flock`` gives a warning and no lock."""

    def __init__(self, path: str, what: str):
        self.path, self.what = path, what
        self.waited = False
        self._fd: int | None = None

    def __enter__(self) -> DatasetLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> str:
        try:
            with open(self.path) as f:
                h = json.load(f)
            return f'pid {h["pid"]} on {h["host"]}, since {h["since"]}, to {h["what"]}'
        except (OSError, ValueError, KeyError, TypeError):
            return 'another process'

    def acquire(self, blocking: bool = True) -> bool:
        """Takes the lock (waiting for it when ``blocking``); False when not blocking and held."""
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        next_log = time.monotonic()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if not blocking:
                            os.close(fd)
                            return False
                    except OSError as e:  # no flock on this file system (some network mounts)
                        logging.warning('%s cannot be locked (%s): preparing without a lock; start one run at a time '
                                        'on this data_dir.', self.path, e.strerror)
                        self._fd = fd
                        return True
                    self.waited = True
                    if time.monotonic() >= next_log:
                        logging.info('Waiting for %s (%s) before this run can %s; it then uses the result.',
                                     self.path, self._holder(), self.what)
                        next_log += WAIT_LOG_EVERY_S
                    check_stop(f'waiting to {self.what}')
                    time.sleep(0.2)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder removed this file on release: lock the new one
        self._fd = fd
        me = {'pid': os.getpid(), 'host': socket.gethostname(), 'what': self.what,
              'since': datetime.datetime.now().astimezone().isoformat(timespec='seconds')}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(fd)  # closing drops the flock


def _folder_paths(data_cfg) -> tuple[str, str, str]:
    """(``<data_dir>/image_folder``, the config name, the prepared version folder) of a folder
    source, known without a builder."""
    folders = os.path.join(os.path.abspath(_data_dir(data_cfg)), 'image_folder')
    name = _folder_config_name(data_cfg.root)
    return folders, name, os.path.join(folders, name, str(ImageFolder.VERSION))


def _lock_path(data_cfg) -> str:
    """The dataset's lock file: ``<data_dir>/image_folder/<config>.lock`` beside a folder's
    prepared data; ``<prepared dataset>/decoded.lock`` for a TFDS dataset (its decoding only)."""
    if data_cfg.source == 'folder':
        folders, name, _ = _folder_paths(data_cfg)
        return os.path.join(folders, name + '.lock')
    return os.path.join(prepare(data_cfg).data_dir, 'decoded.lock')


def dataset_lock(data_cfg, what: str) -> DatasetLock:
    """The :class:`DatasetLock` of the dataset of ``data_cfg`` (the device pipeline decodes under it)."""
    return DatasetLock(_lock_path(data_cfg), what)


def _leftovers(data_cfg, builder=None) -> list[str]:
    """What killed preparations and decodings left: tfds' ``incomplete.*`` folders beside a
    folder's prepared data, the device cache's ``*.tmp.npy`` and the lists' ``*.tmp``."""
    if data_cfg.source == 'folder':
        folders, name, version_dir = _folder_paths(data_cfg)
        found = glob.glob(os.path.join(glob.escape(os.path.join(folders, name)), 'incomplete.*'))
        found += glob.glob(os.path.join(glob.escape(folders), '*.tmp'))
    else:
        version_dir = (builder or prepare(data_cfg)).data_dir
        found = []
    found += glob.glob(os.path.join(glob.escape(version_dir), '*.tmp'))
    found += glob.glob(os.path.join(glob.escape(os.path.join(version_dir, 'decoded')), '*.tmp*'))
    return sorted(found)


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def remove_leftovers(paths: list[str]) -> None:
    """Removes ``paths`` (call it holding the dataset's lock: no live process writes them)."""
    if not paths:
        return
    total = 0
    for p in paths:
        try:
            total += _size(p)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
        except OSError:
            pass
    logging.warning('Removed %d leftover(s) of interrupted preparations or decodings (%.1f MB): %s', len(paths),
                    total / 2 ** 20, ', '.join(paths[:3]) + (' ...' if len(paths) > 3 else ''))


def _tidy(data_cfg, builder=None) -> None:
    """Removes leftovers of killed preparations when the dataset's lock is free (a held lock
    means they may be a live preparation's)."""
    found = _leftovers(data_cfg, builder)
    if not found:
        return
    lock = DatasetLock(_lock_path(data_cfg) if data_cfg.source == 'folder'
                       else os.path.join(builder.data_dir, 'decoded.lock'), 'remove leftovers')
    try:
        if not lock.acquire(blocking=False):
            return
    except OSError:  # a read-only data_dir
        return
    try:
        remove_leftovers(_leftovers(data_cfg, builder))
    finally:
        lock.release()


# ------------------------------------------------------------------------------ the record, verification

RECORD_FILE = 'prepared.json'  # in the prepared dataset's folder
RECORD_VERSION = 1
_OURS = (RECORD_FILE, SKIPPED_FILE)  # files of ours in the prepared folder, not in the record


def _sha(data) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def _hash_file(path: str) -> str | None:
    """SHA-256 (128 bits, hex) of a file, read in 8 MiB pieces; None when unreadable."""
    h = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            while chunk := f.read(1 << 23):
                h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()[:32]


def _stat(path: str) -> list | None:
    """[size, mtime_ns, ctime_ns] of a file (the ctime changes on every write or rename, and no
    copy tool sets it); None when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def _fingerprint_file(path: str) -> list | None:
    """[size, mtime_ns, ctime_ns, sha256] of a source file, None when it cannot be read."""
    st = _stat(path)
    return None if st is None else st + [_hash_file(path)]


def _source_stats(root: str) -> dict[str, list]:
    """{``<split>/<class>/<file>``: [size, mtime_ns, ctime_ns]} of every image of the folder."""
    out = {}
    for s in _split_names(root):
        for c, f in _list_split(os.path.join(root, s)):
            st = _stat(os.path.join(root, s, c, f))
            if st is not None:
                out[f'{s}/{c}/{f}'] = st
    return out


def _prepared_names(data_dir: str) -> list[str]:
    """The files tfds wrote in a prepared folder (not ours, not the cache, not a lock)."""
    return sorted(n for n in os.listdir(data_dir) if n not in _OURS and not n.endswith(('.tmp', '.lock'))
                  and os.path.isfile(os.path.join(data_dir, n)))


def _write_json(path: str, obj) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(obj, f, separators=(',', ':'))
    os.replace(tmp, path)


def _hash_all(paths: list[str], what: str) -> list[str | None]:
    return list(_threaded(_hash_file, paths, chunk=64, what=what))


def _write_record(builder: ImageFolder, source: dict) -> dict:
    """Writes ``<prepared folder>/prepared.json``: the size and SHA-256 of every file tfds wrote,
    and the fingerprint of the source (``{path: [size, mtime_ns, ctime_ns, sha256]}``)."""
    d = builder.data_dir
    names = _prepared_names(d)
    hashes = list(_threaded(_hash_file, [os.path.join(d, n) for n in names], chunk=64))  # not stopped half-way
    record = {'version': RECORD_VERSION, 'root': builder.root,
              'files': {n: {'size': os.path.getsize(os.path.join(d, n)), 'sha256': h} for n, h in zip(names, hashes)},
              'source': source}
    _write_json(os.path.join(d, RECORD_FILE), record)
    _FINGERPRINTS.pop(d, None)
    return record


def _record_legacy(builder: ImageFolder) -> None:
    """Records a folder prepared by an earlier version (checked against dataset_info.json and the
    image counts first): from now on it is verified as if prepared with a record."""
    t0 = time.perf_counter()
    rels = sorted(_source_stats(builder.root))
    fps = list(_threaded(_fingerprint_file, [os.path.join(builder.root, r) for r in rels], what=f'recording '
                         f'{builder.root}'))
    _write_record(builder, {r: fp for r, fp in zip(rels, fps) if fp is not None})
    logging.warning('%s was prepared without a record of its files (by an earlier version): recorded now, from the '
                    'folder as it is (%d images, %.1f s); later runs verify against it.', builder.data_dir, len(rels),
                    time.perf_counter() - t0)


def _read_record(data_dir: str) -> dict | None:
    path = os.path.join(data_dir, RECORD_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if not isinstance(record, dict) or record.get('version') != RECORD_VERSION or 'files' not in record:
        raise ValueError(f'not a record of version {RECORD_VERSION}')
    return record


class _Problem(NamedTuple):
    """Why a folder's prepared data cannot be used as they are: ``missing`` (not prepared),
    ``legacy`` (prepared without a record: usable, to be recorded), ``damaged`` or ``changed``
    (refused, or prepared again with ``data.reprepare``); ``message`` is the one-line error."""
    kind: str
    message: str = ''
    short: str = ''  # what is wrong, without what to do


def _damaged(root: str, data_dir: str, path: str, why: str) -> _Problem:
    short = f'{path}: the prepared data of {root} are damaged ({why})'
    return _Problem('damaged', f'{short}; prepare them again: relaunch with --config.data.reprepare=True (or delete '
                               f'{data_dir}, then relaunch)', short)


def _open_folder(data_cfg) -> tuple[ImageFolder | None, _Problem | None]:
    """The folder's builder; (None, damaged) when tfds cannot read its prepared metadata."""
    try:
        return get_builder(data_cfg), None
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - tfds raises what its JSON parsers raise
        _, _, version_dir = _folder_paths(data_cfg)
        first = (str(e).strip().splitlines() or [''])[0][:160]
        return None, _damaged(os.path.abspath(data_cfg.root), version_dir,
                              os.path.join(version_dir, 'dataset_info.json'),
                              f'tfds cannot read its metadata: {type(e).__name__}: {first}')


def _check_folder(builder: ImageFolder, counts: dict[str, int]) -> _Problem | None:
    """None when the prepared data of ``builder`` can be used as they are: the folder is the one
    recorded (:func:`_source_changes`) and every recorded file has its size and SHA-256.
    Without a record (prepared by an earlier version): the shards against dataset_info.json and
    the image counts, then ``legacy``."""
    d, root = builder.data_dir, builder.root
    if not os.path.isdir(d):
        return _Problem('missing')
    try:
        record = _read_record(d)
    except (OSError, ValueError) as e:
        return _damaged(root, d, os.path.join(d, RECORD_FILE), f'unreadable: {e}')
    if record is None:
        if not builder.is_prepared():
            return _damaged(root, d, os.path.join(d, 'dataset_info.json'), 'missing: not a complete prepared dataset')
        broken = _check_structure(builder)
        if broken is not None:
            return _damaged(root, d, *broken)
        counted = _count_text(builder, counts)
        return _changed(builder, counted) if counted else _Problem('legacy')
    t0 = time.perf_counter()
    changed = _source_changes(builder, record, counts)
    if changed:
        return _changed(builder, changed)
    t1 = time.perf_counter()
    files = record['files']
    for name, want in sorted(files.items()):
        path = os.path.join(d, name)
        st = _stat(path)
        if st is None:
            return _damaged(root, d, path, 'missing')
        if st[0] != want['size']:
            return _damaged(root, d, path, f'{st[0]:,} bytes, {want["size"]:,} when prepared: truncated or overwritten')
    names = sorted(files)
    for name, got in zip(names, _hash_all([os.path.join(d, n) for n in names], f'verifying {d}')):
        if got != files[name]['sha256']:
            return _damaged(root, d, os.path.join(d, name), 'its bytes differ from when it was prepared (SHA-256)')
    logging.info('Verified the prepared data of %s: the folder\'s %d images as recorded (%.2f s), the %d prepared '
                 'files (%.1f MB) by SHA-256 (%.2f s).', root, len(record.get('source') or {}), t1 - t0, len(files),
                 sum(f['size'] for f in files.values()) / 2 ** 20, time.perf_counter() - t1)
    _FINGERPRINTS[d] = _files_digest(files)
    return None


def _count_text(builder: ImageFolder, counts: dict[str, int]) -> str:
    """``(images per split: now {...}, prepared {...})`` (left-out images counted as prepared), or
    '' when the counts are equal."""
    stored = {s: builder.info.splits[s].num_examples if s in builder.info.splits else 0 for s in counts}
    skipped = _per_split(builder.skipped())
    if {s: stored[s] + skipped.get(s, 0) for s in counts} == counts:
        return ''
    left_out = f', left out as bad {skipped}' if skipped else ''
    return f'(images per split: now {counts}, prepared {stored}{left_out})'


def _changed(builder: ImageFolder, what: str) -> _Problem:
    short = f'data.root={builder.root}: the folder changed since it was prepared into {builder.data_dir} {what}'
    return _Problem('changed', f'{short}; set --config.data.reprepare=True to prepare it again (or delete '
                               f'{builder.data_dir})', short)


MAX_CHANGES_LISTED = 5


def _source_changes(builder: ImageFolder, record: dict, counts: dict[str, int]) -> str:
    """'' when every image of the folder is as recorded: same paths, and the same size, mtime and
    ctime, or (for those whose stat changed) the same SHA-256; else what changed, with the count
    and the first paths: changed content, moved (a recorded file's bytes at a new path), added,
    removed. Files only touched get their new stat recorded (when the folder is writable)."""
    root, recorded = builder.root, record.get('source') or {}
    now = _source_stats(root)
    added = [r for r in now if r not in recorded]
    removed = [r for r in recorded if r not in now]
    restat = [r for r in now if r in recorded and now[r] != recorded[r][:3]]
    to_hash = restat + added
    hashes = dict(zip(to_hash, _threaded(_hash_file, [os.path.join(root, r) for r in to_hash], chunk=256,
                                         what=f'checking {root}')))
    replaced = [r for r in restat if hashes[r] != recorded[r][3]]
    touched = {r: now[r] + [hashes[r]] for r in restat if hashes[r] == recorded[r][3]}
    gone = {recorded[r][3]: r for r in removed}
    moved = {a: gone[hashes[a]] for a in added if hashes[a] is not None and hashes[a] in gone}
    changes = ([(r, 'its content changed') for r in replaced]
               + [(a, f'moved from {os.path.join(root, moved[a])}') for a in added if a in moved]
               + [(a, 'added') for a in added if a not in moved]
               + [(r, 'removed') for r in removed if r not in set(moved.values())])
    if not changes:
        if touched:  # same bytes, new stat: recorded, so that the next run does not hash them again
            try:
                _write_json(os.path.join(builder.data_dir, RECORD_FILE), dict(record, source={**recorded, **touched}))
            except OSError:
                pass
        return ''
    shown = '; '.join(f'{os.path.join(root, r)}: {what}' for r, what in changes[:MAX_CHANGES_LISTED])
    if len(changes) > MAX_CHANGES_LISTED:
        shown += f'; and {len(changes) - MAX_CHANGES_LISTED} more'
    per_split = _count_text(builder, counts)
    n = len(changes)
    return f'{per_split + " " if per_split else ""}({n} image{"s differ" if n > 1 else " differs"}: {shown})'


def _check_structure(builder) -> tuple[str, str] | None:
    """(path, why) of the first array_record shard that is missing or holds another number of
    records than dataset_info.json lists (a truncated shard holds fewer); None when all match.
    Reads only the shards' footers."""
    from array_record.python.array_record_module import ArrayRecordReader
    for name, split in builder.info.splits.items():
        try:
            shards = list(zip(split.filepaths, split.shard_lengths))
        except Exception as e:  # noqa: BLE001 - a split tfds cannot describe
            return os.path.join(builder.data_dir, 'dataset_info.json'), f'split {name!r}: {e}'
        for path, n in shards:
            path = os.fspath(path)
            if not os.path.exists(path):
                return path, 'missing'
            try:
                reader = ArrayRecordReader(path)
                try:
                    got = reader.num_records()
                finally:
                    reader.close()
            except Exception as e:  # noqa: BLE001 - array_record's own errors
                return path, f'unreadable: {type(e).__name__} {(str(e).splitlines() or [""])[0][:160]}'.strip()
            if got != n:
                return path, f'{got} records, {n} listed in dataset_info.json: truncated or overwritten'
    return None


def content_digest(data_cfg) -> str:
    """A digest of every example of every split, in order (the label, the file name and the
    stored image bytes): equal for two preparations of the same folder, whose array_record
    bytes may differ (the order of the fields within a serialized example is not fixed)."""
    builder = prepare(data_cfg)
    h = hashlib.sha256()
    for split in sorted(builder.info.splits):
        src = _source(builder, split)
        for i in range(len(src)):
            ex = src[i]
            h.update(f'{split}/{i}/{int(ex["label"])}/'.encode() + bytes(ex.get('file_name', b'')) + b'/')
            h.update(bytes(ex['image']))
    return h.hexdigest()[:32]


_FINGERPRINTS: dict[str, str] = {}


def prepared_fingerprint(data_cfg) -> str:
    """A digest of the prepared files of the dataset (their recorded SHA-256s; for a TFDS dataset
    or a folder prepared without a record, their names, sizes and mtimes): what the device
    pipeline's cache records as its source."""
    d = prepare(data_cfg).data_dir
    if d not in _FINGERPRINTS:
        record = None
        try:
            record = _read_record(d)
        except (OSError, ValueError):
            pass
        if record is not None:
            listed = record['files']
        else:
            listed = {n: _stat(os.path.join(d, n))[:2] for n in _prepared_names(d)}
        _FINGERPRINTS[d] = _files_digest(listed)
    return _FINGERPRINTS[d]


def _files_digest(listed: dict) -> str:
    return _sha(json.dumps(listed, sort_keys=True).encode())


def _write_skipped(builder: ImageFolder) -> str:
    """``<builder.data_dir>/skipped_images.txt``: one ``<path><TAB><why>`` line per left-out image
    (written again from the dataset's metadata if it was deleted)."""
    path = os.path.join(builder.data_dir, SKIPPED_FILE)
    if not os.path.exists(path):
        _write_list(path, f'images of {builder.root} left out of the prepared data (data.skip_bad_images=True)',
                    builder.root, builder.skipped())
    return path


def write_skipped(data_cfg, workdir: str) -> str | None:
    """Writes ``<workdir>/skipped_images.txt``, the images of the run's folder left out when it
    was prepared (``data.skip_bad_images``), and returns its path; None (nothing written) when
    none was left out, or the data is not an image folder."""
    if data_cfg.get('source') != 'folder':
        return None
    builder = prepare(data_cfg)
    skipped = builder.skipped()
    if not skipped:
        return None
    path = os.path.join(workdir, SKIPPED_FILE)
    _write_list(path, f'images of {builder.root} left out of this run\'s data (data.skip_bad_images=True)',
                builder.root, skipped)
    logging.warning('%d images of %s were left out (data.skip_bad_images=True): listed in %s', len(skipped),
                    builder.root, path)
    return path


# source -> its prepare(data_cfg), for datasets of other layouts (registered by their modules)
OTHER_SOURCES: dict = {}
_PREPARED: dict[tuple[str, str, str], tfds.core.DatasetBuilder] = {}
_PREPARE_LOCK = threading.Lock()


def _dataset_key(data_cfg) -> tuple[str, str, str]:
    """What identifies a dataset: (source, absolute root or TFDS name, absolute data_dir)."""
    if data_cfg.source == 'folder':
        where = os.path.abspath(data_cfg.root) if data_cfg.root else ''
    else:
        where = data_cfg.name
    return data_cfg.source, where, os.path.abspath(_data_dir(data_cfg))


def prepare(data_cfg) -> tfds.core.DatasetBuilder:
    """Returns a prepared builder. An image folder is prepared once (array_record), then reused.

    A folder is checked before any heavy work (layout, splits); then every image is decoded
    once, before anything is written: images that cannot be used (empty, not an image,
    truncated / corrupt) refuse the folder, all named (the first 20 in the message), or with
    ``data.skip_bad_images`` are left out and listed in ``<builder.data_dir>/skipped_images.txt``.
    Prepared data are reused once verified: the folder is the one they were prepared from
    (paths, sizes, times, contents) and every prepared file has its recorded SHA-256; else the
    run is refused in one line naming the files (``data.reprepare=True`` prepares again).
    A TFDS dataset's shards are checked against its dataset_info.json.

    The work (scanning the folder, checking a TFDS dataset) runs once per process for each
    dataset (source, absolute root or name, data_dir); later calls return the same builder,
    so a folder changed during the run is noticed by the next run. A failure is not
    remembered (the next call tries again). ``prepare.cache_clear()`` forgets every dataset.
    """
    if data_cfg.source in OTHER_SOURCES:  # e.g. seg_data's 'seg_folder', registered by that module
        return OTHER_SOURCES[data_cfg.source](data_cfg)
    key = _dataset_key(data_cfg)
    with _PREPARE_LOCK:  # one preparation at a time; a second caller waits and then looks it up
        builder = _PREPARED.get(key)
        if builder is None:
            builder = _PREPARED[key] = _prepare(data_cfg)
    split = data_cfg.split
    if split not in builder.info.splits:
        raise DataError(f'data.split={split!r} is not in the dataset; available: {sorted(builder.info.splits)}')
    return builder


def _cache_clear() -> None:
    """Forgets the datasets prepared in this process: the next :func:`prepare` checks again."""
    with _PREPARE_LOCK:
        _PREPARED.clear()
        _FINGERPRINTS.clear()


prepare.cache_clear = _cache_clear


def _source(builder: tfds.core.DatasetBuilder, split: str):
    """Random-access source; the image stays encoded (decoded by the map functions)."""
    if split not in builder.info.splits:
        raise DataError(f'split {split!r} is not in the dataset; available: {sorted(builder.info.splits)}')
    return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def data_source(data_cfg, split: str):
    """``split`` of the dataset (prepared first, once per process) as a random-access source of
    dicts: ``image`` (the encoded bytes, decoded by the pipeline), ``label``, and (folders)
    ``file_name``."""
    return _source(prepare(data_cfg), split)


def num_examples(data_cfg, split: str | None = None) -> int:
    """Examples in ``split`` (default ``data_cfg.split``); prepares a folder on first use."""
    split = split or data_cfg.split
    info = prepare(data_cfg).info
    if split not in info.splits:
        raise DataError(f'split {split!r} is not in the dataset; available: {sorted(info.splits)}')
    return info.splits[split].num_examples


__all__ = ['IMAGE_EXTENSIONS', 'ImageFolder', 'get_builder', 'prepare', 'data_source', 'num_examples',
           'write_skipped']

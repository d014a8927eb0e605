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
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import re
import threading
from typing import NamedTuple

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

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


def _threaded(fn, items: list, chunk: int = 1024):
    """``fn(item)`` for every item, in order, in threads (PIL releases the GIL while decoding);
    chunked so that a million files do not make a million futures at once."""
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
        for start in range(0, len(items), chunk):
            yield from pool.map(fn, items[start:start + chunk])


STORE_AS_IS, RE_ENCODE = 'as is', 're-encode'


def _check_image(path: str) -> str:
    """Decodes the file once: :data:`STORE_AS_IS` (an RGB JPEG/PNG, stored as its bytes),
    :data:`RE_ENCODE` (another mode or format: stored as an RGB PNG), or why it cannot be used:
    ``empty (0 bytes)``, ``not an image (...)``, ``truncated or corrupt (...)``, ``unreadable (...)``."""
    try:
        if os.path.getsize(path) == 0:
            return 'empty (0 bytes)'
        with Image.open(path) as im:
            fmt, mode = im.format, im.mode
            im.load()
    except Image.UnidentifiedImageError:
        return 'not an image (PIL cannot identify it)'
    except (PermissionError, FileNotFoundError, IsADirectoryError) as e:
        return f'unreadable ({type(e).__name__}: {e.strerror})'
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for broken files
        first = (str(e).strip().splitlines() or [''])[0][:160]
        return f'truncated or corrupt ({type(e).__name__}: {first})'
    return STORE_AS_IS if mode == 'RGB' and fmt in ('JPEG', 'PNG') else RE_ENCODE


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
            found = dict(zip(rels, _threaded(_check_image, [os.path.join(self._root, r) for r in rels])))
            self._check = ImageCheck(
                total=len(rels), bad=[(r, why) for r, why in found.items() if why not in (STORE_AS_IS, RE_ENCODE)],
                re_encode=frozenset(r for r, how in found.items() if how == RE_ENCODE))
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

        for (label, name), image in zip(files, _threaded(encoded, files)):
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
    builder = get_builder(data_cfg)
    if data_cfg.source == 'folder':
        counts = _scan(builder.root)
        if not builder.is_prepared():
            _prepare_folder(builder, counts, data_cfg.get('skip_bad_images', False))
        else:
            stored = {s: builder.info.splits[s].num_examples if s in builder.info.splits else 0 for s in counts}
            skipped = _per_split(builder.skipped())
            if {s: stored[s] + skipped.get(s, 0) for s in counts} != counts:
                left_out = f', left out as bad {skipped}' if skipped else ''
                raise DataError(f'{builder.root} changed since it was prepared into {builder.data_dir} '
                                f'(images per split: now {counts}, prepared {stored}{left_out}). Delete '
                                f'{builder.data_dir} to prepare again.')
            if skipped:
                _write_skipped(builder)
                logging.warning('%s: %d bad images were left out when it was prepared (data.skip_bad_images); '
                                'they are listed in %s', builder.root, sum(skipped.values()),
                                os.path.join(builder.data_dir, SKIPPED_FILE))
    else:
        _check_tfds_prepared(builder, data_cfg)
    return builder


def _prepare_folder(builder: ImageFolder, counts: dict[str, int], skip_bad_images: bool) -> None:
    """Decodes every image, refuses (or, with ``skip_bad_images``, leaves out) the bad ones, then writes."""
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
    builder.download_and_prepare(file_format='array_record')
    if check.bad:
        path = _write_skipped(builder)
        logging.warning('%s: left out %d of %d images that cannot be used (data.skip_bad_images=True); the list, '
                        'with the reasons, is in %s', builder.root, len(check.bad), check.total, path)


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
    Prepared data is reused as long as the number of images per split (those left out
    included) is unchanged; delete ``builder.data_dir`` to prepare again after other edits.

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

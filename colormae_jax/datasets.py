"""The datasets: where examples come from, prepared once per run, read by index.

Two sources, both read as TFDS array_record data sources (random access, no TensorFlow):
  * ``source='folder'``: ``<root>/<split>/<class>/*.{jpg,jpeg,png}`` (any case), prepared once
    into array_record under ``data_dir`` by :class:`ImageFolder`;
  * ``source='tfds'``: any TFDS dataset already prepared as array_record (``imagenet2012``, ...),
    with an ``image`` and a ``label`` feature.

:func:`prepare` checks and (for a folder, the first time) prepares a dataset, once per process:
later calls for the same dataset are a lookup. :func:`data_source` is a split's random-access
source (images still encoded), :func:`num_examples` its size. The grain pipeline that reads
these sources is :mod:`colormae_jax.data`.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import re
import threading

import numpy as np
import tensorflow_datasets as tfds
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


def _read_checked(path: str) -> bytes:
    """The file's bytes when it decodes as an RGB JPEG/PNG, else the image re-encoded as an RGB PNG.

    Decodes every image once so that a broken file fails preparation with its name.
    """
    try:
        with open(path, 'rb') as f:
            raw = f.read()
        with Image.open(io.BytesIO(raw)) as im:
            im.load()
            if im.mode == 'RGB' and im.format in ('JPEG', 'PNG'):
                return raw
            out = io.BytesIO()  # grayscale, palette, RGBA, CMYK, other formats: store RGB
            im.convert('RGB').save(out, format='PNG')
            return out.getvalue()
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for broken files
        raise DataError(f'cannot read image {path}: {type(e).__name__}: {e}. Remove or replace the file, then '
                        f'prepare again (preparation restarts from scratch).') from None


class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """``<root>/<split>/<class>/*.jpg`` as a TFDS dataset (array_record), without TensorFlow.

    Prepared under ``<data_dir>/image_folder/<basename>_<hash of the absolute root>/1.0.0``.
    Features: ``image`` (uint8, (None, None, 3)), ``label`` (class names = sorted class folders
    of all splits), ``file_name`` (``<class>/<file>``). Not registered with TFDS by name
    (no clash with ``tfds.folder_dataset``); ``tfds.builder('image_folder/<config>', data_dir=...)``
    still reads a prepared folder from its files.
    """
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, root: str, data_dir: str | None = None, **kwargs):
        kwargs.pop('config', None)  # always derived from the root
        kwargs.pop('file_format', None)
        self._root = os.path.abspath(root)
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
                                     supervised_keys=('image', 'label'))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {s: self._generate_examples(os.path.join(self._root, s)) for s in _split_names(self._root)}

    def _generate_examples(self, split_dir: str):
        files = _list_split(split_dir)
        chunk = 512
        # Decoding (to validate) runs in threads: PIL releases the GIL while decoding.
        with concurrent.futures.ThreadPoolExecutor(max(1, min(16, os.cpu_count() or 1))) as pool:
            for start in range(0, len(files), chunk):
                part = files[start:start + chunk]
                paths = [os.path.join(split_dir, c, f) for c, f in part]
                for (label, name), image in zip(part, pool.map(_read_checked, paths)):
                    key = f'{label}/{name}'
                    yield key, {'image': image, 'label': label, 'file_name': key}


# ------------------------------------------------------------------------------ builders

def get_builder(data_cfg) -> tfds.core.DatasetBuilder:
    """The TFDS builder for ``data_cfg`` (nothing is prepared or read here)."""
    data_dir = _data_dir(data_cfg)
    if data_cfg.source == 'folder':
        root = data_cfg.root
        if not root or not os.path.isdir(root):
            raise DataError(f'data.root={root!r} is not a directory. Point it at a folder laid out as '
                            f'<root>/<split>/<class>/*.jpg, e.g. --config.data.root=../shared/data/cifar10')
        return ImageFolder(root=root, data_dir=data_dir)
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
            builder.download_and_prepare(file_format='array_record')
        else:
            stored = {s: builder.info.splits[s].num_examples if s in builder.info.splits else 0 for s in counts}
            if stored != counts:
                raise DataError(f'{builder.root} changed since it was prepared into {builder.data_dir} '
                                f'(images per split: now {counts}, prepared {stored}). Delete {builder.data_dir} '
                                f'to prepare again.')
    else:
        _check_tfds_prepared(builder, data_cfg)
    return builder


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

    A folder is checked before any heavy work (layout, splits); a broken image stops the
    preparation with its name. Prepared data is reused as long as the number of images per
    split is unchanged; delete ``builder.data_dir`` to prepare again after other edits.

    The work (scanning the folder, checking a TFDS dataset) runs once per process for each
    dataset (source, absolute root or name, data_dir); later calls return the same builder,
    so a folder changed during the run is noticed by the next run. A failure is not
    remembered (the next call tries again). ``prepare.cache_clear()`` forgets every dataset.
    """
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


__all__ = ['IMAGE_EXTENSIONS', 'ImageFolder', 'get_builder', 'prepare', 'data_source', 'num_examples']

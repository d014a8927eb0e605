"""Segmentation data: a folder of images and PNG label maps, prepared once into array_record
(a TFDS builder, no TensorFlow) and read with grain; mmseg's ADE20K pipelines.

Layout (ADE20K's ``ADEChallengeData2016``, and any other dataset laid out the same way)::

    <root>/images/<split>/<name>.jpg        (or .jpeg / .png)
    <root>/annotations/<split>/<name>.png   (one channel: the class of each pixel; 255 = ignore)

Every image and label map is decoded once when the folder is prepared: a label map whose size
differs from its image, or with values above the class count that are not 255, refuses the folder
with the file named (:class:`~colormae_jax.errors.DataError`, one line).

Training (:class:`SegTrainTransform`, mmseg's ``train_pipeline``): ``reduce_zero_label``,
``RandomResize(scale=(2048, 512), ratio_range=(0.5, 2.0), keep_ratio=True)``,
``RandomCrop(512, cat_max_ratio=0.75)``, ``RandomFlip(0.5)``, ``PhotoMetricDistortion``, then
padding to 512 x 512 (label 255; the image is zeroed after normalisation on the device, as
``SegDataPreProcessor`` pads the normalised image with 0). Evaluation (:func:`eval_examples`):
``Resize(scale=(2048, 512), keep_ratio=True)``, the label map at its own size. Resizing follows
OpenCV's (mmcv's backend) bilinear in fixed point and nearest ``floor(i * scale)``; the HSV
conversions follow OpenCV's 8-bit ones (docs/segmentation.md).
"""
from __future__ import annotations

import io
import os
import threading

import grain
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from colormae_jax.data import pipeline as data_lib, sources as datasets
from colormae_jax.errors import DataError

IGNORE = 255
SOURCE = 'seg_folder'


# ------------------------------------------------------------------------------ the folder

def _stem(name: str) -> str:
    return os.path.splitext(name)[0]


def list_pairs(root: str, split: str) -> list[tuple[str, str]]:
    """(image path, label path) of ``split``, sorted by name; refuses a missing folder or label map."""
    img_dir, ann_root = os.path.join(root, 'images', split), os.path.join(root, 'annotations')
    if not os.path.isdir(img_dir):
        raise DataError(f'{img_dir}: missing; a segmentation folder holds images/<split>/*.jpg and '
                        f'annotations/<split>/*.png (e.g. ADEChallengeData2016/images/training); set data.root to it')
    if not os.path.isdir(ann_root):
        raise DataError(f'{ann_root}: missing annotations folder; put the label maps in '
                        f'{ann_root}/<split>/<name>.png next to images/<split>/<name>.jpg')
    ann_dir = os.path.join(ann_root, split)
    if not os.path.isdir(ann_dir):
        raise DataError(f'{ann_dir}: missing annotations folder for split {split!r}; put one <name>.png per image of '
                        f'{img_dir} there')
    names = sorted(f for f in os.listdir(img_dir) if not f.startswith('.') and f.lower().endswith(
        datasets.IMAGE_EXTENSIONS))
    if not names:
        raise DataError(f'{img_dir}: no images ({"/".join(datasets.IMAGE_EXTENSIONS)}); add them or fix data.root')
    labels = {_stem(f): f for f in os.listdir(ann_dir) if f.lower().endswith('.png')}
    out = []
    for f in names:
        if _stem(f) not in labels:
            raise DataError(f'{os.path.join(ann_dir, _stem(f) + ".png")}: missing label map for '
                            f'{os.path.join(img_dir, f)}; add it or remove the image')
        out.append((os.path.join(img_dir, f), os.path.join(ann_dir, labels[_stem(f)])))
    return out


def read_label(path: str) -> np.ndarray:
    """A label map as uint8 [H, W] (mode L or P: the stored indices)."""
    with Image.open(path) as im:
        if im.mode not in ('L', 'P'):
            raise DataError(f'{path}: label map of mode {im.mode}; save it as a one-channel PNG (mode L or P) of class '
                            f'indices')
        return np.asarray(im, np.uint8)


def check_pair(image_path: str, label_path: str, num_classes: int, reduce_zero_label: bool) -> None:
    """Refuses a label map whose size differs from its image, or with a value above the class
    count that is not 255 (with ``reduce_zero_label`` the stored values are 0..num_classes)."""
    try:
        with Image.open(image_path) as im:
            size = im.size
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        raise DataError(f'{image_path}: cannot be read as an image ({type(e).__name__}); replace or remove '
                        f'it') from None
    try:
        lab = read_label(label_path)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DataError(f'{label_path}: cannot be read as a PNG ({type(e).__name__}); replace it') from None
    if (lab.shape[1], lab.shape[0]) != size:
        raise DataError(f'{label_path}: label map is {lab.shape[1]}x{lab.shape[0]} but its image {image_path} is '
                        f'{size[0]}x{size[1]}; give every label map the size of its image')
    top = num_classes if reduce_zero_label else num_classes - 1
    bad = lab[(lab > top) & (lab != IGNORE)]
    if bad.size:
        raise DataError(f'{label_path}: label value {int(bad.max())} is above the {num_classes} classes (values '
                        f'0..{top}{", 0 = ignore" if reduce_zero_label else ""}, or 255 = ignore); fix the map or set '
                        f'seg.num_classes')


def _encoded_image(path: str) -> bytes:
    with Image.open(path) as im:
        if im.mode == 'RGB' and im.format in ('JPEG', 'PNG'):
            with open(path, 'rb') as f:
                return f.read()
        out = io.BytesIO()
        im.convert('RGB').save(out, format='PNG')
        return out.getvalue()


def _encoded_label(path: str) -> bytes:
    out = io.BytesIO()
    Image.fromarray(read_label(path)).save(out, format='PNG')
    return out.getvalue()


class SegFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A segmentation folder as a TFDS dataset (array_record), without TensorFlow, under
    ``<data_dir>/seg_folder/<basename>_<hash of the root>/1.0.0``. Features: ``image`` (RGB),
    ``label`` (one channel PNG, the stored values), ``file_name``."""
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, root: str, splits: tuple[str, ...], num_classes: int, reduce_zero_label: bool,
                 data_dir: str | None = None, **kwargs):
        kwargs.pop('config', None)
        kwargs.pop('file_format', None)
        self._root, self._splits = os.path.abspath(root), tuple(splits)
        self._num_classes, self._reduce = int(num_classes), bool(reduce_zero_label)
        config = tfds.core.BuilderConfig(name=datasets._folder_config_name(root), description=f'seg folder {root}')
        super().__init__(config=config, data_dir=data_dir, file_format='array_record', **kwargs)

    def __getstate__(self):
        return {'_original_state': {'root': self._root, 'splits': self._splits, 'num_classes': self._num_classes,
                                    'reduce_zero_label': self._reduce,
                                    'data_dir': self._original_state['data_dir']}}

    def _info(self) -> tfds.core.DatasetInfo:
        features = tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
            'label': tfds.features.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format='png'),
            'file_name': tfds.features.Text(),
        })
        return tfds.core.DatasetInfo(builder=self, description=f'Segmentation folder {self._root}', features=features,
                                     metadata=tfds.core.MetadataDict())

    def _split_generators(self, dl_manager):
        del dl_manager
        pairs = {s: list_pairs(self._root, s) for s in self._splits}
        items = [p for s in self._splits for p in pairs[s]]
        logging.info('Checking the %d image / label pairs of %s ...', len(items), self._root)
        for _ in datasets._threaded(lambda p: check_pair(*p, self._num_classes, self._reduce), items):
            pass
        return {s: self._generate_examples(pairs[s]) for s in self._splits}

    def _generate_examples(self, pairs):
        def encoded(p):
            return _encoded_image(p[0]), _encoded_label(p[1])

        for (img, _), (image, label) in zip(pairs, datasets._threaded(encoded, pairs)):
            name = os.path.basename(img)
            yield name, {'image': image, 'label': label, 'file_name': name}


_PREPARED: dict[tuple, SegFolder] = {}
_LOCK = threading.Lock()


def prepare(data_cfg) -> SegFolder:
    """The prepared builder of ``data_cfg`` (``source='seg_folder'``): checked and written once,
    then reused while the number of pairs per split is unchanged (delete the prepared folder to
    prepare again after other edits)."""
    root = data_cfg.root
    if not root or not os.path.isdir(root):
        raise DataError(f'data.root={root!r}: not a directory; point it at a segmentation folder (images/<split>, '
                        f'annotations/<split>), e.g. .../ADEChallengeData2016')
    splits = tuple(dict.fromkeys([data_cfg.split, data_cfg.eval_split]))
    key = (os.path.abspath(root), os.path.abspath(datasets._data_dir(data_cfg)), splits, int(data_cfg.num_classes),
           bool(data_cfg.reduce_zero_label))
    with _LOCK:
        if key in _PREPARED:
            return _PREPARED[key]
        counts = {s: len(list_pairs(root, s)) for s in splits}
        b = SegFolder(root=root, splits=splits, num_classes=data_cfg.num_classes,
                      reduce_zero_label=data_cfg.reduce_zero_label, data_dir=datasets._data_dir(data_cfg))
        if not b.is_prepared():
            b.download_and_prepare(file_format='array_record')
        else:
            stored = {s: b.info.splits[s].num_examples if s in b.info.splits else 0 for s in splits}
            if stored != counts:
                raise DataError(f'{b.data_dir}: prepared from {root} with {stored} pairs per split, which now has '
                                f'{counts}; delete {b.data_dir} to prepare again')
        _PREPARED[key] = b
        return b


prepare.cache_clear = _PREPARED.clear


def data_source(data_cfg, split: str):
    """Random-access source of ``split``: ``image`` and ``label`` still encoded, ``file_name``."""
    b = prepare(data_cfg)
    return b.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()})


def decode_label(encoded) -> np.ndarray:
    with Image.open(io.BytesIO(bytes(encoded))) as im:
        return np.asarray(im, np.uint8).reshape(im.size[1], im.size[0])


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """mmseg's ``LoadAnnotations(reduce_zero_label=True)``: 0 -> 255 (ignore), v -> v - 1, 255 stays."""
    out = label.astype(np.int32) - 1
    out[label == 0] = IGNORE
    out[label == IGNORE] = IGNORE
    return out.astype(np.uint8)


# ------------------------------------------------------------------------------ OpenCV's resizes

def rescale_size(w: int, h: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmcv's ``rescale_size`` with a (long, short) bound, keeping the aspect: (new w, new h)."""
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(w * f + 0.5), int(h * f + 0.5)


def _linear_coeffs(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR taps and 11-bit fixed-point weights along one axis."""
    scale = src / dst
    f = (np.arange(dst) + 0.5) * scale - 0.5
    s = np.floor(f).astype(np.int64)
    f = (f - s).astype(np.float32)
    f[s < 0], s[s < 0] = 0, 0
    hi = s >= src - 1
    f[hi], s[hi] = 0, src - 1
    c0 = np.round((1.0 - f) * 2048).astype(np.int64)
    return s, np.minimum(s + 1, src - 1), np.stack([c0, 2048 - c0])


def resize_bilinear_u8(img: np.ndarray, w: int, h: int) -> np.ndarray:
    """``cv2.resize(img, (w, h), interpolation=INTER_LINEAR)`` for uint8 [H, W, C]: horizontal then
    vertical taps with 11-bit weights, rounded once at the end."""
    H, W = img.shape[:2]
    if (H, W) == (h, w):
        return img
    x0, x1, cx = _linear_coeffs(W, w)
    y0, y1, cy = _linear_coeffs(H, h)
    src = img.astype(np.int64)
    rows = src[:, x0] * cx[0][None, :, None] + src[:, x1] * cx[1][None, :, None]
    out = rows[y0] * cy[0][:, None, None] + rows[y1] * cy[1][:, None, None]
    return np.clip((out + (1 << 21)) >> 22, 0, 255).astype(np.uint8)


def resize_nearest(label: np.ndarray, w: int, h: int) -> np.ndarray:
    """``cv2.resize(..., INTER_NEAREST)``: source index ``floor(i * src / dst)``."""
    H, W = label.shape[:2]
    if (H, W) == (h, w):
        return label
    ys = np.minimum(np.floor(np.arange(h) * (H / h)).astype(np.int64), H - 1)
    xs = np.minimum(np.floor(np.arange(w) * (W / w)).astype(np.int64), W - 1)
    return label[ys][:, xs]


# ------------------------------------------------------------------------------ OpenCV's 8-bit HSV

def rgb_to_hsv_u8(img: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(RGB2HSV)`` on uint8: H in [0, 180), S and V in [0, 255], OpenCV's fixed point."""
    rgb = img.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(-1)
    diff = v - rgb.min(-1)
    with np.errstate(divide='ignore'):
        sdiv = np.where(v > 0, np.round((255 << 12) / np.maximum(v, 1)), 0).astype(np.int64)
        hdiv = np.where(diff > 0, np.round((180 << 12) / (6.0 * np.maximum(diff, 1))), 0).astype(np.int64)
    s = (diff * sdiv + (1 << 11)) >> 12
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv + (1 << 11)) >> 12
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], -1).astype(np.uint8)


_SECTORS = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])  # OpenCV's (b, g, r) taps


def hsv_to_rgb_u8(hsv: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(HSV2RGB)`` on uint8 (through float, as OpenCV)."""
    h = hsv[..., 0].astype(np.float32) * np.float32(6.0 / 180)
    s = hsv[..., 1].astype(np.float32) / 255
    v = hsv[..., 2].astype(np.float32) / 255
    h = np.where(h >= 6, h - 6, h)
    sector = np.floor(h).astype(np.int64)
    f = h - sector
    bad = (sector < 0) | (sector >= 6)
    sector, f = np.where(bad, 0, sector), np.where(bad, 0, f)
    tab = np.stack([v, v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))], -1)
    bgr = np.take_along_axis(tab, _SECTORS[sector], -1)
    bgr = np.where((s == 0)[..., None], v[..., None], bgr)
    return np.clip(np.rint(bgr[..., ::-1] * 255), 0, 255).astype(np.uint8)


def photometric_distortion(img: np.ndarray, rng: np.random.Generator, brightness: int = 32,
                           contrast=(0.5, 1.5), saturation=(0.5, 1.5), hue: int = 18) -> np.ndarray:
    """mmseg's ``PhotoMetricDistortion``: brightness, contrast (first or last), saturation and hue,
    each with probability 1/2, truncating to uint8 after each step."""
    def convert(x, alpha=1.0, beta=0.0):
        return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    if rng.integers(2):
        img = convert(img, beta=rng.uniform(-brightness, brightness))
    mode = rng.integers(2)
    if mode == 1 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    if rng.integers(2):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(*saturation))
        img = hsv_to_rgb_u8(hsv)
    if rng.integers(2):
        hsv = rgb_to_hsv_u8(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-hue, hue)) % 180
        img = hsv_to_rgb_u8(hsv)
    if mode == 0 and rng.integers(2):
        img = convert(img, alpha=rng.uniform(*contrast))
    return img


# ------------------------------------------------------------------------------ crops

def crop_box(label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75,
             tries: int = 10) -> tuple[int, int, int, int]:
    """mmseg's ``RandomCrop.crop_bbox``: a random (y1, y2, x1, x2); with ``cat_max_ratio < 1``,
    drawn again (up to ``tries`` times) while the crop holds one class only or its largest class
    covers ``cat_max_ratio`` or more of the labelled pixels."""
    def draw():
        mh, mw = max(label.shape[0] - crop, 0), max(label.shape[1] - crop, 0)
        y, x = int(rng.integers(0, mh + 1)), int(rng.integers(0, mw + 1))
        return y, y + crop, x, x + crop

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y1, y2, x1, x2 = box
            labels, cnt = np.unique(label[y1:y2, x1:x2], return_counts=True)
            cnt = cnt[labels != IGNORE]
            if len(cnt) > 1 and np.max(cnt) / np.sum(cnt) < cat_max_ratio:
                break
            box = draw()
    return box


class SegTrainTransform(grain.transforms.RandomMap):
    """mmseg's ADE20K ``train_pipeline`` on one example -> ``image`` uint8 [S, S, 3] (0 where
    padded), ``label`` uint8 [S, S] (255 where padded), ``hw`` int32 [2] (the unpadded size)."""

    def __init__(self, crop: int, scale=(2048, 512), ratio_range=(0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True, reduce_zero: bool = True):
        self.crop, self.scale, self.ratio_range = int(crop), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob = float(cat_max_ratio), float(flip_prob)
        self.photometric, self.reduce_zero = bool(photometric), bool(reduce_zero)

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        img = np.asarray(data_lib.decode_image(element['image']), np.uint8)
        lab = decode_label(element['label'])
        if self.reduce_zero:
            lab = reduce_zero_label(lab)
        lo, hi = self.ratio_range
        r = rng.random() * (hi - lo) + lo
        w, h = rescale_size(img.shape[1], img.shape[0], (int(self.scale[0] * r), int(self.scale[1] * r)))
        img, lab = resize_bilinear_u8(img, w, h), resize_nearest(lab, w, h)
        y1, y2, x1, x2 = crop_box(lab, self.crop, rng, self.cat_max_ratio)
        img, lab = img[y1:y2, x1:x2], lab[y1:y2, x1:x2]
        if rng.random() < self.flip_prob:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.photometric:
            img = photometric_distortion(np.ascontiguousarray(img), rng)
        s = self.crop
        hh, ww = img.shape[:2]
        out_img = np.zeros((s, s, 3), np.uint8)
        out_lab = np.full((s, s), IGNORE, np.uint8)
        out_img[:hh, :ww], out_lab[:hh, :ww] = img, lab
        return {'image': out_img, 'label': out_lab, 'hw': np.asarray([hh, ww], np.int32)}


def make_train_iterator(data_cfg, seg_cfg, *, global_batch_size: int, seed: int, process_index: int = 0,
                        process_count: int = 1) -> data_lib.TrainIterator:
    """Checkpointable iterator of this process's training batches (``image``, ``label``, ``hw``),
    endless, a new order every epoch; state = the batch count (:class:`data.TrainIterator`)."""
    batch = global_batch_size // process_count
    source = data_source(data_cfg, data_cfg.split)
    n = len(source)
    per = n // process_count
    if per < batch:
        raise DataError(f'{data_cfg.root}: split {data_cfg.split!r} has {n} images, fewer than one batch of {batch} '
                        f'per process; lower batch_size')
    ds = grain.MapDataset.source(source)[process_index:per * process_count:process_count]
    ds = ds.shuffle(seed=data_lib._derived_seed(seed, 0)).repeat(None)
    t = SegTrainTransform(seg_cfg.crop_size, tuple(seg_cfg.scale), tuple(seg_cfg.ratio_range), seg_cfg.cat_max_ratio,
                          0.5 if data_cfg.hflip else 0.0, seg_cfg.photometric, data_cfg.reduce_zero_label)
    ds = ds.random_map(t, seed=data_lib._derived_seed(seed, 1, process_index)).batch(batch, drop_remainder=True)
    mp = None
    if int(data_cfg.num_workers) > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        mp = grain.MultiprocessingOptions(num_workers=int(data_cfg.num_workers),
                                          per_worker_buffer_size=max(1, int(data_cfg.prefetch_buffer)))
    fingerprint = dict(seed=int(seed), examples=n, batch=batch, process_index=process_index,
                       process_count=process_count)
    return data_lib.TrainIterator(ds, data_lib._read_options(data_cfg), mp, fingerprint)


def eval_examples(data_cfg, seg_cfg, *, split: str, process_index: int = 0, process_count: int = 1, limit: int = 0):
    """This process's share (examples p, p + n, ...) of ``split``, in order: (file name, image
    uint8 resized as mmseg's ``test_pipeline``, label map at the original size with
    ``reduce_zero_label`` applied)."""
    source = data_source(data_cfg, split)
    used = min(len(source), limit) if limit else len(source)
    for i in range(process_index, used, process_count):
        e = source[i]
        img = np.asarray(data_lib.decode_image(e['image']), np.uint8)
        lab = decode_label(e['label'])
        if data_cfg.reduce_zero_label:
            lab = reduce_zero_label(lab)
        w, h = rescale_size(img.shape[1], img.shape[0], tuple(seg_cfg.scale))
        name = e['file_name']
        yield (name.decode() if isinstance(name, bytes) else str(name)), resize_bilinear_u8(img, w, h), lab


datasets.OTHER_SOURCES[SOURCE] = prepare  # main's prepare_data_once (process 0 first) goes through datasets.prepare

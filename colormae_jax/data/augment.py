"""Fine-tuning augmentations of the MAE recipe (timm's ``create_transform`` and ``Mixup``).

MAE fine-tunes on ``RandomResizedCrop(scale 0.08-1, bicubic) -> hflip -> RandAugment
(rand-m9-mstd0.5-inc1) -> normalise -> RandomErasing(0.25, 'pixel')`` per image, then
Mixup / CutMix with label smoothing on the batch. Here:

* on the host, a grain transform, :class:`RandAugmentCropFlip`: crop, flip and RandAugment,
  emitting uint8 images with the keys of :class:`colormae_jax.data.pipeline.RandomResizedCropFlip`;
* on the device, jittable functions of an explicit ``jax.random`` key, in this order after
  :func:`colormae_jax.data.pipeline.normalize`: :func:`random_erasing`, then :func:`mixup_cutmix`
  (which smooths the labels), and :func:`soft_cross_entropy` as the loss.

RandAugment: timm's ``rand-m9-mstd0.5-inc1`` with MAE's settings. ``num_ops`` ops drawn
uniformly with replacement from all 15 ops of timm's ``_RAND_INCREASING_TRANSFORMS``:
AutoContrast, Equalize, Invert, Rotate, PosterizeIncreasing, SolarizeIncreasing,
SolarizeAdd, ColorIncreasing, ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing,
ShearX, ShearY, TranslateXRel, TranslateYRel; each applied with probability 0.5 at a
magnitude ~ N(magnitude, magnitude_std) clipped to [0, 10]; signed ops negated with
probability 0.5; bicubic resampling; areas moved in from outside filled with the mean
colour (124, 116, 104). Left out: timm's other op sets (the non-increasing Posterize,
Solarize, Color, Contrast, Brightness, Sharpness of the default ``rand-`` set, absolute
TranslateX/Y, and the AutoAugment-only ops), op weights (``w``), a uniform magnitude
(``mstd`` inf), ``mmax`` and random interpolation.
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image, ImageEnhance, ImageOps

from colormae_jax.data import pipeline as data

# ------------------------------------------------------------------------------ on the device


def smooth_labels(labels: jax.Array, num_classes: int, smoothing: float) -> jax.Array:
    """Integer labels [B] -> float32 targets [B, K]: ``1 - smoothing + smoothing / K`` on the
    label, ``smoothing / K`` elsewhere (timm's ``mixup_target``; ``optax.smooth_labels`` of
    the one-hot labels)."""
    return optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), smoothing)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``, in float32 (timm's
    ``SoftTargetCrossEntropy``)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32)).mean()


def _box_mask(top: jax.Array, bottom: jax.Array, left: jax.Array, right: jax.Array, h: int, w: int) -> jax.Array:
    """Boolean [..., h, w]: rows in [top, bottom) and columns in [left, right) (broadcast)."""
    rows = jnp.arange(h)
    cols = jnp.arange(w)
    in_rows = (rows >= top[..., None]) & (rows < bottom[..., None])
    in_cols = (cols >= left[..., None]) & (cols < right[..., None])
    return in_rows[..., :, None] & in_cols[..., None, :]


# Draws are made flat and reshaped: XLA:CPU compiles multi-dimensional draws of the
# (partitionable) threefry PRNG several times slower, for the same distribution.

def _uniform(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    return jax.random.uniform(key, (math.prod(shape),)).reshape(shape)


def _normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    return jax.random.normal(key, (math.prod(shape),), dtype).reshape(shape)


@functools.partial(jax.jit, static_argnames=('mixup_alpha', 'cutmix_alpha', 'switch_prob', 'prob',
                                             'label_smoothing', 'num_classes'))
def mixup_cutmix(rng: jax.Array, images: jax.Array, labels: jax.Array, *, mixup_alpha: float = 0.8,
                 cutmix_alpha: float = 1.0, switch_prob: float = 0.5, prob: float = 1.0,
                 label_smoothing: float = 0.1, num_classes: int | None = None) -> tuple[jax.Array, jax.Array]:
    """timm's ``Mixup`` in 'batch' mode: one ``lam`` and one choice for the whole batch.

    images: float [B, H, W, C] (normalised); labels: int [B] (then ``num_classes`` is needed)
    or one-hot / soft [B, K]. With probability ``prob`` the batch is mixed with its reverse
    ``images[::-1]``: by CutMix (probability ``switch_prob`` when both alphas are positive,
    ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``; a box of ``int(H sqrt(1 - lam))`` x
    ``int(W sqrt(1 - lam))`` around a uniform centre, clipped to the image, is pasted from the
    reversed batch and ``lam`` becomes the unpasted fraction of the image), else by Mixup
    (``lam ~ Beta(mixup_alpha, mixup_alpha)``, ``lam * x + (1 - lam) * x[::-1]``). Returns the
    images (same dtype) and the float32 targets ``lam * smooth(y) + (1 - lam) * smooth(y[::-1])``
    (rows sum to 1). The hyper-parameters are static.
    """
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f'mixup_cutmix needs float (normalised) images, got {images.dtype}')
    if labels.ndim == 1:
        if num_classes is None:
            raise ValueError('integer labels need num_classes')
        targets = smooth_labels(labels, num_classes, label_smoothing)
    else:
        targets = optax.smooth_labels(labels.astype(jnp.float32), label_smoothing)
    if (mixup_alpha <= 0.0 and cutmix_alpha <= 0.0) or prob <= 0.0:
        return images, targets
    k_u, k_beta, k_box = jax.random.split(rng, 3)
    u = jax.random.uniform(k_u, (2,))
    apply = u[0] < prob
    if mixup_alpha > 0.0 and cutmix_alpha > 0.0:
        use_cutmix = u[1] < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0.0)
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    lam = jax.random.beta(k_beta, alpha, alpha)
    lam = jnp.where(apply, lam, 1.0)
    use_cutmix = apply & use_cutmix

    _, h, w, _ = images.shape
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (h * ratio).astype(jnp.int32), (w * ratio).astype(jnp.int32)
    cy, cx = jax.random.randint(k_box, (2,), 0, jnp.array([h, w]))
    top, bottom = jnp.clip(cy - cut_h // 2, 0, h), jnp.clip(cy + cut_h // 2, 0, h)
    left, right = jnp.clip(cx - cut_w // 2, 0, w), jnp.clip(cx + cut_w // 2, 0, w)
    lam_cut = 1.0 - ((bottom - top) * (right - left)).astype(jnp.float32) / (h * w)
    box = _box_mask(top, bottom, left, right, h, w)

    flipped = images[::-1]
    mixed = (images * lam + flipped * (1.0 - lam)).astype(images.dtype)
    cut = jnp.where(box[None, :, :, None], flipped, images)
    out = jnp.where(use_cutmix, cut, jnp.where(apply, mixed, images))
    lam = jnp.where(use_cutmix, lam_cut, lam)
    return out, lam * targets + (1.0 - lam) * targets[::-1]


ERASE_MODES = ('pixel', 'rand', 'const')


@functools.partial(jax.jit, static_argnames=('mode', 'min_area', 'max_area', 'min_aspect'))
def random_erasing(rng: jax.Array, images: jax.Array, *, prob: float | jax.Array = 0.25, mode: str = 'pixel',
                   min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> jax.Array:
    """timm's ``RandomErasing`` (one box per image, ``max_count=1``), vectorised over the batch.

    images: float [B, H, W, C], normalised. Each image, with probability ``prob``, gets one box
    replaced by standard normal noise per pixel (``mode='pixel'``), per channel (``'rand'``) or
    zeros (``'const'``). The box: up to 10 tries of an area fraction ~ U(min_area, max_area)
    and a log-uniform aspect ratio in (min_aspect, 1 / min_aspect), sides rounded, the first
    try strictly smaller than the image wins (none: no erasing), at a uniform position.
    The hyper-parameters other than ``prob`` are static.
    """
    if mode not in ERASE_MODES:
        raise ValueError(f'mode={mode!r}; valid: {ERASE_MODES}')
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f'random_erasing needs float (normalised) images, got {images.dtype}')
    b, h, w, ch = images.shape
    tries = 10
    k_u, k_noise = jax.random.split(rng)
    u = _uniform(k_u, (b, 2 * tries + 3))
    apply = u[:, 0] < prob
    target = (min_area + (max_area - min_area) * u[:, 1:1 + tries]) * (h * w)
    log_lo, log_hi = math.log(min_aspect), math.log(1.0 / min_aspect)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u[:, 1 + tries:1 + 2 * tries])
    eh = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
    ew = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
    fits = (eh < h) & (ew < w)
    first = jnp.argmax(fits, axis=1)[:, None]
    eh = jnp.take_along_axis(eh, first, 1)[:, 0]
    ew = jnp.take_along_axis(ew, first, 1)[:, 0]
    erase = apply & fits.any(1)
    top = jnp.minimum((u[:, -2] * (h - eh + 1)).astype(jnp.int32), h - eh)
    left = jnp.minimum((u[:, -1] * (w - ew + 1)).astype(jnp.int32), w - ew)
    mask = _box_mask(top, top + eh, left, left + ew, h, w) & erase[:, None, None]
    if mode == 'pixel':
        fill = _normal(k_noise, images.shape, images.dtype)
    elif mode == 'rand':
        fill = _normal(k_noise, (b, 1, 1, ch), images.dtype)
    else:
        fill = jnp.zeros((), images.dtype)
    return jnp.where(mask[..., None], fill, images)


# ------------------------------------------------------------------------------ on the host

FILL = tuple(int(round(m)) for m in data.MAE_MEAN)  # timm's img_mean: (124, 116, 104)
_RESAMPLE = Image.BICUBIC
_MAX_LEVEL = 10.0
_TRANSLATE_PCT = 0.45


def _signed(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, matrix: tuple, fill: tuple) -> Image.Image:
    return img.transform(img.size, Image.AFFINE, matrix, resample=_RESAMPLE, fillcolor=fill)


def _enhance(cls) -> Callable:
    """timm's ``*Increasing`` enhancements: factor ``max(0.1, 1 +- 0.9 * level)``."""
    def op(img, level, rng, fill):
        return cls(img).enhance(max(0.1, 1.0 + _signed(0.9 * level, rng)))
    return op


def _posterize(img, level, rng, fill):
    bits = max(1, 4 - int(level * 4))  # newer PIL refuses 0 bits (timm passes 0 at the top magnitude)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize_add(img, level, rng, fill):
    add = int(level * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


# name -> op(img, level in [0, 1], rng, fill colour); timm's _RAND_INCREASING_TRANSFORMS.
RAND_AUGMENT_OPS: dict[str, Callable[[Image.Image, float, np.random.Generator, tuple], Image.Image]] = {
    'AutoContrast': lambda img, level, rng, fill: ImageOps.autocontrast(img),
    'Equalize': lambda img, level, rng, fill: ImageOps.equalize(img),
    'Invert': lambda img, level, rng, fill: ImageOps.invert(img),
    'Rotate': lambda img, level, rng, fill: img.rotate(_signed(30.0 * level, rng), resample=_RESAMPLE,
                                                       fillcolor=fill),
    'PosterizeIncreasing': _posterize,
    'SolarizeIncreasing': lambda img, level, rng, fill: ImageOps.solarize(img, 256 - int(level * 256)),
    'SolarizeAdd': _solarize_add,
    'ColorIncreasing': _enhance(ImageEnhance.Color),
    'ContrastIncreasing': _enhance(ImageEnhance.Contrast),
    'BrightnessIncreasing': _enhance(ImageEnhance.Brightness),
    'SharpnessIncreasing': _enhance(ImageEnhance.Sharpness),
    'ShearX': lambda img, level, rng, fill: _affine(img, (1, _signed(0.3 * level, rng), 0, 0, 1, 0), fill),
    'ShearY': lambda img, level, rng, fill: _affine(img, (1, 0, 0, _signed(0.3 * level, rng), 1, 0), fill),
    'TranslateXRel': lambda img, level, rng, fill: _affine(
        img, (1, 0, _signed(_TRANSLATE_PCT * level, rng) * img.size[0], 0, 1, 0), fill),
    'TranslateYRel': lambda img, level, rng, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(_TRANSLATE_PCT * level, rng) * img.size[1]), fill),
}


def rand_augment(img: Image.Image, rng: np.random.Generator, *, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, apply_prob: float = 0.5, fill: tuple = FILL) -> Image.Image:
    """timm's ``RandAugment`` on an RGB image: ``num_ops`` ops of :data:`RAND_AUGMENT_OPS`
    chosen with replacement, each applied with probability ``apply_prob`` at magnitude
    ``clip(N(magnitude, magnitude_std), 0, 10)``. All randomness from ``rng``."""
    names = list(RAND_AUGMENT_OPS)
    for i in rng.integers(0, len(names), size=num_ops):
        if rng.random() > apply_prob:
            continue
        m = rng.normal(magnitude, magnitude_std) if magnitude_std > 0 else magnitude
        level = min(max(m, 0.0), _MAX_LEVEL) / _MAX_LEVEL
        img = RAND_AUGMENT_OPS[names[i]](img, level, rng, fill)
    return img


class RandAugmentCropFlip(grain.transforms.RandomMap):
    """Fine-tuning transform: :class:`colormae_jax.data.pipeline.RandomResizedCropFlip` (decode,
    RandomResizedCrop to ``size`` with ``scale`` (MAE: 0.08-1), bicubic, flip) then
    :func:`rand_augment`. The same keys as that transform: ``image`` (uint8 [size, size, 3],
    or float32 normalised when ``mean`` / ``std`` are given), ``label``, ``index``, ``crop``
    and ``flip``. Deterministic given grain's ``np.random.Generator``."""

    def __init__(self, size: int, num_ops: int = 2, magnitude: float = 9.0, scale=(0.08, 1.0), *,
                 magnitude_std: float = 0.5, hflip: bool = True, ratio=(3 / 4, 4 / 3), fill: tuple = FILL,
                 mean=None, std=None):
        self.crop = data.RandomResizedCropFlip(size, scale, hflip, ratio=ratio)
        self.num_ops, self.magnitude, self.magnitude_std = int(num_ops), float(magnitude), float(magnitude_std)
        self.fill, self.mean, self.std = tuple(fill), mean, std

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        out = self.crop.random_map(element, rng)
        img = rand_augment(Image.fromarray(out['image']), rng, num_ops=self.num_ops, magnitude=self.magnitude,
                           magnitude_std=self.magnitude_std, fill=self.fill)
        image = np.asarray(img, np.uint8)
        out['image'] = image if self.mean is None else data.normalize(image, self.mean, self.std)
        return out


__all__ = ['smooth_labels', 'soft_cross_entropy', 'mixup_cutmix', 'random_erasing', 'ERASE_MODES',
           'RAND_AUGMENT_OPS', 'rand_augment', 'RandAugmentCropFlip', 'FILL']

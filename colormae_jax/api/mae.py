"""Pre-trained MAEs in Python, for notebooks: load any of them, encode images, reconstruct them under
a chosen mask, draw the grid of ``python -m colormae_jax.tools.visualize`` (docs/api.md).

    from colormae_jax.api import mae as api
    mae = api.load('/tmp/mae_ti4')                        # a workdir, WORKDIR/checkpoints/STEP, an import folder
    images, names = api.load_images(['cat.jpg', 'photos/'], mae.config.image_size)
    features = api.encode(mae, images)                    # [B, width] [CLS] features ('mean': mean-pooled)
    rec = api.reconstruct(mae, images, 'green')           # .mask [B, N] (0 visible / 1 masked / -1 thrown), .images
    api.save_png('grid.png', api.grid(mae, images, ['random', 'green', 'famt']))

Images are uint8 ``[B, S, S, 3]`` at the model's size (:func:`load_images`, :func:`split_images`
and :func:`as_images` make them); the model sees them normalised with ``mean`` / ``std`` (MAE's
ImageNet statistics unless given). A strategy is named as in ``config.mask.schedule``:
``NAME[:MASK[/THROW]]``, e.g. ``green``, ``random:0.9``, ``famt:0.45/0.40``; its settings (noise
banks, FAMT's fusion) come from ``mask_cfg`` (default: ``defaults.base_config().mask``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import zlib
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from PIL import Image

from colormae_jax import defaults, masking, viz
from colormae_jax.checkpoints.checkpointer import CheckpointError
from colormae_jax.data import pipeline as data, sources as datasets
from colormae_jax.errors import ConfigError, DataError
from colormae_jax.interop import weights
from colormae_jax.masking import famt
from colormae_jax.models import mae as model_lib

STRATEGIES = ('random', 'red', 'blue', 'green', 'purple', 'famt')
FAMT_RATIOS = (0.45, 0.40)  # AMT's mask / throw ratios: FAMT's default when a spec gives none
save_png = viz.save_png
_SOURCES = ('give a training workdir, WORKDIR/checkpoints/STEP, a tools.convert import folder, a .pth / .safetensors '
            'file or a Hugging Face save_pretrained folder')


# ----------------------------------------------------------------------------- the model

@dataclasses.dataclass
class Pretrained:
    """A pre-trained MAE: its params (pure dict), :class:`model.MAEConfig`, where it came from,
    and the normalisation its inputs get (mean, std in 0..255)."""
    params: dict
    config: model_lib.MAEConfig
    description: str
    mean: tuple = data.MAE_MEAN
    std: tuple = data.MAE_STD

    @property
    def model(self) -> model_lib.MAE:
        """The ``nnx`` module (built from the params on each access)."""
        return nnx.merge(model_lib.abstract_mae(self.config)[0], self.params)

    def normalise(self, images: np.ndarray) -> jax.Array:
        return jnp.asarray(data.normalize(np.asarray(images), self.mean, self.std))


def load(source: str, step: int | None = None, *, mean: Sequence[float] = data.MAE_MEAN,
         std: Sequence[float] = data.MAE_STD) -> Pretrained:
    """A pre-trained MAE from any source ``weights.load_any_params`` reads: a training
    ``--workdir`` (the newest step, or ``step``), ``WORKDIR/checkpoints/STEP``, a
    ``tools.convert import`` folder, a ``.pth`` / ``.safetensors`` file in a layout ``tools.convert
    import`` reads, or a Hugging Face ``save_pretrained`` folder. Raises :class:`errors.DataError`
    (one line) when the source cannot be read."""
    source = str(source)
    m = re.match(r'^(.*?)/checkpoints/(\d+)/?$', source)
    if m and step is None:
        source, step = m.group(1), int(m.group(2))
    if not os.path.exists(source):
        raise DataError(f'{source}: no such file or directory; {_SOURCES}')
    try:
        params, c, description = weights.load_any_params(source, step)
    except (CheckpointError, OSError, ValueError) as e:
        if isinstance(e, ConfigError) and e.key is not None:
            raise
        raise DataError(f'{source}: cannot read pre-trained params ({str(e).rstrip(".")}); {_SOURCES}') from None
    return Pretrained(params, c, description, tuple(mean), tuple(std))


@functools.lru_cache(maxsize=8)
def _functions(c: model_lib.MAEConfig) -> dict:
    graphdef = model_lib.abstract_mae(c)[0]

    def forward(params, x, part):
        return nnx.merge(graphdef, params)(x, part)

    def features(params, x):
        return model_lib.pooled_features(nnx.merge(graphdef, params).encoder(x.astype(c.dtype)))

    def maps(params, x, freq_weight, freq_sigma):
        encoder = nnx.merge(graphdef, params).encoder
        x = x.astype(c.dtype)
        return {'attention': famt.attention_map(encoder.cls_attention(x)),
                'frequency': famt.frequency_map(x, c.patch, freq_sigma * c.patch),
                'fused': famt.weight_maps(encoder, x, patch=c.patch, freq_weight=freq_weight,
                                          freq_sigma=freq_sigma)}

    return {'forward': jax.jit(forward), 'features': jax.jit(features),
            'maps': jax.jit(maps, static_argnums=(2, 3)),
            'align': jax.jit(functools.partial(famt.align, out_grid=c.grid))}


# ----------------------------------------------------------------------------- images

def _is_image_file(path: str) -> bool:
    name = os.path.basename(path)
    return not name.startswith('.') and name.lower().endswith(datasets.IMAGE_EXTENSIONS)


def _view(image: Any, size: int, view: str, what: str) -> np.ndarray:
    views = {'resize': data.ResizeWhole, 'center_crop': data.CenterCrop}
    if view not in views:
        raise DataError(f'view={view!r}: valid views are {sorted(views)}')
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert('RGB'), np.uint8)
    if isinstance(image, np.ndarray) and image.dtype != np.uint8:
        raise DataError(f'{what}: images are uint8 [H, W, 3] arrays, got {image.dtype}; convert with '
                        f'.astype(np.uint8) (0..255)')
    try:
        return views[view](size).map({'image': image, 'label': 0, 'index': 0})['image']
    except (OSError, ValueError, SyntaxError) as e:
        why = re.sub(r'\s*<[^>]*>', '', str(e)).strip()  # no object addresses
        raise DataError(f'{what}: not an image PIL can read ({type(e).__name__}: {why}); give JPEG or PNG '
                        f'files') from None


def as_images(images: Any, size: int, view: str = 'resize') -> np.ndarray:
    """uint8 ``[B, size, size, 3]`` from an array ``[B, H, W, 3]`` or ``[H, W, 3]``, a list of arrays /
    PIL images / encoded bytes, or image files and folders: each image resized whole
    (``view='resize'``, bicubic, as FAMT's weight pass sees it) or resized and centre-cropped
    (``'center_crop'``, the evaluations')."""
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, (list, tuple)) and images and
                                                   all(isinstance(i, (str, os.PathLike)) for i in images)):
        return load_images(images, size, view=view)[0]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        images = images[None]
    if isinstance(images, np.ndarray) and images.shape[1:3] == (size, size) and images.dtype == np.uint8:
        return images
    out = [_view(im, size, view, f'image {i}') for i, im in enumerate(images)]
    if not out:
        raise DataError('no images given')
    return np.stack(out)


def list_image_files(paths: str | Iterable[str]) -> list[str]:
    """Image files (``.jpg``, ``.jpeg``, ``.png``) of files and folders (walked, in sorted order)."""
    out = []
    for p in [paths] if isinstance(paths, str) else paths:
        p = str(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(d, f) for d, _, files in os.walk(p) for f in files
                           if _is_image_file(os.path.join(d, f)))
            if not found:
                raise DataError(f'{p}: the folder holds no image ({", ".join(datasets.IMAGE_EXTENSIONS)}); give '
                                f'image files or a folder of them')
            out += found
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise DataError(f'{p}: no such file or folder; give image files or a folder of them')
    return out


def load_images(paths: str | Iterable[str], size: int, *, num: int = 0,
                view: str = 'resize') -> tuple[np.ndarray, list[str]]:
    """(uint8 ``[B, size, size, 3]``, file names) of image files and folders (the first ``num``
    when ``num`` > 0). A file PIL cannot read raises :class:`errors.DataError` naming it."""
    files = list_image_files(paths)
    files = files[:num] if num else files
    out = []
    for f in files:
        try:
            with open(f, 'rb') as fh:
                encoded = fh.read()
        except OSError as e:
            raise DataError(f'{f}: cannot be read ({e.strerror or e}); give image files this user can read') from None
        out.append(_view(encoded, size, view, f))
    return np.stack(out), [os.path.basename(f) for f in files]


def split_images(data_cfg: ml_collections.ConfigDict, *, split: str | None = None, num: int = 8,
                 size: int | None = None, view: str = 'resize') -> tuple[np.ndarray, list[str]]:
    """``num`` examples of a configured split (``config.data``; default its ``eval_split``),
    spread evenly over it (the first, ..., the last), as uint8 ``[num, size, size, 3]``, and
    their names (``split[index]``)."""
    split = split or data_cfg.eval_split
    source = datasets.data_source(data_cfg, split)
    picks = np.unique(np.linspace(0, len(source) - 1, max(1, min(num, len(source)))).round().astype(int))
    size = size or data_cfg.image_size
    images = [_view(source[int(i)]['image'], size, view, f'{split}[{i}]') for i in picks]
    return np.stack(images), [f'{split}[{i}]' for i in picks]


# ----------------------------------------------------------------------------- features

def encode(pre: Pretrained, images: Any, pool: str | None = 'cls', *, batch_size: int = 64):
    """Encoder features of whole images (no mask), after the final norm: ``pool='cls'`` the
    [CLS] token, ``'mean'`` the mean of the patch tokens (both ``[B, width]`` float32 numpy),
    ``None`` a dict with both (what the kNN monitor and the linear probe use)."""
    if pool not in ('cls', 'mean', None):
        raise ValueError(f"pool={pool!r}: use 'cls', 'mean' or None (both)")
    x = as_images(images, pre.config.image_size)
    fn = _functions(pre.config)['features']
    parts = [fn(pre.params, pre.normalise(x[i:i + batch_size])) for i in range(0, len(x), batch_size)]
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in ('cls', 'mean')}
    return out if pool is None else out[pool]


# ----------------------------------------------------------------------------- masks and reconstructions

@dataclasses.dataclass
class Reconstruction:
    """What :func:`reconstruct` gives, per image: ``mask`` [B, N] (0 visible, 1 masked, -1
    thrown), ``images`` uint8 [B, S, S, 3] (visible patches pasted back, masked ones predicted,
    thrown ones :data:`viz.THROWN`), ``pred`` [B, N, patch*patch*3] (the decoder's outputs at
    the masked positions, zeros elsewhere, in norm-pix units when the model was trained so),
    ``loss`` (the MAE loss of the batch), and for FAMT ``maps``: ``attention``, ``frequency``,
    ``fused`` [B, N] over the whole image, ``crop`` uint8 [B, S, S, 3] (a random crop and flip of
    the training pipeline), ``aligned`` [B, N] (the fused map resampled onto that crop)."""
    strategy: str
    mask: np.ndarray
    images: np.ndarray
    pred: np.ndarray
    loss: float
    maps: dict = dataclasses.field(default_factory=dict)


def parse_strategy(spec: str) -> tuple[str, dict]:
    """``'famt:0.45/0.40'`` -> ``('famt', {'mask_ratio': 0.45, 'throw_ratio': 0.4})``."""
    m = re.fullmatch(r'(\w+)(?::([0-9.eE+-]+)(?:/([0-9.eE+-]+))?)?', spec.strip())
    if m is None:
        raise DataError(f'strategy {spec!r}: expected NAME[:MASK[/THROW]], e.g. green or famt:0.45/0.40')
    name = m.group(1)
    if name not in masking.names():
        raise DataError(f'strategy {spec!r}: {name!r} is unknown; valid: {masking.names()}')
    if m.group(2):
        return name, {'mask_ratio': float(m.group(2)), 'throw_ratio': float(m.group(3) or 0.0)}
    if name == 'famt':
        return name, {'mask_ratio': FAMT_RATIOS[0], 'throw_ratio': FAMT_RATIOS[1]}
    return name, {}


def _key(seed: int, name: str) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)


@functools.lru_cache(maxsize=32)
def _strategy_functions(s: masking.Strategy) -> tuple:
    """(jit(init_aux), jit(partition)) of a strategy (hashable, static)."""
    return jax.jit(s.init_aux), jax.jit(s.__call__)


def make_strategy(spec: str, grid: int, mask_cfg: ml_collections.ConfigDict | None = None) -> masking.Strategy:
    """The strategy of ``spec`` on a ``grid x grid`` patch grid, its settings from ``mask_cfg``."""
    name, ratios = parse_strategy(spec)
    s = masking.create(mask_cfg or defaults.base_config().mask, grid, name, **ratios)
    s.check(1)
    return s


def famt_maps(pre: Pretrained, images: Any, *, mask_cfg: ml_collections.ConfigDict | None = None,
              seed: int = 0, crop_scale: Sequence[float] = (0.2, 1.0)) -> dict:
    """FAMT's maps of whole images (see :class:`Reconstruction`): the last block's [CLS]
    attention (min-max per head, averaged), the low-pass frequency map, their fusion (as the
    training's weight pass computes it), and the fused map aligned to a random crop and flip
    drawn as the training pipeline draws them (``data.RandomResizedCropFlip``)."""
    x = as_images(images, pre.config.image_size)
    f = make_strategy('famt', pre.config.grid, mask_cfg)
    out = {k: np.asarray(v) for k, v in
           _functions(pre.config)['maps'](pre.params, pre.normalise(x), float(f.freq_weight),
                                          float(f.freq_sigma)).items()}
    crop_fn = data.RandomResizedCropFlip(pre.config.image_size, tuple(crop_scale))
    crops = [crop_fn.random_map({'image': im, 'label': 0, 'index': i}, np.random.default_rng([seed, i]))
             for i, im in enumerate(x)]
    g = pre.config.grid
    boxes = jnp.asarray(np.stack([c['crop'] for c in crops]))
    flips = jnp.asarray(np.stack([c['flip'] for c in crops]))
    aligned = _functions(pre.config)['align'](jnp.asarray(out['fused']).reshape(-1, g, g), boxes, flips)
    out['aligned'] = np.asarray(aligned).reshape(len(x), -1)
    out['crop'] = np.stack([c['image'] for c in crops])
    out['box'], out['flip'] = np.asarray(boxes), np.asarray(flips)
    return out


def reconstruct(pre: Pretrained, images: Any, strategy: str = 'random', *, seed: int = 0,
                mask_cfg: ml_collections.ConfigDict | None = None) -> Reconstruction:
    """Masks ``images`` with ``strategy`` (``NAME[:MASK[/THROW]]``; the mask is a function of
    ``seed`` and the name) and reconstructs them (see :class:`Reconstruction`). FAMT masks
    with its fused map of each whole image (uniform weights would be random masking)."""
    c = pre.config
    x = as_images(images, c.image_size)
    s = make_strategy(strategy, c.grid, mask_cfg)
    normalised = pre.normalise(x)
    batch, maps = {'image': jnp.asarray(x)}, {}
    if s.name == 'famt':
        maps = famt_maps(pre, x, mask_cfg=mask_cfg, seed=seed)
        batch[famt.WEIGHT_KEY] = jnp.asarray(maps['fused'])
    init_aux, partition = _strategy_functions(s)
    part = partition(_key(seed, strategy), batch, init_aux(_key(seed + 1, s.name)))
    loss, pred = _functions(c)['forward'](pre.params, normalised, part)
    mask = np.asarray(masking.masked_map(part, c.num_patches)).astype(np.int8)
    rows = np.arange(len(x))[:, None]
    full = np.zeros((len(x), c.num_patches, c.patch_dim), np.float32)
    full[rows, np.asarray(part.masked)] = np.asarray(pred)
    norm = np.asarray(normalised)
    recon = np.stack([viz.compose(x[i], norm[i], full[i], mask[i], c.patch, mean=pre.mean, std=pre.std,
                                  norm_pix=c.norm_pix_loss) for i in range(len(x))])
    return Reconstruction(strategy, mask, recon, full, float(loss), maps)


# ----------------------------------------------------------------------------- the grid

def panels(pre: Pretrained, images: Any, strategies: Sequence[str] = STRATEGIES, *, seed: int = 0,
           mask_cfg: ml_collections.ConfigDict | None = None) -> tuple[list[list[np.ndarray]], list[str]]:
    """(rows of uint8 panels, column titles) of :func:`grid`."""
    x = as_images(images, pre.config.image_size)
    p = pre.config.patch
    rows, titles = [[im] for im in x], ['input']
    for spec in strategies:
        r = reconstruct(pre, x, spec, seed=seed, mask_cfg=mask_cfg)
        titles += [f'mask\n{spec}', f'reconstruction\n{spec}']
        for i, row in enumerate(rows):
            row += [viz.mask_image(r.mask[i], p), r.images[i]]
        if r.maps:
            titles += [f'attention\n{spec}', f'frequency\n{spec}', f'fused\n{spec}', 'crop + flip', 'aligned\nmap']
            for i, row in enumerate(rows):
                row += [viz.heatmap(r.maps[k][i], p, x[i]) for k in ('attention', 'frequency', 'fused')]
                row += [r.maps['crop'][i], viz.heatmap(r.maps['aligned'][i], p, r.maps['crop'][i])]
    return rows, titles


def grid(pre: Pretrained, images: Any, strategies: Sequence[str] = STRATEGIES, *, seed: int = 0,
         mask_cfg: ml_collections.ConfigDict | None = None, scale: int | None = None) -> np.ndarray:
    """The picture, uint8 ``[H, W, 3]`` (``PIL.Image.fromarray`` shows it; :func:`save_png`
    writes it): one row per image, the input, then for each strategy its mask and its
    reconstruction, and for FAMT its attention, frequency and fused maps, a training crop and
    flip, and the fused map aligned to it. Panels are upscaled ``scale`` times (nearest; default:
    to about 128 pixels) with gaps and column titles."""
    rows, titles = panels(pre, images, strategies, seed=seed, mask_cfg=mask_cfg)
    scale = scale or viz.auto_scale(pre.config.image_size)
    return viz.grid(rows, titles, scale=scale, footer=viz.MASK_LEGEND)

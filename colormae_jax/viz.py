"""Pictures of masks, reconstructions and weight maps, in numpy and PIL only (no JAX).

The panels: :func:`mask_image` (visible / masked / thrown patches in three colours, from the
``masking.masked_map`` convention 0 / 1 / -1), :func:`heatmap` (a map over the patch grid, on
the image), :func:`compose` (a reconstruction: visible patches pasted back, masked ones
predicted with norm-pix undone by :func:`undo_norm_pix`, thrown ones in the thrown colour).
:func:`grid` lays rows of equal panels out, upscaled by an integer factor with nearest
neighbours (every input pixel becomes a ``scale x scale`` block, so nothing is resampled),
with gaps and column titles; :class:`Layout` says where each panel lands.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

VISIBLE = (236, 236, 236)  # mask panels: what the encoder sees
MASKED = (70, 70, 70)      # predicted by the decoder (the loss)
THROWN = (214, 96, 77)     # in neither encoder, decoder nor loss (FAMT)
MASK_LEGEND = 'mask: light = visible, dark = masked, red = thrown'
BACKGROUND = 255
_VIRIDIS = np.asarray([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], np.float64)


# ----------------------------------------------------------------------------- patches

def patchify(images: np.ndarray, patch: int) -> np.ndarray:
    """[..., H, W, C] -> [..., N, patch*patch*C], row-major over the grid (``model.patchify``'s order)."""
    *lead, h, w, c = images.shape
    x = images.reshape(*lead, h // patch, patch, w // patch, patch, c)
    x = np.moveaxis(x, -4, -3)  # [..., gh, gw, p, p, c]
    return x.reshape(*lead, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: np.ndarray, patch: int, channels: int = 3) -> np.ndarray:
    """Inverse of :func:`patchify` for a square grid."""
    *lead, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(*lead, g, g, patch, patch, channels)
    x = np.moveaxis(x, -3, -4)  # [..., gh, p, gw, p, c]
    return x.reshape(*lead, g * patch, g * patch, channels)


def undo_norm_pix(pred: np.ndarray, target: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Predictions in norm-pix units back to pixels with each original patch's statistics: the
    inverse of ``model.normalize_patches`` (mean, unbiased variance, ``sqrt(var + eps)``)."""
    target = np.asarray(target, np.float64)
    mean = target.mean(-1, keepdims=True)
    std = np.sqrt(target.var(-1, keepdims=True, ddof=1) + eps)
    return (np.asarray(pred, np.float64) * std + mean).astype(np.float32)


def to_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float images ``(x - mean) / std`` (mean, std in 0..255) -> uint8."""
    x = np.asarray(images, np.float64) * np.asarray(std, np.float64) + np.asarray(mean, np.float64)
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def compose(image: np.ndarray, normalised: np.ndarray, pred: np.ndarray, mask: np.ndarray, patch: int, *,
            mean: Sequence[float], std: Sequence[float], norm_pix: bool) -> np.ndarray:
    """One reconstruction [H, W, 3] uint8.

    ``image``: the uint8 input [H, W, 3]; ``normalised``: the model's input (float, the same
    image normalised); ``pred``: the decoder's predictions [N, D] in grid order (only the masked
    rows are used); ``mask``: [N] 0 visible, 1 masked, -1 thrown. Visible patches are the input
    pixels, exactly; masked ones the predictions (norm-pix undone with the original patch's
    mean and variance when ``norm_pix``), thrown ones :data:`THROWN`.
    """
    mask = np.asarray(mask)
    target = patchify(np.asarray(normalised, np.float32), patch)
    pred = undo_norm_pix(pred, target) if norm_pix else np.asarray(pred, np.float32)
    out = patchify(to_uint8(unpatchify(pred, patch), mean, std), patch)
    inp = patchify(np.asarray(image, np.uint8), patch)
    out = np.where((mask == 0)[:, None], inp, out)
    out = np.where((mask == -1)[:, None], np.tile(np.asarray(THROWN, np.uint8), patch * patch), out)
    return unpatchify(out, patch)


# ----------------------------------------------------------------------------- panels

def mask_image(mask: np.ndarray, patch: int) -> np.ndarray:
    """[N] (or [g, g]) of 0 visible / 1 masked / -1 thrown -> [g*patch, g*patch, 3] uint8 in
    :data:`VISIBLE`, :data:`MASKED`, :data:`THROWN`."""
    m = np.asarray(mask).reshape(-1)
    g = int(round(m.size ** 0.5))
    cells = np.empty((m.size, 3), np.uint8)
    cells[m == 0], cells[m == 1], cells[m == -1] = VISIBLE, MASKED, THROWN
    if not np.isin(m, (0, 1, -1)).all():
        raise ValueError('a mask holds 0 (visible), 1 (masked) and -1 (thrown) only')
    return np.repeat(np.repeat(cells.reshape(g, g, 3), patch, 0), patch, 1)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB (viridis, linear between five anchors)."""
    v = np.clip(np.nan_to_num(np.asarray(values, np.float64)), 0.0, 1.0) * (len(_VIRIDIS) - 1)
    lo = np.minimum(np.floor(v).astype(int), len(_VIRIDIS) - 2)
    f = (v - lo)[..., None]
    return np.round(_VIRIDIS[lo] * (1 - f) + _VIRIDIS[lo + 1] * f).astype(np.uint8)


def heatmap(values: np.ndarray, patch: int, image: np.ndarray | None = None, alpha: float = 0.7) -> np.ndarray:
    """A map over the patch grid ([N] or [g, g], min-max scaled to [0, 1]) as patch-sized
    colour cells, blended over ``image`` (uint8 [H, W, 3]) with weight ``alpha`` if given."""
    v = np.asarray(values, np.float64).reshape(-1)
    g = int(round(v.size ** 0.5))
    span = v.max() - v.min()
    v = (v - v.min()) / span if span > 0 else np.zeros_like(v)
    cells = colormap(v).reshape(g, g, 3)
    out = np.repeat(np.repeat(cells, patch, 0), patch, 1)
    if image is None:
        return out
    return np.round(alpha * out + (1 - alpha) * np.asarray(image, np.float64)).astype(np.uint8)


def pad(panel: np.ndarray, h: int, w: int) -> np.ndarray:
    """``panel`` [h', w', 3] (h' <= h, w' <= w) at the top left of an [h, w, 3] tile of :data:`BACKGROUND`."""
    p = np.asarray(panel, np.uint8)
    if p.shape[:2] == (h, w):
        return p
    out = np.full((h, w, 3), BACKGROUND, np.uint8)
    out[:p.shape[0], :p.shape[1]] = p
    return out


def label_legend(num_classes: int) -> str:
    """The footer of segmentation pictures (``segmentation.label_picture``'s palette)."""
    return f'{num_classes} classes, one colour each; black: ignored'


# ----------------------------------------------------------------------------- the grid

def upscale(image: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour upscaling by an integer factor: each pixel becomes a scale x scale block."""
    return np.repeat(np.repeat(np.asarray(image), scale, 0), scale, 1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the panels of :func:`grid` go: ``rows x cols`` tiles of ``tile_h x tile_w`` pixels,
    ``gap`` pixels around each, column titles in a band of ``title_h`` pixels on top, an
    optional footer line of ``footer_h`` pixels at the bottom."""
    rows: int
    cols: int
    tile_h: int
    tile_w: int
    gap: int
    title_h: int
    footer_h: int = 0

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the picture."""
        return (self.title_h + self.rows * self.tile_h + (self.rows + 1) * self.gap + self.footer_h,
                self.cols * self.tile_w + (self.cols + 1) * self.gap)

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """(y, x) of the top-left pixel of tile (row, col)."""
        return (self.title_h + self.gap + row * (self.tile_h + self.gap), self.gap + col * (self.tile_w + self.gap))


def layout(rows: int, cols: int, tile_h: int, tile_w: int, *, gap: int = 4, font_size: int = 11,
           title_lines: int = 1, footer: bool = False) -> Layout:
    line = font_size + 3
    return Layout(rows, cols, tile_h, tile_w, gap, title_lines * line + 4, line + 2 if footer else 0)


def grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str] = (), *, scale: int = 4, gap: int = 4,
         font_size: int = 11, footer: str = '') -> np.ndarray:
    """Rows of equal-size uint8 panels [h, w, 3] -> one uint8 picture [H, W, 3]: each panel
    upscaled ``scale`` times (nearest), ``gap`` white pixels between panels, ``titles`` (one per
    column; ``\\n`` for a second line) on top, ``footer`` (one line) below."""
    if not rows or not rows[0]:
        raise ValueError('a grid needs at least one row and one column')
    h, w = np.shape(rows[0][0])[:2]
    cols = len(rows[0])
    if any(len(r) != cols for r in rows) or any(np.shape(p)[:2] != (h, w) for r in rows for p in r):
        raise ValueError('every row needs the same number of panels, all of the same size')
    if titles and len(titles) != cols:
        raise ValueError(f'{len(titles)} titles for {cols} columns')
    lines = max([t.count('\n') + 1 for t in titles] or [0])
    lay = layout(len(rows), cols, h * scale, w * scale, gap=gap, font_size=font_size, title_lines=lines,
                 footer=bool(footer))
    canvas = np.full((*lay.size, 3), BACKGROUND, np.uint8)
    for r, row in enumerate(rows):
        for c, panel in enumerate(row):
            y, x = lay.origin(r, c)
            p = np.asarray(panel)
            if p.ndim == 2:
                p = np.repeat(p[..., None], 3, -1)
            canvas[y:y + lay.tile_h, x:x + lay.tile_w] = upscale(p.astype(np.uint8), scale)
    if titles or footer:
        im = Image.fromarray(canvas)
        draw, font = ImageDraw.Draw(im), _font(font_size)
        for c, t in enumerate(titles):
            x = lay.origin(0, c)[1] + lay.tile_w / 2
            draw.multiline_text((x, 2), t, fill=(0, 0, 0), font=font, anchor='ma', align='center', spacing=3)
        if footer:
            draw.text((gap, lay.size[0] - lay.footer_h), footer, fill=(0, 0, 0), font=font)
        canvas = np.asarray(im)
    return canvas


def save_png(path: str, picture: np.ndarray) -> str:
    """Writes ``picture`` (uint8 [H, W, 3]) as an optimised PNG; returns the absolute path."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.asarray(picture, np.uint8)).save(path, optimize=True)
    return path


def auto_scale(side: int, target: int = 128) -> int:
    """The integer upscaling that brings a ``side``-pixel panel nearest to ``target`` pixels (at least 1)."""
    return max(1, int(round(target / side)))


def paint_thrown(image: np.ndarray, mask: np.ndarray, patch: int) -> np.ndarray:
    """``image`` [H, W, 3] with its thrown patches (``mask`` -1) in :data:`THROWN`."""
    g = image.shape[0] // patch
    thrown = np.repeat(np.repeat((np.asarray(mask).reshape(g, g) == -1), patch, 0), patch, 1)
    return np.where(thrown[..., None], np.asarray(THROWN, np.uint8), image)


def reconstruction_grid(inputs: np.ndarray, masks: np.ndarray, recons: np.ndarray, patch: int, *,
                        strategy: str = '', scale: int | None = None) -> np.ndarray:
    """The picture of a training step (TensorBoard): per image, input | mask | reconstruction
    (thrown patches, which nothing predicts, in :data:`THROWN`)."""
    name = f' ({strategy})' if strategy else ''
    rows = [[inp, mask_image(m, patch), paint_thrown(rec, m, patch)] for inp, m, rec in zip(inputs, masks, recons)]
    return grid(rows, ['input', f'mask{name}', f'reconstruction{name}'],
                scale=scale or auto_scale(np.shape(inputs)[1]), footer=MASK_LEGEND)

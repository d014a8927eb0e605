"""Position tables at another resolution: MAE's ``interpolate_pos_embed``, and recomputing the sin-cos table.

MAE (``util/pos_embed.py``) resizes a checkpoint's ``pos_embed`` to a new patch grid with
``torch.nn.functional.interpolate(mode='bicubic', align_corners=False)``, keeping the
[CLS] row. :func:`bicubic_resize` is that interpolation in numpy (Keys' cubic with
A = -0.75, half-pixel centres, edge indices clamped, no antialiasing), so a table resized
here equals one resized by the official code to float32 rounding.
"""
from __future__ import annotations

import numpy as np

from colormae_jax.models import mae as model_lib

A = -0.75  # PyTorch's cubic convolution coefficient (jax.image.resize uses -0.5)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[..., 4] weights of the taps at offsets -1, 0, 1, 2 for fractional positions ``t``."""
    def near(x):  # |x| <= 1
        return ((A + 2) * x - (A + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((A * x - 5 * A) * x + 8 * A) * x - 4 * A
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], -1)


def _resize_axis(x: np.ndarray, size: int, axis: int) -> np.ndarray:
    n = x.shape[axis]
    if n == size:
        return x
    src = (np.arange(size, dtype=np.float64) + 0.5) * (n / size) - 0.5
    base = np.floor(src)
    w = _cubic_weights(src - base)  # [size, 4]
    idx = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3), 0, n - 1)  # [size, 4]
    x = np.moveaxis(x, axis, 0)
    out = np.einsum('sk,sk...->s...', w, x[idx])
    return np.moveaxis(out, 0, axis)


def bicubic_resize(grid: np.ndarray, size: int) -> np.ndarray:
    """[g, g, D] -> [size, size, D], as ``F.interpolate(..., mode='bicubic', align_corners=False)``."""
    x = np.asarray(grid, np.float64)
    return _resize_axis(_resize_axis(x, size, 0), size, 1).astype(np.asarray(grid).dtype)


def resize_pos_embed(table: np.ndarray, new_grid: int, num_extra: int = 1) -> np.ndarray:
    """MAE's ``interpolate_pos_embed``: [1, E + g*g, D] -> [1, E + new_grid**2, D], the E extra
    rows ([CLS]) kept as they are. The same table is returned when the grid does not change."""
    table = np.asarray(table)
    extra, pos = table[:, :num_extra], table[:, num_extra:]
    g = int(round(pos.shape[1] ** 0.5))
    if g * g != pos.shape[1]:
        raise ValueError(f'a position table of {pos.shape[1]} rows is not a square grid')
    if g == new_grid:
        return table
    grid = pos.reshape(g, g, -1)
    return np.concatenate([extra, bicubic_resize(grid, new_grid).reshape(1, new_grid * new_grid, -1)], 1)


def pos_table(new_grid: int, width: int, source: np.ndarray | None = None, method: str = 'interpolate') -> np.ndarray:
    """A [1, 1 + new_grid**2, width] table for a new grid: MAE's bicubic interpolation of
    ``source`` (``method='interpolate'``), or the sin-cos table recomputed at the new grid
    (``method='recompute'``, or when there is no source table)."""
    if method not in ('interpolate', 'recompute'):
        raise ValueError(f"method={method!r}: expected 'interpolate' or 'recompute'")
    if source is None or method == 'recompute':
        return model_lib.sincos_table_with_cls(new_grid, width)
    return resize_pos_embed(source, new_grid)

"""ColorMAE: masks from filtered white noise (Hinojosa, Liu and Ghanem, ECCV 2024).

A bank of noise patterns ``[L, S, S]`` is generated once in JAX from white noise ``W``,
filtered with Gaussian transfer functions in the Fourier domain (periodic boundaries):

    red    = G_s * W                    low-pass
    blue   = W - G_s * W                high-pass
    green  = G_s1 * W - G_s2 * W        band-pass  (s1 < s2)
    purple = W - green                  band-stop

Each pattern is standardised. Sigmas are in patch-grid cells (the noise is sampled on the
patch grid). Inside the jitted step each image draws its own pattern, crop offset, and
horizontal and vertical flips from a jax.random key; the cropped window *is* the priority
score, so the highest-valued patches stay visible. Generated banks are periodic, so a
crop may wrap around the edge (the bank is padded by wrapping once, at set-up); a bank
loaded from an ``.npz`` (the official ColorMAE layout: one array ``[L, H, W]``) is cropped
inside its borders.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from colormae_jax.errors import ConfigError
from colormae_jax.masking import core

COLOURS = ('red', 'blue', 'green', 'purple')


# ----------------------------------------------------------------------------- bank generation

def gaussian_response(side: int, sigma: float) -> jax.Array:
    """Fourier transfer function of a periodic Gaussian blur of std ``sigma`` cells on an
    ``side x side`` torus, for ``rfft2`` layout: ``[side, side // 2 + 1]``."""
    fy = jnp.fft.fftfreq(side)[:, None]
    fx = jnp.fft.rfftfreq(side)[None, :]
    return jnp.exp(-2.0 * (jnp.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))


def transfer_function(colour: str, side: int, sigma: float, sigma1: float, sigma2: float) -> jax.Array:
    """The colour's filter in the Fourier domain (rfft2 layout)."""
    if colour == 'red':
        return gaussian_response(side, sigma)
    if colour == 'blue':
        return 1.0 - gaussian_response(side, sigma)
    band = gaussian_response(side, sigma1) - gaussian_response(side, sigma2)
    if colour == 'green':
        return band
    if colour == 'purple':
        return 1.0 - band
    raise ValueError(f'unknown noise colour {colour!r}; valid: {list(COLOURS)}')


def standardize(bank: jax.Array) -> jax.Array:
    """Zero mean and unit variance per pattern."""
    mean = bank.mean(axis=(-2, -1), keepdims=True)
    std = bank.std(axis=(-2, -1), keepdims=True)
    return (bank - mean) / jnp.maximum(std, 1e-12)


def generate(rng: jax.Array, colour: str, size: int, side: int, *, sigma: float, sigma1: float,
             sigma2: float) -> jax.Array:
    """A standardised bank ``[size, side, side]`` float32 of ``colour`` noise."""
    white = jax.random.normal(rng, (size, side, side), jnp.float32)
    h = transfer_function(colour, side, sigma, sigma1, sigma2)
    return standardize(jnp.fft.irfft2(jnp.fft.rfft2(white) * h, s=(side, side)))


def radial_power(bank: np.ndarray | jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Radially averaged power spectrum over the bank: (frequencies in cycles/cell, power).

    Bins are unit-width rings of the integer frequency index, from 0 to side // 2.
    """
    bank = np.asarray(bank, np.float64)
    h, w = bank.shape[-2:]
    power = (np.abs(np.fft.fft2(bank - bank.mean(axis=(-2, -1), keepdims=True))) ** 2).mean(0)
    ky = np.fft.fftfreq(h) * h
    kx = np.fft.fftfreq(w) * w
    # radius in cycles per cell, binned on the coarser axis' resolution
    r = np.sqrt((ky[:, None] / h) ** 2 + (kx[None, :] / w) ** 2)
    step = 1.0 / min(h, w)
    bins = np.rint(r / step).astype(int)
    nbins = min(h, w) // 2 + 1
    sums = np.bincount(bins.ravel(), power.ravel(), minlength=nbins)[:nbins]
    cnt = np.bincount(bins.ravel(), minlength=nbins)[:nbins]
    return np.arange(nbins) * step, sums / np.maximum(cnt, 1)


# ----------------------------------------------------------------------------- bank files

def load_bank(path: str, grid: int | None = None, colour: str | None = None) -> np.ndarray:
    """Reads an ``.npz`` bank (one array ``[L, H, W]``, as the official ColorMAE banks) and
    standardises it. Refuses a missing file, a wrong shape, non-finite values, or patterns
    smaller than the patch grid. ``colour``: the bank's colour, for the hint when it is missing."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'noise bank {path!r} does not exist; generate one with '
                                f'`python -m colormae_jax.tools.noise --colour {colour or "COLOUR"} --out {path}` or '
                                f'leave mask.noise.path empty to generate it at start-up')
    try:
        with np.load(path) as z:
            if not z.files:
                raise ValueError('the archive holds no array')
            arr = z[z.files[0]]
    except (OSError, ValueError) as e:
        raise ValueError(f'noise bank {path!r} is not a readable .npz archive ({e})') from None
    if arr.ndim != 3:
        raise ValueError(f'noise bank {path!r} has shape {arr.shape}; expected one array [L, H, W]')
    if grid is not None and min(arr.shape[1:]) < grid:
        raise ValueError(f'noise bank {path!r} has patterns of {arr.shape[1]}x{arr.shape[2]}, smaller than the '
                         f'{grid}x{grid} patch grid; use a bank with H, W >= {grid}')
    arr = np.asarray(arr, np.float32)
    if not np.isfinite(arr).all():
        raise ValueError(f'noise bank {path!r} holds NaN or infinite values')
    return np.asarray(standardize(arr))


def save_bank(path: str, bank) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    np.savez_compressed(path, noise=np.asarray(bank, np.float32))


# ----------------------------------------------------------------------------- the strategy

@dataclasses.dataclass(frozen=True)
class ColourNoiseMasking(core.Strategy):
    """Scores are a random crop, with random flips, of a random pattern of the bank."""
    bank_size: int = 1024
    side: int = 64
    sigma: float = 1.5
    sigma1: float = 0.8
    sigma2: float = 2.0
    path: str = ''
    per_image: bool = True

    @property
    def colour(self) -> str:
        return self.name

    def bank_path(self) -> str:
        return self.path.format(colour=self.colour) if self.path else ''

    def check(self, num_devices: int) -> None:
        if self.colour not in COLOURS:
            raise ConfigError('mask.strategy', f'unknown colour {self.colour!r}; valid: {list(COLOURS)}')
        if self.bank_path():
            try:
                load_bank(self.bank_path(), self.grid, self.colour)
            except (OSError, ValueError) as e:
                raise ConfigError('mask.noise.path', str(e)) from None
            return
        if self.bank_size < 1:
            raise ConfigError('mask.noise.bank_size', f'must be at least 1, got {self.bank_size}')
        if self.side < self.grid:
            raise ConfigError('mask.noise.side', f'{self.side} is smaller than the {self.grid}x{self.grid} '
                                                          f'patch grid; use side >= {self.grid} (or 0 for auto)')
        if self.colour in ('red', 'blue') and not self.sigma > 0:
            raise ConfigError('mask.noise.sigma', f'must be positive, got {self.sigma}')
        if self.colour in ('green', 'purple') and not 0 < self.sigma1 < self.sigma2:
            raise ConfigError('mask.noise.sigma1', f'green/purple need 0 < sigma1 < sigma2, got '
                                                            f'sigma1={self.sigma1}, sigma2={self.sigma2}')

    def make_bank(self, rng: jax.Array) -> jax.Array:
        """The bank itself, ``[L, S, S]`` (unpadded)."""
        if self.bank_path():
            return jnp.asarray(load_bank(self.bank_path(), self.grid, self.colour))
        return generate(rng, self.colour, self.bank_size, self.side, sigma=self.sigma, sigma1=self.sigma1,
                        sigma2=self.sigma2)

    def init_aux(self, rng: jax.Array) -> jax.Array:
        bank = self.make_bank(rng)
        if not self.bank_path():  # periodic: pad by wrapping so every offset in [0, S) gives a seamless crop
            g = self.grid - 1
            bank = jnp.pad(bank, ((0, 0), (0, g), (0, g)), mode='wrap')
        return bank

    def windows(self, rng: jax.Array, batch_size: int, bank: jax.Array) -> jax.Array:
        """Crops ``[B, grid, grid]`` of ``bank``. ``per_image``: a pattern, an offset and two
        flips per image. Otherwise the official code's: pattern ``i mod L`` for image ``i``, and
        one offset and pair of flips for each block of ``L`` images (one per batch when B <= L)."""
        g = self.grid
        num, h, w = bank.shape
        k_idx, k_y, k_x, k_h, k_v = jax.random.split(rng, 5)
        if self.per_image:
            idx = jax.random.randint(k_idx, (batch_size,), 0, num)
            draws = batch_size
        else:
            idx = jnp.arange(batch_size) % num
            draws = -(-batch_size // num)  # one draw per block of L images
        block = jnp.arange(batch_size) // (1 if self.per_image else num)
        ys = jax.random.randint(k_y, (draws,), 0, h - g + 1)[block]
        xs = jax.random.randint(k_x, (draws,), 0, w - g + 1)[block]
        crop = jax.vmap(lambda i, y, x: jax.lax.dynamic_slice(bank, (i, y, x), (1, g, g))[0])
        win = crop(idx, ys, xs)
        hflip = jax.random.bernoulli(k_h, 0.5, (draws, 1, 1))[block]
        vflip = jax.random.bernoulli(k_v, 0.5, (draws, 1, 1))[block]
        win = jnp.where(hflip, win[:, :, ::-1], win)
        return jnp.where(vflip, win[:, ::-1, :], win)

    def scores(self, rng, batch, aux):
        b = batch['image'].shape[0]
        return self.windows(rng, b, aux).reshape(b, self.grid * self.grid)


def default_side(grid: int) -> int:
    """Auto bank side: room for many distinct crops, at least 64 cells."""
    return max(64, 2 * grid)


def _factory(name: str, grid: int, cfg: Any, **ratios) -> ColourNoiseMasking:
    return core.from_config(ColourNoiseMasking, name, grid, cfg, 'noise', side=cfg.noise.side or default_side(grid),
                            **ratios)


STRATEGIES = dict.fromkeys(COLOURS, _factory)

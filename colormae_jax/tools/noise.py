r"""ColorMAE noise banks: write a bank as .npz, and draw the paper's figure.

  # a green bank of 3072 patterns 64x64, in the official layout (one array [L, H, W]):
  python -m colormae_jax.tools.noise --colour green --size 3072 --side 64 --out banks/green.npz
  # the figure: per colour, sample patterns, the radially averaged power spectrum, and masks at 0.75:
  python -m colormae_jax.tools.noise --figure noise_colours.png --grid 14

Sigmas are in patch-grid cells (defaults: colormae_jax/defaults.py, docs/design.md).
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from colormae_jax.masking import colour, core
from colormae_jax.tools import absl_help

_COLOUR = flags.DEFINE_enum('colour', 'green', ['red', 'blue', 'green', 'purple'], 'Colour of the bank to write.')
_SIZE = flags.DEFINE_integer('size', 1024, 'Number of patterns L.')
_SIDE = flags.DEFINE_integer('side', 64, 'Pattern side S, in patch-grid cells.')
_SIGMA = flags.DEFINE_float('sigma', 1.5, 'Red / blue Gaussian sigma.')
_SIGMA1 = flags.DEFINE_float('sigma1', 0.8, 'Green / purple: the smaller sigma.')
_SIGMA2 = flags.DEFINE_float('sigma2', 2.0, 'Green / purple: the larger sigma.')
_SEED = flags.DEFINE_integer('seed', 0, 'White-noise seed.')
_OUT = flags.DEFINE_string('out', '', 'Write the bank of --colour here (.npz).')
_FIGURE = flags.DEFINE_string('figure', '', 'Write the four-colour figure here (.png).')
_GRID = flags.DEFINE_integer('grid', 14, 'Patch grid of the masks in the figure (14 = 224 / 16).')
_RATIO = flags.DEFINE_float('ratio', 0.75, 'Mask ratio of the masks in the figure.')


def sigmas() -> dict:
    return dict(sigma=_SIGMA.value, sigma1=_SIGMA1.value, sigma2=_SIGMA2.value)


def check_flags() -> None:
    if _SIZE.value < 1:
        raise app.UsageError(f'--size must be >= 1, got {_SIZE.value}')
    if _SIDE.value < max(_GRID.value, 2):
        raise app.UsageError(f'--side {_SIDE.value} is smaller than the {_GRID.value}x{_GRID.value} grid')
    if not 0 < _SIGMA1.value < _SIGMA2.value:
        raise app.UsageError(f'green/purple need 0 < --sigma1 < --sigma2, got {_SIGMA1.value}, {_SIGMA2.value}')
    if not _SIGMA.value > 0:
        raise app.UsageError(f'--sigma must be positive, got {_SIGMA.value}')
    if not (_OUT.value or _FIGURE.value):
        raise app.UsageError('nothing to do: give --out BANK.npz and/or --figure FIGURE.png')


def figure(path: str, grid: int, ratio: float, side: int, seed: int) -> None:
    """One row per colour: 3 sample patterns, the power spectrum, 3 masks at ``ratio``."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('the figure needs matplotlib: pip install -e ".[plots]"') from None

    n_show = 3
    fig, axes = plt.subplots(4, 2 * n_show + 1, figsize=(2.0 * (2 * n_show + 1), 8.4))
    for row, c in enumerate(colour.COLOURS):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), row)
        bank = colour.generate(key, c, 64, side, **sigmas())
        s = colour.ColourNoiseMasking(c, grid, ratio, side=side)
        aux = jnp.pad(bank, ((0, 0), (0, grid - 1), (0, grid - 1)), mode='wrap')
        scores = s.scores(jax.random.fold_in(key, 1), {'image': jnp.zeros((n_show, 1))}, aux)
        part = core.partition(scores, s.counts)
        masks = np.asarray(core.masked_map(part, grid * grid)).reshape(n_show, grid, grid)
        for j in range(n_show):
            ax = axes[row, j]
            ax.imshow(np.asarray(bank[j, :4 * grid, :4 * grid]), cmap='gray')
            ax.set_axis_off()
            if j == 0:
                ax.set_title(f'{c} noise', fontsize=9, loc='left')
        f, p = colour.radial_power(bank)
        ax = axes[row, n_show]
        ax.semilogy(f[1:], p[1:] / p[1:].max(), color=c if c != 'purple' else 'purple')
        ax.set_ylim(1e-4, 1.5)
        ax.set_xlabel('cycles / patch', fontsize=8)
        ax.tick_params(labelsize=7)
        if row == 0:
            ax.set_title('radial power', fontsize=9)
        for j in range(n_show):
            ax = axes[row, n_show + 1 + j]
            ax.imshow(1 - masks[j], cmap='gray', vmin=0, vmax=1, interpolation='nearest')  # white = visible
            ax.set_axis_off()
            if row == 0 and j == 0:
                ax.set_title(f'masks {grid}x{grid} @ {ratio:g}', fontsize=9, loc='left')
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # JAX's INFO about a missing libtpu, matplotlib's font cache
    check_flags()
    if _OUT.value:
        bank = colour.generate(jax.random.PRNGKey(_SEED.value), _COLOUR.value, _SIZE.value, _SIDE.value, **sigmas())
        colour.save_bank(_OUT.value, bank)
        print(f'wrote {_OUT.value}: {_COLOUR.value} bank {tuple(bank.shape)}')
    if _FIGURE.value:
        figure(_FIGURE.value, _GRID.value, _RATIO.value, _SIDE.value, _SEED.value)
        print(f'wrote {_FIGURE.value}')


if __name__ == '__main__':
    absl_help()
    app.run(main)

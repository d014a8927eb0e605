r"""A synthetic segmentation folder for the smoke run: shapes of three classes on textured backgrounds.

  python -m colormae_jax.tools.seg_folder /tmp/seg_folder            # 24 train + 6 val pairs, 40x48
  python -m colormae_jax.main --config configs/ade20k_seg.py:smoke --config.init_from=/tmp/mae_smoke \
      --config.data.root=/tmp/seg_folder --workdir /tmp/seg_smoke

Writes ``ROOT/images/{train,val}/NNN.jpg`` and ``ROOT/annotations/{train,val}/NNN.png`` (classes 0
background, 1 square, 2 disk, 3 cross; each shape its own noisy colour): the layout
``data.source='seg_folder'`` reads (docs/segmentation.md, "A smoke run"). The same function makes
the folder of ``tests/test_segment.py``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image


def make_seg_folder(root, n_train: int = 24, n_val: int = 6, seed: int = 0, size: tuple[int, int] = (40, 48)) -> str:
    """Shapes of three classes (each its own colour, noisy) on textured backgrounds; label PNGs."""
    rng = np.random.default_rng(seed)
    for split, n in (('train', n_train), ('val', n_val)):
        os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
        os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
        for i in range(n):
            h, w = size
            yy, xx = np.mgrid[:h, :w]
            img = (rng.integers(0, 60, (h, w, 3)) + 40 * np.sin(xx / rng.uniform(2, 6))[..., None]).clip(0, 255)
            lab = np.zeros((h, w), np.uint8)
            for cls in rng.permutation([1, 2, 3])[:2]:
                cy, cx, r = rng.integers(8, h - 8), rng.integers(8, w - 8), rng.integers(5, 9)
                if cls == 1:
                    m = (abs(yy - cy) <= r) & (abs(xx - cx) <= r)
                elif cls == 2:
                    m = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                else:
                    m = ((abs(yy - cy) <= 2) & (abs(xx - cx) <= r)) | ((abs(xx - cx) <= 2) & (abs(yy - cy) <= r))
                colour = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])[cls - 1]
                img[m] = (colour + rng.integers(-30, 30, (m.sum(), 3))).clip(0, 255)
                lab[m] = cls
            Image.fromarray(img.astype(np.uint8)).save(os.path.join(root, 'images', split, f'{i:03d}.jpg'), quality=95)
            Image.fromarray(lab).save(os.path.join(root, 'annotations', split, f'{i:03d}.png'))
    return str(root)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m colormae_jax.tools.seg_folder', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog='\n\n'.join(__doc__.split('\n\n')[1:]).replace('``', ''))
    p.add_argument('root', help='a new (or empty) folder to write')
    p.add_argument('--train', type=int, default=24, help='image and label pairs of the train split (default 24)')
    p.add_argument('--val', type=int, default=6, help='pairs of the val split (default 6)')
    p.add_argument('--seed', type=int, default=0, help='the pictures are a function of it')
    p.add_argument('--helpshort', action='help', help=argparse.SUPPRESS)  # as the absl programs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if os.path.exists(args.root) and (not os.path.isdir(args.root) or os.listdir(args.root)):
        print(f'error: {args.root}: exists and is not an empty folder; give a new folder (it is never overwritten)',
              file=sys.stderr)
        return 2
    if args.train < 1 or args.val < 1:
        print(f'error: --train {args.train} / --val {args.val}: give at least 1 pair per split', file=sys.stderr)
        return 2
    root = os.path.abspath(make_seg_folder(args.root, args.train, args.val, args.seed))
    print(f'Wrote {root}: images/ and annotations/, {args.train} train and {args.val} val pairs (4 classes, '
          f'40x48); use it with --config configs/ade20k_seg.py:smoke --config.data.root={root}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

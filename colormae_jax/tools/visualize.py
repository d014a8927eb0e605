"""Masks, reconstructions and FAMT's maps of a pre-trained MAE on any images, as one PNG grid.

  # your own images (files and folders) with a training run's newest checkpoint:
  python -m colormae_jax.tools.visualize /tmp/mae_ti4 cat.jpg photos/ --out grid.png
  # 4 images of a configured split, chosen masks, a given step (or WORKDIR/checkpoints/STEP):
  python -m colormae_jax.tools.visualize /tmp/mae_ti4 --config configs/cifar10.py --split test --num 4 \\
      --strategies random,green,blue,famt --step 2000 --out grid.png

SOURCE is anything ``colormae_jax.interop.weights.load_any_params`` reads: a training workdir,
WORKDIR/checkpoints/STEP, a ``tools.convert import`` folder, a ``.pth`` / ``.safetensors`` file or a
Hugging Face ``save_pretrained`` folder. One row per image: the input; for each strategy (``NAME[:MASK[/THROW]]``)
the mask (light visible, dark masked, red thrown) and the reconstruction (visible patches pasted
back, norm-pix undone with each patch's own mean and variance); for FAMT also the [CLS]
attention, frequency and fused maps, a training crop and flip, and the map aligned to it.
Python: :mod:`colormae_jax.api.mae`, :mod:`colormae_jax.api.segmentation` (docs/api.md).

A task=segment run's workdir (or WORKDIR/checkpoints/STEP) is recognised by its saved config
(task == 'segment'): one row per image, the image, the true label map over it and the predicted
one (the evaluation's sliding windows and its TensorBoard picture's colours). --split (and --num,
default 8) takes the first images of a split of the run's own data (--config: another data
section), with their labels; image files and folders get the predicted map only. --strategies,
--view and --seed do not apply.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any, Sequence

from absl import logging

from colormae_jax import config_lib, viz
from colormae_jax.api import mae as api, segmentation as seg_api
from colormae_jax.checkpoints.checkpointer import CheckpointError
from colormae_jax.cli import data_root_hint
from colormae_jax.errors import ConfigError, DataError
from colormae_jax.interop import weights


def _load_config_file(spec: str) -> Any:
    """'configs/cifar10.py:smoke' -> that file's get_config('smoke')."""
    try:
        return config_lib.load_config_file(spec)
    except FileNotFoundError as e:
        raise DataError(f'--config {spec}: {e} is not a file; give a config such as configs/cifar10.py') from None


def run_segment(args: argparse.Namespace, config: Any) -> str:
    seg = seg_api.load(args.source, args.step)
    if args.images:
        examples = seg_api.examples(seg, images=args.images, num=args.num)
    else:
        examples = seg_api.examples(seg, data_cfg=config.data if config is not None else None, split=args.split,
                                    num=args.num or 8)
    if not examples:
        raise DataError(f'--split {args.split}: no images')
    rows, titles, _ = seg_api.panels(seg, examples, max_side=args.max_side)
    scale = args.scale or viz.auto_scale(max(rows[0][0].shape[:2]))
    picture = viz.grid(rows, titles, scale=scale, footer=viz.label_legend(seg.num_classes))
    out = viz.save_png(args.out, picture)
    h, w = picture.shape[:2]
    print(f'Read {seg.description}.\nWrote {out}: {len(rows)} rows ({", ".join(e[0] for e in examples)}) x '
          f'{len(titles)} columns ({", ".join(titles)}), {w}x{h} pixels.')
    return out


def run(args: argparse.Namespace) -> str:
    config = _load_config_file(args.config) if args.config else None
    found = weights.run_config(args.source, args.step) if os.path.isdir(args.source) else None
    if found is not None and found[2].get('task') == 'segment':
        return run_segment(args, config)
    if not args.images and config is None:
        raise DataError('no images: give image files or folders after SOURCE, or --config (with --split and --num) '
                        'for examples of a configured split')
    data_cfg = config.data if config is not None else None
    kw = {'mean': tuple(data_cfg.mean), 'std': tuple(data_cfg.std)} if data_cfg is not None else {}
    pre = api.load(args.source, args.step, **kw)
    size = pre.config.image_size
    if args.images:
        images, names = api.load_images(args.images, size, num=args.num, view=args.view)
    else:
        images, names = api.split_images(data_cfg, split=args.split, num=args.num or 8, size=size, view=args.view)
    strategies = [s for s in args.strategies.split(',') if s.strip()]
    for s in strategies:  # refuse a bad name before any work
        try:
            api.parse_strategy(s)
        except DataError as e:
            raise DataError(f'--strategies: {e}') from None
    picture = api.grid(pre, images, strategies, seed=args.seed, scale=args.scale,
                       mask_cfg=config.mask if config is not None else None)
    out = viz.save_png(args.out, picture)
    print(f'Read {pre.description}.\nWrote {out}: {len(names)} rows ({", ".join(names)}) x '
          f'{1 + 2 * len(strategies) + 5 * sum(api.parse_strategy(s)[0] == "famt" for s in strategies)} columns, '
          f'{picture.shape[1]}x{picture.shape[0]} pixels.')
    return out


def _parser() -> argparse.ArgumentParser:
    paragraphs = __doc__.split('\n\n')
    p = argparse.ArgumentParser(prog='python -m colormae_jax.tools.visualize',
                                description='\n\n'.join(paragraphs[:2] + paragraphs[-1:]).replace('``', ''),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('source', help='a training workdir, WORKDIR/checkpoints/STEP, a tools.convert import folder, '
                                  'a .pth / .safetensors file or a Hugging Face save_pretrained folder; a '
                                  'task=segment run (found from its saved config) draws label maps')
    p.add_argument('images', nargs='*', help='image files or folders (.jpg, .jpeg, .png)')
    p.add_argument('--out', default='visualize.png', help='the PNG to write (default: visualize.png)')
    p.add_argument('--strategies', default=','.join(api.STRATEGIES),
                   help='comma-separated NAME[:MASK[/THROW]] (default: all six; famt defaults to 0.45/0.40)')
    p.add_argument('--config', help='a config, e.g. configs/cifar10.py: its data (for --split; mean, std) and '
                                    'mask settings (noise banks, FAMT fusion)')
    p.add_argument('--split', help="with --config and no images: the split (default: the config's eval_split); "
                                   "for a segmentation run --config may be left out (the run's own data)")
    p.add_argument('--num', type=int, default=0, help='at most this many images (split default: 8)')
    p.add_argument('--step', type=int, help='the training step (default: the newest)')
    p.add_argument('--view', choices=('resize', 'center_crop'), default='resize',
                   help='each image resized whole (default) or resized and centre-cropped')
    p.add_argument('--seed', type=int, default=0, help='masks and crops are functions of it')
    p.add_argument('--scale', type=int, help='integer upscaling of each panel (default: to about 128 pixels)')
    p.add_argument('--max_side', type=int, default=256,
                   help='segmentation: images longer than this are drawn downscaled (default: 256 pixels)')
    p.add_argument('--helpshort', action='help', help=argparse.SUPPRESS)  # as the absl programs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # orbax's and JAX's warnings are not the user's business here
    try:
        run(args)
    except (DataError, ConfigError, CheckpointError) as e:
        spec = re.sub(r'[:,]root=[^,]*', '', args.config or 'CONFIG.py')  # the folder goes into --config: root=
        msg = data_root_hint(' '.join(str(e).split()), f'--config {spec}{"," if ":" in spec else ":"}root={{}}')
        print('error: ' + msg, file=sys.stderr)
        return 2
    finally:
        logging.set_verbosity(verbosity)
    return 0


if __name__ == '__main__':
    sys.exit(main())

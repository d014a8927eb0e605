"""Weights in and out: official MAE, mmpretrain (MAE / ColorMAE), timm ``.pth`` / ``.safetensors`` files, and
Hugging Face transformers ViTMAE (``save_pretrained`` folders).

  # A checkpoint -> our params (layout and model detected from the names, shapes and config.json):
  python -m colormae_jax.tools.convert import mae_pretrain_vit_base_full.pth /tmp/mae_b16_params
  python -m colormae_jax.tools.convert import ./vit-mae-base /tmp/hf_b16_params   # config.json + model.safetensors
  # Our training run (or imported params) -> PyTorch / transformers:
  python -m colormae_jax.tools.convert export /tmp/mae_b16 /tmp/vit_b16_timm.pth --layout timm
  python -m colormae_jax.tools.convert export /tmp/mae_b16 /tmp/mae_b16.safetensors --layout mae --with_decoder
  python -m colormae_jax.tools.convert export /tmp/mae_b16 /tmp/mae_b16_hf --layout hf  # from_pretrained loads it

The conversions themselves are library code in :mod:`colormae_jax.interop.torch_hf` (re-exported here); our side is
read and written by :mod:`colormae_jax.interop.weights`. Key maps and what was verified: ``docs/interop.md``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Sequence

from colormae_jax import config_lib
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.interop import torch_hf as interop, weights
from colormae_jax.interop.torch_hf import (  # noqa: F401 - the Python API of this tool
    HF,
    LAYOUTS,
    WRAPPERS,
    ConversionError,
    ImportReport,
    _flat,
    detect_layout,
    export_hf,
    export_state_dict,
    export_torch,
    hf_to_official,
    import_source,
    import_torch,
    infer_config,
    layout_key,
    load_torch_file,
    official_keys,
    official_to_hf,
    path_str,
    read_state_dict,
)
from colormae_jax.models import mae as model_lib

# ------------------------------------------------------------------------------ command line

def _load_config_file(spec: str) -> Any:
    """'configs/imagenet.py:mask=random' -> that file's get_config('mask=random')."""
    try:
        return config_lib.load_config_file(spec)
    except FileNotFoundError as e:
        raise ConversionError(f'--config {spec}: {e} is not a file') from None


def _given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """MAEConfig fields from --variant, --image_size, --heads, --dec_*, --no_norm_pix_loss."""
    given: dict[str, Any] = {}
    if args.variant:
        try:
            name, patch = model_lib.parse_variant(args.variant)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        width, depth, mlp_dim, heads = model_lib.VARIANTS[name]
        given.update(patch=patch, width=width, depth=depth, mlp_dim=mlp_dim, heads=heads)
    for name in ('image_size', 'heads', 'dec_width', 'dec_depth', 'dec_heads'):
        if getattr(args, name) is not None:
            given[name] = getattr(args, name)
    if args.no_norm_pix_loss:
        given['norm_pix_loss'] = False
    return given


def _cmd_import(args: argparse.Namespace) -> None:
    if os.path.exists(args.dst):  # refuse before reading a large file
        raise ConversionError(f'{os.path.abspath(args.dst)} exists; choose a new directory (it is never overwritten).')
    given = _given_fields(args)
    if args.config and given:
        raise ConversionError('give the model either with --config or with --variant/--image_size/--heads/--dec_*, '
                              'not both')
    c = None
    if args.config:
        cfg = _load_config_file(args.config)
        c = model_lib.mae_config(cfg.model, cfg.data.image_size)
    params, report = import_source(args.src, c, layout=args.layout, seed=args.seed, **given)
    if args.config:
        report = dataclasses.replace(report, notes=[report.notes[0], f'model from --config {args.config}',
                                                    *report.notes[1:]])
    print(report.describe(verbose=args.verbose))
    print(f'Wrote {weights.save_params(args.dst, params, report.config)} ({weights.PARAMS_ITEM}/: orbax pure-dict '
          f'params, {weights.CONFIG_FILE}).')


def _cmd_export(args: argparse.Namespace) -> None:
    params, c, what = weights.load_any_params(args.src, args.step)
    if args.layout == HF:
        if args.dst.endswith(('.pth', '.safetensors')):
            raise ConversionError(f'--layout hf writes a folder (config.json + model.safetensors), not a file: '
                                  f'name a new directory instead of {args.dst}')
        sd = export_hf(params, c, args.dst, names=args.hf_names)
        print(f'Read {what}.\nWrote {os.path.abspath(args.dst)}: config.json + model.safetensors ({len(sd)} tensors, '
              f'transformers {args.hf_names} names, decoder included); load it with '
              f'transformers.ViTMAEForPreTraining.from_pretrained.')
        return
    sd = export_torch(params, c, args.dst, layout=args.layout, with_decoder=args.with_decoder)
    safetensors = args.dst.endswith('.safetensors')
    wrapper = None if safetensors else WRAPPERS[args.layout]
    carried = 'in its metadata' if safetensors else f'in {interop.meta_file(os.path.abspath(args.dst))}'
    print(f'Read {what}.\nWrote {os.path.abspath(args.dst)}: {len(sd)} tensors, {args.layout} layout'
          f'{", decoder included" if args.with_decoder else ", encoder only"}'
          f'{f", wrapped as {{{wrapper!r}: state_dict}}" if wrapper else ", a bare state dict"}; the model\'s '
          f'settings (heads included, for tools.convert import and init_from) {carried}.')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m colormae_jax.tools.convert',
                                description='\n\n'.join(__doc__.split('\n\n')[:2]).replace('``', ''),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    i = sub.add_parser('import', help='.pth / .safetensors (official MAE / mmpretrain / timm / transformers) or a '
                                      'transformers save_pretrained folder -> orbax params directory')
    i.add_argument('src', help='the .pth or .safetensors file, or a folder with config.json + model.safetensors')
    i.add_argument('dst', help='a new directory for the params (orbax) and mae_config.json')
    i.add_argument('--layout', choices=(*LAYOUTS, HF), help='key layout (default: detected)')
    i.add_argument('--config', help='a training config, e.g. configs/imagenet.py:variant=B/16 (default: a '
                                    "transformers folder's config.json, else inferred from the shapes)")
    i.add_argument('--variant', help='NAME/PATCH, e.g. B/16: width, depth, MLP, heads, patch')
    i.add_argument('--image_size', type=int, help='default: from pos_embed, else 224')
    i.add_argument('--heads', type=int, help='encoder heads (default: from the variant table)')
    i.add_argument('--dec_width', type=int, help='decoder width, when the checkpoint has no decoder (default 512)')
    i.add_argument('--dec_depth', type=int, help='decoder depth, when the checkpoint has no decoder (default 8)')
    i.add_argument('--dec_heads', type=int, help="decoder heads (default: 16, MAE's decoder)")
    i.add_argument('--no_norm_pix_loss', action='store_true', help='the model was trained on raw pixels')
    i.add_argument('--seed', type=int, default=0, help='initialises the parameters the checkpoint lacks')
    i.add_argument('--verbose', action='store_true', help='list every parameter left at its initialisation and '
                                                          'every unused source key (default: counts and a few)')
    e = sub.add_parser('export', help='our params -> .pth / .safetensors (official MAE / timm / mmpretrain layout) '
                                      'or a transformers ViTMAEForPreTraining folder (--layout hf)')
    e.add_argument('src', help='a training --workdir (or WORKDIR/checkpoints/STEP), or any source import reads')
    e.add_argument('dst', help='the .pth or .safetensors file to write (--layout hf: a new folder)')
    e.add_argument('--layout', choices=(*LAYOUTS, HF), default='mae', help='key layout (default: mae)')
    e.add_argument('--hf_names', choices=interop.HF_NAMES, default='v4',
                   help="--layout hf: transformers v4 key names (default: the Hub's, loaded by transformers 4 "
                        "and 5) or v5 (transformers 5's module names)")
    e.add_argument('--with_decoder', action='store_true', help='include the decoder (mae, mmpretrain; hf always)')
    e.add_argument('--step', type=int, help='training step to export (default: the newest)')
    for x in (p, i, e):
        x.add_argument('--helpshort', action='help', help=argparse.SUPPRESS)  # as the absl programs
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        (_cmd_import if args.command == 'import' else _cmd_export)(args)
    except (ConversionError, checkpoint.CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())

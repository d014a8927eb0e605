"""PyTorch checkpoint interop: official MAE, mmpretrain (MAE / ColorMAE) and timm ViT ``.pth`` files.

  # A PyTorch checkpoint -> our params (layout and model detected from the names and shapes):
  python -m colormae_jax.tools.convert import mae_pretrain_vit_base_full.pth /tmp/mae_b16_params
  # Our training run (or imported params) -> PyTorch, in the timm or the official MAE layout:
  python -m colormae_jax.tools.convert export /tmp/mae_b16 /tmp/vit_b16_timm.pth --layout timm
  python -m colormae_jax.tools.convert export /tmp/mae_b16 /tmp/mae_b16.pth --layout mae --with_decoder

Python: :func:`import_torch` (a ``.pth`` or a state dict -> our params and an :class:`ImportReport`),
:func:`export_torch` (our params -> a state dict / ``.pth``). Our side is read and written by
:mod:`colormae_jax.checkpoint` (``save_params`` / ``load_params``: the orbax directory ``import``
writes; ``load_training_params``: a checkpoint of ``colormae_jax.main``). The key maps, what was
verified and what was assumed are in ``docs/interop.md``.

Every name is mapped through the official MAE key (``models_mae.MaskedAutoencoderViT``): each of our
parameters has one official key (:func:`official_keys`), and :func:`layout_key` renames an official
key into another layout. Tensors change form in one of three ways: a Linear weight ``[out, in]`` is our
kernel transposed, the patch-embedding conv ``[D, C, p, p]`` is our kernel ``[p*p*C, D]`` (pixels in
:func:`colormae_jax.model.patchify` order), and everything else is copied. Position embeddings are fixed
sin-cos constants in our model: an imported ``pos_embed`` is only compared with ours, an exported one is
our table with MAE's zero row for the [CLS] token.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import pickle
import re
import sys
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from colormae_jax import checkpoint, model as model_lib, weights

LAYOUTS = ('mae', 'mmpretrain', 'timm')
# How each layout's files wrap the state dict (torch.save of {wrapper: state_dict}); timm: bare.
WRAPPERS = {'mae': 'model', 'mmpretrain': 'state_dict', 'timm': None}
TORCH_HINT = 'PyTorch is needed to read and write .pth files: pip install -e ".[torch]"'
POS_ATOL = 1e-5  # float32 tables computed in another order agree to ~1e-6

Params = dict  # a pure dict as nnx.to_pure_dict(nnx.split(MAE)[1]) gives
Path = tuple  # a parameter's path in Params, e.g. ('encoder', 'blocks', 0, 'attn', 'qkv', 'kernel')


class ConversionError(ValueError):
    """A checkpoint cannot be converted. The message says what is wrong and how to fix it."""


def _torch():
    try:
        import torch
    except ImportError:
        raise ConversionError(TORCH_HINT) from None
    return torch


def path_str(path: Iterable[Any]) -> str:
    """('encoder', 'blocks', 0, 'norm1', 'scale') -> 'encoder/blocks/0/norm1/scale'."""
    return '/'.join(str(p) for p in path)


# ------------------------------------------------------------------------------ key maps

class Entry(NamedTuple):
    """One parameter: its official MAE key, its path in our params, and how the tensor changes form."""
    key: str
    path: Path
    kind: str  # 'copy' | 'linear' (weight [out, in] <-> kernel [in, out]) | 'conv' (patch embedding)


def _linear(key: str, path: Path) -> list[Entry]:
    return [Entry(f'{key}.weight', (*path, 'kernel'), 'linear'), Entry(f'{key}.bias', (*path, 'bias'), 'copy')]


def _norm(key: str, path: Path) -> list[Entry]:
    return [Entry(f'{key}.weight', (*path, 'scale'), 'copy'), Entry(f'{key}.bias', (*path, 'bias'), 'copy')]


def _blocks(key: str, path: Path, depth: int) -> list[Entry]:
    out = []
    for i in range(depth):
        k, p = f'{key}.{i}', (*path, i)
        out += (_norm(f'{k}.norm1', (*p, 'norm1')) + _linear(f'{k}.attn.qkv', (*p, 'attn', 'qkv')) +
                _linear(f'{k}.attn.proj', (*p, 'attn', 'proj')) + _norm(f'{k}.norm2', (*p, 'norm2')) +
                _linear(f'{k}.mlp.fc1', (*p, 'mlp', 'fc1')) + _linear(f'{k}.mlp.fc2', (*p, 'mlp', 'fc2')))
    return out


def official_keys(c: model_lib.MAEConfig, *, decoder: bool = True) -> list[Entry]:
    """Every parameter of :class:`colormae_jax.model.MAE` with its key in the official MAE state dict."""
    enc = ('encoder',)
    out = [Entry('cls_token', (*enc, 'cls_token'), 'copy'),
           Entry('patch_embed.proj.weight', (*enc, 'patch_embed', 'kernel'), 'conv'),
           Entry('patch_embed.proj.bias', (*enc, 'patch_embed', 'bias'), 'copy')]
    out += _blocks('blocks', (*enc, 'blocks'), c.depth) + _norm('norm', (*enc, 'norm'))
    if decoder:
        dec = ('decoder',)
        out += _linear('decoder_embed', (*dec, 'embed')) + [Entry('mask_token', (*dec, 'mask_token'), 'copy')]
        out += _blocks('decoder_blocks', (*dec, 'blocks'), c.dec_depth) + _norm('decoder_norm', (*dec, 'norm'))
        out += _linear('decoder_pred', (*dec, 'pred'))
    return out


# Official MAE -> mmpretrain (MAEViT backbone + MAEPretrainDecoder neck; names checked against the
# mmpretrain source, see docs/interop.md). Block internals first, then the prefixes.
_MMPRETRAIN_BLOCK = (('.norm1.', '.ln1.'), ('.norm2.', '.ln2.'), ('.mlp.fc1.', '.ffn.layers.0.0.'),
                     ('.mlp.fc2.', '.ffn.layers.1.'))
_MMPRETRAIN_PREFIX = ((r'^patch_embed\.proj\.', 'backbone.patch_embed.projection.'),
                      (r'^(cls_token|pos_embed)$', r'backbone.\1'),
                      (r'^blocks\.', 'backbone.layers.'),
                      (r'^norm\.', 'backbone.ln1.'),
                      (r'^decoder_norm\.', 'neck.ln1.'),
                      (r'^(mask_token|decoder_pos_embed|decoder_embed\.|decoder_blocks\.|decoder_pred\.)', r'neck.\1'))


def layout_key(key: str, layout: str) -> str:
    """The name of the official MAE key ``key`` in ``layout`` (timm uses the official names)."""
    if layout not in LAYOUTS:
        raise ConversionError(f'unknown layout {layout!r}; valid: {LAYOUTS}')
    if layout != 'mmpretrain':
        return key
    if key.startswith(('blocks.', 'decoder_blocks.')):
        for old, new in _MMPRETRAIN_BLOCK:
            key = key.replace(old, new)
    for pattern, repl in _MMPRETRAIN_PREFIX:
        key, n = re.subn(pattern, repl, key)
        if n:
            break
    return key


def _to_ours(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == 'linear':
        return w.T
    if kind == 'conv':  # [D, C, p, p] -> [p, p, C, D] -> [p*p*C, D]: patchify's pixel order
        return w.transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    return w


def _to_torch(kind: str, x: np.ndarray, c: model_lib.MAEConfig) -> np.ndarray:
    if kind == 'linear':
        return x.T
    if kind == 'conv':
        return x.reshape(c.patch, c.patch, c.channels, -1).transpose(3, 2, 0, 1)
    return x


def _torch_shape(kind: str, shape: tuple, c: model_lib.MAEConfig) -> tuple:
    if kind == 'linear':
        return tuple(shape[::-1])
    if kind == 'conv':
        return (shape[1], c.channels, c.patch, c.patch)
    return tuple(shape)


def _check_pos(key: str, value: np.ndarray, grid: int, dim: int) -> str | None:
    """None if the checkpoint's table is ours; otherwise a note saying how it differs."""
    want = model_lib.sincos_table_with_cls(grid, dim)
    if tuple(value.shape) != want.shape:
        return (f'{key} has shape {tuple(value.shape)}, ours for a {grid}x{grid} grid is {want.shape}: the checkpoint '
                f'was made for another image size. It is not imported (our table is fixed), so the model runs '
                f'with the sin-cos table of the configured image size.')
    diff = float(np.abs(value - want).max())
    if diff <= POS_ATOL:
        return None
    swapped = want[:, 1:].reshape(grid, grid, dim).transpose(1, 0, 2).reshape(1, -1, dim)
    if np.abs(value[:, 1:] - swapped).max() <= POS_ATOL and np.abs(value[:, :1]).max() <= POS_ATOL:
        return (f'{key} is our sin-cos table with rows and columns swapped (mmpretrain builds it with '
                f'meshgrid indexing="ij", so its first half embeds the row, MAE\'s the column). Our model uses '
                f'MAE\'s order, so its outputs will differ from the PyTorch model\'s until fine-tuning or continued '
                f'pre-training adapts the weights.')
    return (f'{key} differs from our fixed sin-cos table (max abs difference {diff:.3g}): it was learned or '
            f'interpolated. It is not imported; the model runs with the fixed sin-cos table.')


# ------------------------------------------------------------------------------ reading .pth files

def load_torch_file(path: str) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)`` with errors that say what to do.

    ``argparse.Namespace`` (the ``args`` entry of checkpoints saved by the official MAE scripts) is
    allowed; any other Python object is refused, as weights_only intends.
    """
    torch = _torch()
    if not os.path.isfile(path):
        raise ConversionError(f'{path}: no such file')
    size = os.path.getsize(path)
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r'Unsupported global: GLOBAL ([\w.]+)', str(e))
        if found:
            raise ConversionError(
                f'{path} was not loaded: it would run code when loaded (it holds Python objects besides tensors, '
                f'first: {found.group(1)}, which torch.load(weights_only=True) refuses to build). Only if you trust '
                f'the file and where it came from, keep its tensors in a clean copy and import that: '
                f'python -c "import torch; c = torch.load(\'{path}\', weights_only=False); '
                f'torch.save(c.get(\'model\', c.get(\'state_dict\', c)), \'clean.pth\')"') from None
        raise _corrupt(path, size, e) from e
    except Exception as e:  # zip reader / EOF errors of truncated or corrupt files
        raise _corrupt(path, size, e) from e


def _corrupt(path: str, size: int, e: BaseException) -> ConversionError:
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return ConversionError(
        f'{path} ({size} bytes) is not a readable PyTorch checkpoint ({type(e).__name__}: {first}). It is '
        f'probably truncated or corrupt, e.g. an interrupted download or copy: fetch it again and compare its '
        f'size and checksum with the source.')


def _is_array(x: Any) -> bool:
    return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _numpy(x: Any) -> Any:
    """torch tensors -> numpy (floating point as float32); other values unchanged."""
    if hasattr(x, 'detach') and hasattr(x, 'is_floating_point'):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return x


def read_state_dict(source: str | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A ``.pth`` path or a loaded checkpoint -> (state dict of numpy arrays, where it came from).

    Unwraps ``{'model': ...}`` (official MAE) and ``{'state_dict': ...}`` (mmpretrain / mmengine),
    and strips a ``module.`` prefix (DistributedDataParallel). Refuses a tensor with NaN or
    infinite values, naming the first such key.
    """
    where = source if isinstance(source, str) else 'a state dict'
    obj = load_torch_file(source) if isinstance(source, str) else source
    if not isinstance(obj, Mapping):
        raise ConversionError(f'{where} holds a {type(obj).__name__}, not a dict of tensors (a state dict). '
                              f'Save the model\'s state_dict(), not the model or a list.')
    for wrapper in ('model', 'state_dict'):
        if isinstance(obj.get(wrapper), Mapping):
            obj, where = obj[wrapper], f"{where} ['{wrapper}']"
            break
    sd = {str(k): _numpy(v) for k, v in obj.items()}
    if not any(_is_array(v) for v in sd.values()):
        raise ConversionError(f'{where} holds no tensors; its entries are {sorted(sd)[:10]}. Expected a state dict, '
                              f"or a checkpoint with a 'model' or 'state_dict' entry.")
    for k, v in sd.items():  # in the file's order: the first bad key is named
        if _is_array(v) and np.issubdtype(v.dtype, np.floating) and not np.isfinite(v).all():
            bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
            raise ConversionError(
                f'{where}: {k!r} holds NaN or infinite values ({bad} of {np.size(v)}); the weights are broken '
                f'(e.g. saved after the training diverged) and are not imported: use an earlier checkpoint of '
                f'that run, or fetch the file again.')
    if all(k.startswith('module.') for k in sd):
        sd = {k[len('module.'):]: v for k, v in sd.items()}
    return sd, where


def detect_layout(state_dict: Mapping[str, Any]) -> str:
    """'mmpretrain' (backbone.* / neck.*), 'mae' (official names with a decoder) or 'timm' (official
    encoder names only: timm ViTs and MAE's encoder-only releases). Raises if none fits."""
    keys = list(state_dict)
    if any(k.startswith(('backbone.', 'neck.')) for k in keys):
        return 'mmpretrain'
    if 'cls_token' in state_dict and 'patch_embed.proj.weight' in state_dict:
        has_decoder = any(k.startswith('decoder_') or k == 'mask_token' for k in keys)
        return 'mae' if has_decoder else 'timm'
    raise ConversionError(
        f'unknown key layout (first keys: {keys[:6]}). Supported: official MAE / timm ViT (cls_token, '
        f'patch_embed.proj.weight, blocks.N..., decoder_*), mmpretrain MAE (backbone.*, neck.*). If the names '
        f'match one of them under a prefix, strip it first; otherwise pass layout=... explicitly.')


# ------------------------------------------------------------------------------ the model from the shapes

def _block_count(sd: Mapping[str, Any], layout: str, decoder: bool) -> int:
    first = layout_key(('decoder_blocks' if decoder else 'blocks') + '.0.norm1.weight', layout)
    prefix = re.escape(first[:first.index('.0.')])
    found = {int(m.group(1)) for k in sd if (m := re.match(prefix + r'\.(\d+)\.', k))}
    return max(found) + 1 if found else 0


def infer_config(state_dict: Mapping[str, Any], layout: str | None = None,
                 **given: Any) -> tuple[model_lib.MAEConfig, list[str]]:
    """The :class:`MAEConfig` a state dict's shapes describe, and notes on what was assumed.

    ``given`` (MAEConfig fields) wins over the shapes. Heads are not in the shapes: unless given, the
    encoder's come from :data:`colormae_jax.model.VARIANTS` (matched on width, depth and MLP width) and
    the decoder's from MAE's published decoder (512 wide, 8 deep, 16 heads). The image size comes from
    ``pos_embed`` (224 if there is none).
    """
    layout = layout or detect_layout(state_dict)

    def shape(key: str) -> tuple:
        k = layout_key(key, layout)
        if k not in state_dict or not _is_array(state_dict[k]):
            raise ConversionError(f'{k!r} is missing, so the model cannot be inferred from this {layout} checkpoint.')
        return tuple(state_dict[k].shape)

    width, channels, patch, _ = shape('patch_embed.proj.weight')
    f: dict[str, Any] = dict(width=width, channels=channels, patch=patch, depth=_block_count(state_dict, layout, False),
                             mlp_dim=shape('blocks.0.mlp.fc1.weight')[0])
    pos = state_dict.get(layout_key('pos_embed', layout))
    tokens = pos.shape[-2] - 1 if _is_array(pos) and pos.ndim >= 2 else 0  # [1, 1+N, D]
    grid = math.isqrt(tokens)
    f['image_size'] = grid * patch if grid and grid * grid == tokens else 224
    dec_depth = _block_count(state_dict, layout, True)
    if dec_depth:
        dec_width = shape('mask_token')[-1]
        f.update(dec_width=dec_width, dec_depth=dec_depth,
                 dec_mlp_ratio=shape('decoder_blocks.0.mlp.fc1.weight')[0] // dec_width)
    f.update(given)
    notes = []
    if 'heads' not in f:
        names = [n for n, v in model_lib.VARIANTS.items() if v[:3] == (f['width'], f['depth'], f['mlp_dim'])]
        if not names:
            raise ConversionError(
                f'width {f["width"]}, depth {f["depth"]}, MLP {f["mlp_dim"]} is none of our variants '
                f'{sorted(model_lib.VARIANTS)}, and the number of heads is not in the shapes: give it '
                f'(--heads N, or heads=N), or a variant (--variant NAME/{f["patch"]}).')
        f['heads'] = model_lib.VARIANTS[names[0]][3]
        notes.append(f'encoder heads {f["heads"]}: variant {names[0]}/{f["patch"]} (heads are not in the shapes)')
    if 'dec_heads' not in f:
        if (f.get('dec_width', 512), f.get('dec_depth', 8)) != (512, 8):
            raise ConversionError(
                f'the decoder ({f["dec_width"]} wide, {f["dec_depth"]} deep) is not MAE\'s published one '
                f'(512 x 8, 16 heads), and heads are not in the shapes: give them (--dec_heads N, or dec_heads=N).')
        f['dec_heads'] = 16
        if dec_depth:
            notes.append('decoder heads 16: MAE\'s published decoder (heads are not in the shapes)')
    try:
        return model_lib.MAEConfig(**f), notes
    except TypeError as e:
        fields = [x.name for x in dataclasses.fields(model_lib.MAEConfig)]
        raise ConversionError(f'{e}; valid fields: {fields}') from None


def _flat(params: Params) -> dict[Path, Any]:
    """{('encoder', 'blocks', 0, ...): leaf}."""
    return traverse_util.flatten_dict(params)


# ------------------------------------------------------------------------------ import

@dataclasses.dataclass
class ImportReport:
    """What :func:`import_torch` did. Paths are ours ('encoder/blocks/0/attn/qkv/kernel'), keys the source's."""
    source: str
    layout: str
    config: model_lib.MAEConfig
    filled: list[str]
    unfilled: list[str]  # left at their initialisation
    unused: list[str]  # source keys that went nowhere
    notes: list[str]

    def __str__(self) -> str:
        c = self.config
        lines = [f'Read {self.source}: layout {self.layout}.',
                 f'Model: image {c.image_size}, patch {c.patch}, encoder {c.width} wide x {c.depth} deep, MLP '
                 f'{c.mlp_dim}, {c.heads} heads; decoder {c.dec_width} x {c.dec_depth}, {c.dec_heads} heads.',
                 f'Filled {len(self.filled)} of {len(self.filled) + len(self.unfilled)} parameter arrays.']
        if self.unfilled:
            lines.append(f'Left at their initialisation ({len(self.unfilled)}):')
            lines += [f'  {p}' for p in self.unfilled]
        if self.unused:
            lines.append(f'Source keys not used ({len(self.unused)}):')
            lines += [f'  {k}' for k in self.unused]
        lines += [f'Note: {n}' for n in self.notes]
        return '\n'.join(lines)


def import_torch(source: str | Mapping[str, Any], mae_config: model_lib.MAEConfig | None = None, *,
                 layout: str | None = None, seed: int = 0) -> tuple[Params, ImportReport]:
    """A PyTorch checkpoint -> (our params as a pure dict, an :class:`ImportReport`).

    ``source``: a ``.pth`` path or a loaded checkpoint / state dict (torch tensors or numpy arrays).
    ``mae_config``: the model to fill; None infers it from the shapes (:func:`infer_config`).
    ``layout``: 'mae', 'mmpretrain' or 'timm'; None detects it. Parameters the checkpoint lacks (the
    decoder, for encoder-only files) keep the initialisation of ``MAE(mae_config, rngs=nnx.Rngs(seed))``
    and are listed in the report. A tensor whose shape does not fit, or a block count that differs from
    the config's, raises :class:`ConversionError` naming the key.
    """
    sd, where = read_state_dict(source)
    layout = layout or detect_layout(sd)
    notes: list[str] = []
    if mae_config is None:
        mae_config, notes = infer_config(sd, layout)
    c = mae_config
    for decoder, name, depth in ((False, 'encoder', c.depth), (True, 'decoder', c.dec_depth)):
        found = _block_count(sd, layout, decoder)
        if found and found != depth:
            raise ConversionError(f'the checkpoint has {found} {name} blocks, the config {depth}: use the config '
                                  f'(variant / decoder depth) the checkpoint was trained with.')
    abstract = _flat(model_lib.abstract_mae(c)[1])
    flat: dict[Path, Any] = {}
    used: set[str] = set()
    for e in official_keys(c):
        key = layout_key(e.key, layout)
        if key not in sd:
            continue
        w, want = sd[key], _torch_shape(e.kind, abstract[e.path].shape, c)
        if not _is_array(w) or tuple(w.shape) != want:
            found = tuple(w.shape) if _is_array(w) else type(w).__name__
            raise ConversionError(
                f'{key!r} has shape {found}; the config needs {want} for {path_str(e.path)} (image {c.image_size}, '
                f'patch {c.patch}, width {c.width}, MLP {c.mlp_dim}, decoder width {c.dec_width}). Use the config '
                f'the checkpoint was trained with.')
        flat[e.path] = jnp.asarray(_to_ours(e.kind, np.asarray(w, np.float32)))
        used.add(key)
    for key, dim in (('pos_embed', c.width), ('decoder_pos_embed', c.dec_width)):
        key = layout_key(key, layout)
        if _is_array(sd.get(key)):
            used.add(key)
            if note := _check_pos(key, sd[key], c.grid, dim):
                notes.append(note)
    if not any(p[0] == 'encoder' for p in flat):
        raise ConversionError(f'no encoder parameter was found in {where} ({layout} layout); its keys start with '
                              f'{sorted(sd)[:6]}.')
    unfilled = [p for p in abstract if p not in flat]
    if unfilled:
        init = _flat(model_lib.init_mae_params(c, seed))
        flat.update({p: init[p] for p in unfilled})
    report = ImportReport(where, layout, c, [path_str(p) for p in abstract if p not in unfilled],
                          [path_str(p) for p in unfilled], sorted(set(sd) - used), notes)
    return traverse_util.unflatten_dict({p: flat[p] for p in abstract}), report


# ------------------------------------------------------------------------------ export

def export_torch(params: Params, mae_config: model_lib.MAEConfig, path: str | None = None, *,
                 layout: str = 'mae', with_decoder: bool = False) -> dict[str, Any]:
    """Our params -> a PyTorch state dict (``{key: torch.Tensor}``, float32), written to ``path`` if given.

    'mae': the official ``MaskedAutoencoderViT`` names, saved as ``{'model': state_dict}`` like MAE's
    releases; with ``with_decoder`` it loads with ``strict=True`` into ``MaskedAutoencoderViT``, without
    it is an encoder-only file like ``mae_pretrain_vit_base.pth``. 'timm': a bare state dict for timm's
    ``VisionTransformer`` (encoder only; no ``head.*``: build the model with ``num_classes=0`` or load with
    ``strict=False``). 'mmpretrain': the MAE names of mmpretrain, saved as ``{'state_dict': ...}``.
    ``pos_embed`` / ``decoder_pos_embed`` are our sin-cos tables with a zero [CLS] row (``pos_embed``:
    the learned table of a fine-tuned encoder, if it has one).
    """
    torch = _torch()
    layout_key('cls_token', layout)  # refuses an unknown layout
    if with_decoder and layout == 'timm':
        raise ConversionError("timm's VisionTransformer has no decoder: export the decoder with --layout mae "
                              "(or mmpretrain), or leave out --with_decoder.")
    c = mae_config
    have = {tuple(str(p) for p in path): np.asarray(x) for path, x in _flat(params).items()}
    abstract = _flat(model_lib.abstract_mae(c)[1])
    sd: dict[str, Any] = {}

    def put(key: str, x: np.ndarray) -> None:
        sd[layout_key(key, layout)] = torch.from_numpy(np.array(x, np.float32, order='C'))  # a writable copy

    for e in official_keys(c, decoder=with_decoder):
        x = have.get(tuple(str(p) for p in e.path))
        want = abstract[e.path].shape
        if x is None or x.shape != want:
            found = 'nothing' if x is None else x.shape
            raise ConversionError(f'params have {found} at {path_str(e.path)}, the config needs {want}: pass the '
                                  f'MAEConfig the params were made with.')
        put(e.key, _to_torch(e.kind, x, c))
        if e.key == 'cls_token':  # a fine-tuned encoder's learned table, else the sin-cos one
            learned = have.get(tuple(str(p) for p in e.path[:-1]) + ('pos_embed',))
            put('pos_embed', model_lib.sincos_table_with_cls(c.grid, c.width) if learned is None else learned)
        elif e.key == 'mask_token':
            put('decoder_pos_embed', model_lib.sincos_table_with_cls(c.grid, c.dec_width))
    if path is not None:
        wrapper = WRAPPERS[layout]
        torch.save({wrapper: sd} if wrapper else sd, path)
    return sd


# ------------------------------------------------------------------------------ command line

def _load_config_file(spec: str) -> Any:
    """'configs/imagenet.py:mask=random' -> that file's get_config('mask=random')."""
    path, _, arg = spec.partition(':')
    if not os.path.isfile(path):
        raise ConversionError(f'--config {spec}: {path} is not a file')
    module_spec = importlib.util.spec_from_file_location(f'_convert_config_{abs(hash(path))}', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


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
    sd, where = read_state_dict(args.src)
    layout = args.layout or detect_layout(sd)
    notes = [f'layout {"given" if args.layout else "detected from the key names"}']
    given = _given_fields(args)
    if args.config and given:
        raise ConversionError('give the model either with --config or with --variant/--image_size/--heads/--dec_*, '
                              'not both')
    if args.config:
        cfg = _load_config_file(args.config)
        c = model_lib.mae_config(cfg.model, cfg.data.image_size)
        notes.append(f'model from --config {args.config}')
    else:
        c, inferred = infer_config(sd, layout, **given)
        notes += inferred
    params, report = import_torch(sd, c, layout=layout, seed=args.seed)
    report = dataclasses.replace(report, source=where, notes=notes + report.notes)
    print(report)
    print(f'Wrote {weights.save_params(args.dst, params, c)} ({weights.PARAMS_ITEM}/: orbax pure-dict params, '
          f'{weights.CONFIG_FILE}).')


def _cmd_export(args: argparse.Namespace) -> None:
    params, c, what = weights.load_any_params(args.src, args.step)
    sd = export_torch(params, c, args.dst, layout=args.layout, with_decoder=args.with_decoder)
    wrapper = WRAPPERS[args.layout]
    print(f'Read {what}.\nWrote {os.path.abspath(args.dst)}: {len(sd)} tensors, {args.layout} layout'
          f'{", decoder included" if args.with_decoder else ", encoder only"}'
          f'{f", wrapped as {{{wrapper!r}: state_dict}}" if wrapper else ", a bare state dict"}.')


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python -m colormae_jax.tools.convert',
                                description='\n\n'.join(__doc__.split('\n\n')[:2]).replace('``', ''),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='command', required=True)
    i = sub.add_parser('import', help='.pth (official MAE / mmpretrain / timm) -> orbax params directory')
    i.add_argument('src', help='the .pth file')
    i.add_argument('dst', help='a new directory for the params (orbax) and mae_config.json')
    i.add_argument('--layout', choices=LAYOUTS, help='key layout (default: detected)')
    i.add_argument('--config', help='a training config, e.g. configs/imagenet.py:variant=B/16 (default: the '
                                    'model is inferred from the shapes)')
    i.add_argument('--variant', help='NAME/PATCH, e.g. B/16: width, depth, MLP, heads, patch')
    i.add_argument('--image_size', type=int, help='default: from pos_embed, else 224')
    i.add_argument('--heads', type=int, help='encoder heads (default: from the variant table)')
    i.add_argument('--dec_width', type=int, help='decoder width, when the checkpoint has no decoder (default 512)')
    i.add_argument('--dec_depth', type=int, help='decoder depth, when the checkpoint has no decoder (default 8)')
    i.add_argument('--dec_heads', type=int, help="decoder heads (default: 16, MAE's decoder)")
    i.add_argument('--no_norm_pix_loss', action='store_true', help='the model was trained on raw pixels')
    i.add_argument('--seed', type=int, default=0, help='initialises the parameters the checkpoint lacks')
    e = sub.add_parser('export', help='our params -> .pth (official MAE / timm / mmpretrain layout)')
    e.add_argument('src', help='a training --workdir (or its checkpoints/ folder), or a directory written by import')
    e.add_argument('dst', help='the .pth file to write')
    e.add_argument('--layout', choices=LAYOUTS, default='mae', help='key layout (default: mae)')
    e.add_argument('--with_decoder', action='store_true', help='include the decoder (mae, mmpretrain)')
    e.add_argument('--step', type=int, help='training step to export (default: the newest)')
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

"""Weights in other frameworks' layouts -> our params, and back: official MAE, mmpretrain (MAE / ColorMAE),
timm and Hugging Face transformers ``ViTMAEForPreTraining``, in ``.pth`` or ``.safetensors`` files.

:func:`import_source` (a ``.pth`` / ``.safetensors`` file, a ``save_pretrained`` folder, or a state dict
-> our params and an :class:`ImportReport`), :func:`import_torch` (the same for a state dict whose model is
given), :func:`export_state_dict` / :func:`export_torch` (our params -> a state dict / a file),
:func:`export_hf` (our params -> a folder ``ViTMAEForPreTraining.from_pretrained`` loads). The command
line is :mod:`colormae_jax.tools.convert`; :mod:`colormae_jax.interop.weights` reads these sources as
``init_from``. Key maps, what was verified and what was assumed: ``docs/interop.md``.

Every name is mapped through the official MAE key (``models_mae.MaskedAutoencoderViT``): each of our
parameters has one official key (:func:`official_keys`), and :func:`layout_key` renames an official
key into another layout (Hugging Face's separate q / k / v go through :func:`hf_to_official` /
:func:`official_to_hf`). Tensors change form in one of three ways: a Linear weight ``[out, in]`` is our
kernel transposed, the patch-embedding conv ``[D, C, p, p]`` is our kernel ``[p*p*C, D]`` (pixels in
:func:`colormae_jax.models.mae.patchify` order), and everything else is copied. Position embeddings are fixed
sin-cos constants in our model: an imported ``pos_embed`` is only compared with ours, an exported one is
our table with MAE's zero row for the [CLS] token.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import re
from typing import Any, Iterable, Mapping, NamedTuple

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from colormae_jax.models import mae as model_lib

LAYOUTS = ('mae', 'mmpretrain', 'timm')  # renamed key by key from the official names
HF = 'hf'  # Hugging Face transformers ViTMAE (v4 or v5 names), through hf_to_official / official_to_hf
# How each layout's files wrap the state dict (torch.save of {wrapper: state_dict}); timm: bare.
WRAPPERS = {'mae': 'model', 'mmpretrain': 'state_dict', 'timm': None}
TORCH_HINT = 'PyTorch is needed to read and write .pth files: pip install -e ".[torch]"'
HF_WEIGHTS, HF_INDEX, HF_CONFIG = 'model.safetensors', 'model.safetensors.index.json', 'config.json'
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
    """Every parameter of :class:`colormae_jax.models.mae.MAE` with its key in the official MAE state dict."""
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
    if not np.any(value):
        return (f'{key} is all zeros (transformers 5 zeroes decoder_pos_embed when it builds ViTMAEForPreTraining '
                f'from a config rather than loading weights): our model uses the sin-cos table, so its outputs '
                f'will differ from that model\'s.')
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


def _corrupt(path: str, size: int, e: BaseException, what: str = 'PyTorch checkpoint') -> ConversionError:
    first = (str(e).strip().splitlines() or [''])[0][:200]
    return ConversionError(
        f'{path} ({size} bytes) is not a readable {what} ({type(e).__name__}: {first}). It is '
        f'probably truncated or corrupt, e.g. an interrupted download or copy: fetch it again and compare its '
        f'size and checksum with the source.')


def load_safetensors(path: str) -> dict[str, np.ndarray]:
    """A ``.safetensors`` file -> {name: numpy array} (``safetensors.numpy``; bfloat16 / float16 tensors,
    which numpy cannot hold or which we keep in float32, go through torch when it is installed)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file
    if not os.path.isfile(path):
        raise ConversionError(f'{path}: no such file')
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise _corrupt(path, os.path.getsize(path), e, 'safetensors file') from e
    except (TypeError, ValueError) as e:  # a dtype numpy lacks (bfloat16)
        try:
            with safe_open(path, framework='pt') as f:
                return {k: _numpy(f.get_tensor(k)) for k in f.keys()}
        except ImportError:
            raise ConversionError(f'{path} holds tensors numpy cannot read ({e}); {TORCH_HINT}') from None


def _hf_weight_files(folder: str) -> list[str]:
    """The safetensors files of a ``save_pretrained`` folder (one file, or the shards its index names)."""
    index = os.path.join(folder, HF_INDEX)
    if os.path.isfile(os.path.join(folder, HF_WEIGHTS)):
        return [os.path.join(folder, HF_WEIGHTS)]
    if os.path.isfile(index):
        with open(index) as f:
            return [os.path.join(folder, n) for n in sorted(set(json.load(f)['weight_map'].values()))]
    found = sorted(os.listdir(folder))
    raise ConversionError(f'{folder} has no {HF_WEIGHTS} (nor {HF_INDEX}); it holds {found[:8]}. Expected a '
                          f'folder written by save_pretrained (config.json + model.safetensors), a .pth or a '
                          f'.safetensors file.')


def _load_path(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        sd: dict[str, Any] = {}
        for f in _hf_weight_files(path):
            sd.update(load_safetensors(f))
        return sd
    if path.endswith('.safetensors'):
        return load_safetensors(path)
    return load_torch_file(path)


def _hf_config_path(source: str) -> str:
    folder = source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))
    return os.path.join(os.path.abspath(folder), HF_CONFIG)


def read_hf_config(source: str) -> dict | None:
    """The ``config.json`` of a ``save_pretrained`` folder (or next to a ``.safetensors`` file), if it
    describes a ViTMAE (``model_type`` 'vit_mae'); None when there is none."""
    path = _hf_config_path(source)
    if not os.path.isfile(path) or not (os.path.isdir(source) or source.endswith('.safetensors')):
        return None
    try:
        with open(path) as f:
            cfg = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f'{path} is not readable JSON ({e}); fix or remove it') from None
    if cfg.get('model_type') != 'vit_mae':
        if os.path.isdir(source):
            raise ConversionError(f'{path} describes a {cfg.get("model_type")!r} model, not a ViTMAE (model_type '
                                  f'"vit_mae"); only ViTMAEForPreTraining / ViTMAEModel folders are read.')
        return None
    return cfg


def _is_array(x: Any) -> bool:
    return hasattr(x, 'shape') and hasattr(x, 'dtype')


def _numpy(x: Any) -> Any:
    """torch tensors -> numpy (floating point as float32); other values unchanged."""
    if hasattr(x, 'detach') and hasattr(x, 'is_floating_point'):
        x = x.detach().cpu()
        return (x.float() if x.is_floating_point() else x).numpy()
    return x


def read_state_dict(source: str | Mapping[str, Any]) -> tuple[dict[str, Any], str]:
    """A ``.pth`` / ``.safetensors`` path, a ``save_pretrained`` folder or a loaded checkpoint -> (state
    dict of numpy arrays, where it came from).

    Unwraps ``{'model': ...}`` (official MAE) and ``{'state_dict': ...}`` (mmpretrain / mmengine),
    and strips a ``module.`` prefix (DistributedDataParallel). Refuses a tensor with NaN or
    infinite values, naming the first such key.
    """
    where = source if isinstance(source, str) else 'a state dict'
    obj = _load_path(source) if isinstance(source, str) else source
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
    """'hf' (transformers ViTMAE: vit.embeddings.*), 'mmpretrain' (backbone.* / neck.*), 'mae' (official
    names with a decoder) or 'timm' (official encoder names only: timm ViTs and MAE's encoder-only
    releases). Raises if none fits."""
    keys = list(state_dict)
    if any(k.startswith(('vit.embeddings.', 'embeddings.patch_embeddings.')) for k in keys):
        return HF
    if any(k.startswith(('backbone.', 'neck.')) for k in keys):
        return 'mmpretrain'
    if 'cls_token' in state_dict and 'patch_embed.proj.weight' in state_dict:
        has_decoder = any(k.startswith('decoder_') or k == 'mask_token' for k in keys)
        return 'mae' if has_decoder else 'timm'
    raise ConversionError(
        f'unknown key layout (first keys: {keys[:6]}). Supported: official MAE / timm ViT (cls_token, '
        f'patch_embed.proj.weight, blocks.N..., decoder_*), mmpretrain MAE (backbone.*, neck.*), Hugging Face '
        f'ViTMAE (vit.embeddings.*, vit.layers.N... or vit.encoder.layer.N...). If the names '
        f'match one of them under a prefix, strip it first; otherwise pass layout=... explicitly.')


# ------------------------------------------------------------------------------ Hugging Face transformers ViTMAE

# Official block suffix -> (v5 suffix, v4 suffix); q / k / v are the thirds of the official qkv.
_HF_BLOCK = {'norm1': ('layernorm_before', 'layernorm_before'), 'norm2': ('layernorm_after', 'layernorm_after'),
             'attn.proj': ('attention.o_proj', 'attention.output.dense'),
             'mlp.fc1': ('mlp.fc1', 'intermediate.dense'), 'mlp.fc2': ('mlp.fc2', 'output.dense')}
_HF_QKV = (('attention.q_proj', 'attention.attention.query'), ('attention.k_proj', 'attention.attention.key'),
           ('attention.v_proj', 'attention.attention.value'))
_HF_TOP = {'cls_token': 'vit.embeddings.cls_token', 'pos_embed': 'vit.embeddings.position_embeddings',
           'patch_embed.proj': 'vit.embeddings.patch_embeddings.projection', 'norm': 'vit.layernorm',
           'mask_token': 'decoder.mask_token', 'decoder_pos_embed': 'decoder.decoder_pos_embed',
           'decoder_embed': 'decoder.decoder_embed', 'decoder_norm': 'decoder.decoder_norm',
           'decoder_pred': 'decoder.decoder_pred'}
_HF_BLOCKS = {'blocks': ('vit.layers', 'vit.encoder.layer'), 'decoder_blocks': ('decoder.decoder_layers',) * 2}
HF_NAMES = ('v5', 'v4')  # transformers >= 5 writes v5 names; Hub checkpoints such as facebook/vit-mae-base are v4


def hf_key_names(state_dict: Mapping[str, Any]) -> str:
    """'v4' (``vit.encoder.layer.N.attention.attention.query``) or 'v5' (``vit.layers.N.attention.q_proj``)."""
    return 'v4' if any('.attention.attention.' in k or k.startswith('vit.encoder.layer.') for k in state_dict) \
        else 'v5'


def _hf_reverse(names: str) -> tuple[dict[str, str], dict[str, tuple[str, int]]]:
    i = HF_NAMES.index(names)
    block = {v[i]: k for k, v in _HF_BLOCK.items()}
    qkv = {v[i]: ('attn.qkv', j) for j, v in enumerate(_HF_QKV)}
    return block, qkv


def hf_to_official(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A transformers ViTMAE state dict (v4 or v5 names; ``ViTMAEForPreTraining``'s, or ``ViTMAEModel``'s
    without the ``vit.`` prefix) -> (the official MAE state dict, notes).

    transformers 5 (5.24) saves v4 names, with the decoder's blocks as ``decoder.decoder_encoder.layer.N``
    (its reverse renaming of ``encoder.layer.`` -> ``layers.`` also hits ``decoder_layers.``); read too.
    q / k / v are concatenated into ``qkv`` (zero biases if ``qkv_bias=False``); HF adds
    ``position_embeddings[:, 0]`` to the [CLS] token, so a non-zero first row is folded into
    ``cls_token`` (the same sum) and zeroed. Keys that map nowhere keep their names (reported unused).
    """
    if not any(k.startswith('vit.') for k in state_dict):  # ViTMAEModel.save_pretrained: no 'vit.' prefix
        state_dict = {('vit.' + k if k.startswith(('embeddings.', 'encoder.', 'layers.', 'layernorm.')) else k): v
                      for k, v in state_dict.items()}
    names = hf_key_names(state_dict)
    block, qkv = _hf_reverse(names)
    top = {v: k for k, v in _HF_TOP.items()}
    prefixes = {v[HF_NAMES.index(names)]: k for k, v in _HF_BLOCKS.items()}
    prefixes['decoder.decoder_encoder.layer'] = 'decoder_blocks'  # what transformers 5.24's save_pretrained writes
    out: dict[str, Any] = {}
    parts: dict[str, dict[int, Any]] = {}
    notes = []
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition('.')
        if key in top:  # cls_token, mask_token, the position tables
            out[top[key]] = value
            continue
        if stem in top:
            out[f'{top[stem]}.{leaf}'] = value
            continue
        m = re.match(r'^(.+?)\.(\d+)\.(.+)$', stem)
        if m and m.group(1) in prefixes:
            where, rest = f'{prefixes[m.group(1)]}.{m.group(2)}', m.group(3)
            if rest in block:
                out[f'{where}.{block[rest]}.{leaf}'] = value
                continue
            if rest in qkv:
                parts.setdefault(f'{where}.attn.qkv.{leaf}', {})[qkv[rest][1]] = value
                continue
        out[key] = value  # unknown: reported as unused
    for key, p in parts.items():
        if len(p) != 3:
            raise ConversionError(f'{key}: the checkpoint has {len(p)} of q / k / v, expected all three')
        out[key] = np.concatenate([np.asarray(p[j]) for j in range(3)], 0)
    for key in [k for k in out if k.endswith('.attn.qkv.weight')]:
        bias = key[:-len('weight')] + 'bias'
        if bias not in out:
            out[bias] = np.zeros(out[key].shape[0], np.float32)
            if not notes or 'qkv_bias' not in notes[-1]:
                notes.append('q / k / v have no biases (qkv_bias=False): our qkv biases are set to zero')
    pos = out.get('pos_embed')
    if _is_array(pos) and pos.ndim == 3 and 'cls_token' in out:
        first = np.asarray(pos[:, :1], np.float32)
        if np.abs(first).max() > 0:
            out['cls_token'] = np.asarray(out['cls_token'], np.float32) + first
            out['pos_embed'] = np.concatenate([np.zeros_like(first), np.asarray(pos[:, 1:], np.float32)], 1)
            notes.append('position_embeddings[:, 0] (added to [CLS] by transformers) is folded into cls_token')
    return out, [f'transformers {names} key names'] + notes


def official_to_hf(state_dict: Mapping[str, Any], names: str = 'v4') -> dict[str, Any]:
    """The official MAE state dict -> ``ViTMAEForPreTraining``'s, with transformers ``names`` ('v5' or 'v4')."""
    if names not in HF_NAMES:
        raise ConversionError(f'unknown transformers key names {names!r}; valid: {HF_NAMES}')
    i = HF_NAMES.index(names)
    out = {}
    for key, value in state_dict.items():
        stem, _, leaf = key.rpartition('.')
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif stem in _HF_TOP:
            out[f'{_HF_TOP[stem]}.{leaf}'] = value
        else:
            group, n, rest = stem.split('.', 2)
            prefix = f'{_HF_BLOCKS[group][i]}.{n}'
            if rest == 'attn.qkv':
                for j, x in enumerate(np.split(np.asarray(value), 3, axis=0)):
                    out[f'{prefix}.{_HF_QKV[j][i]}.{leaf}'] = x
            else:
                out[f'{prefix}.{_HF_BLOCK[rest][i]}.{leaf}'] = value
    return out


# transformers' ViTMAEConfig defaults (a config.json may leave them out)
_HF_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                    hidden_act='gelu', layer_norm_eps=1e-12, image_size=224, patch_size=16, num_channels=3,
                    qkv_bias=True, decoder_num_attention_heads=16, decoder_hidden_size=512,
                    decoder_num_hidden_layers=8, decoder_intermediate_size=2048, mask_ratio=0.75, norm_pix_loss=False)


def _square(cfg: Mapping[str, Any], key: str) -> int:
    v = cfg.get(key, _HF_DEFAULTS[key])
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ConversionError(f'config.json: {key}={v} is not square; our model takes square images and patches')
        v = v[0]
    return int(v)


def hf_mae_config(cfg: Mapping[str, Any]) -> tuple[model_lib.MAEConfig, list[str]]:
    """A ViTMAE ``config.json`` -> (our :class:`MAEConfig`, notes). The LayerNorm epsilon
    (``layer_norm_eps``, 1e-12 in transformers) and ``norm_pix_loss`` (False in transformers) are carried."""
    g = dict(_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None})
    if g['hidden_act'] != 'gelu':
        raise ConversionError(f'config.json: hidden_act={g["hidden_act"]!r}; our model computes the exact GELU '
                              f'(transformers\' "gelu") only, so its outputs would differ.')
    dec_w, dec_mlp = int(g['decoder_hidden_size']), int(g['decoder_intermediate_size'])
    if dec_mlp % dec_w:
        raise ConversionError(f'config.json: decoder_intermediate_size={dec_mlp} is not a multiple of '
                              f'decoder_hidden_size={dec_w}; our decoder MLP is width x an integer ratio.')
    c = model_lib.MAEConfig(
        image_size=_square(g, 'image_size'), patch=_square(g, 'patch_size'), width=int(g['hidden_size']),
        depth=int(g['num_hidden_layers']), mlp_dim=int(g['intermediate_size']), heads=int(g['num_attention_heads']),
        dec_width=dec_w, dec_depth=int(g['decoder_num_hidden_layers']), dec_heads=int(g['decoder_num_attention_heads']),
        dec_mlp_ratio=dec_mlp // dec_w, channels=int(g['num_channels']), norm_pix_loss=bool(g['norm_pix_loss']),
        ln_eps=float(g['layer_norm_eps']))
    notes = [f'model from config.json (LayerNorm epsilon {c.ln_eps:g}, norm_pix_loss {c.norm_pix_loss}); its '
             f'mask_ratio {g["mask_ratio"]} is not part of the model (the masking config sets the ratio)']
    return c, notes


def hf_config_json(c: model_lib.MAEConfig) -> dict[str, Any]:
    """The ``config.json`` of :func:`export_hf` (a ``ViTMAEConfig``'s fields)."""
    return dict(_HF_DEFAULTS, architectures=['ViTMAEForPreTraining'], model_type='vit_mae', hidden_size=c.width,
                num_hidden_layers=c.depth, num_attention_heads=c.heads, intermediate_size=c.mlp_dim,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.02,
                layer_norm_eps=c.ln_eps, image_size=c.image_size, patch_size=c.patch, num_channels=c.channels,
                decoder_num_attention_heads=c.dec_heads, decoder_hidden_size=c.dec_width,
                decoder_num_hidden_layers=c.dec_depth, decoder_intermediate_size=c.dec_width * c.dec_mlp_ratio,
                norm_pix_loss=c.norm_pix_loss, dtype='float32')


# ------------------------------------------------------------------------------ the model from the shapes

def _block_count(sd: Mapping[str, Any], layout: str, decoder: bool) -> int:
    first = layout_key(('decoder_blocks' if decoder else 'blocks') + '.0.norm1.weight', layout)
    prefix = re.escape(first[:first.index('.0.')])
    found = {int(m.group(1)) for k in sd if (m := re.match(prefix + r'\.(\d+)\.', k))}
    return max(found) + 1 if found else 0


def _official_layout(sd: Mapping[str, Any]) -> str:
    return 'mae' if any(k.startswith('decoder_') or k == 'mask_token' for k in sd) else 'timm'


def _shape_fields(state_dict: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """The MAEConfig fields the shapes of an official-named (``layout``) state dict give, plus
    ``dec_mlp_dim`` and ``image_size_found`` (from ``pos_embed``; None when it has none)."""
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
    f['image_size'] = f['image_size_found'] = grid * patch if grid and grid * grid == tokens else None
    dec_depth = _block_count(state_dict, layout, True)
    if dec_depth:
        dec_width, dec_mlp = shape('mask_token')[-1], shape('decoder_blocks.0.mlp.fc1.weight')[0]
        f.update(dec_width=dec_width, dec_depth=dec_depth, dec_mlp_ratio=dec_mlp // dec_width, dec_mlp_dim=dec_mlp)
    return f


# config.json key -> (the shapes' field, what in the weights says it)
_HF_SHAPED = {'hidden_size': ('width', 'the patch embedding\'s output width'),
              'num_channels': ('channels', 'the patch embedding\'s input channels'),
              'patch_size': ('patch', 'the patch embedding\'s kernel'),
              'num_hidden_layers': ('depth', 'encoder blocks'),
              'intermediate_size': ('mlp_dim', 'the encoder MLP width'),
              'image_size': ('image_size_found', 'the position table\'s grid x patch'),
              'decoder_hidden_size': ('dec_width', 'the mask token\'s width'),
              'decoder_num_hidden_layers': ('dec_depth', 'decoder blocks'),
              'decoder_intermediate_size': ('dec_mlp_dim', 'the decoder MLP width')}


def check_hf_config(cfg: Mapping[str, Any], state_dict: Mapping[str, Any], path: str = HF_CONFIG) -> None:
    """Refuses a ViTMAE ``config.json`` (``cfg``, read from ``path``) that disagrees with the shapes of
    its weights (``state_dict``, transformers names), naming the key, its value and what the weights
    say; then one whose heads do not divide its widths."""
    sd, _ = hf_to_official(state_dict)
    found = _shape_fields(sd, _official_layout(sd))
    g = dict(_HF_DEFAULTS, **{k: v for k, v in cfg.items() if v is not None})
    for key, (field, what) in _HF_SHAPED.items():
        if found.get(field) is None:  # no position table / no decoder: nothing to compare
            continue
        said = _square(g, key) if key in ('image_size', 'patch_size') else int(g[key])
        if said != found[field]:
            given = '' if key in cfg else ' (transformers\' default: the file leaves it out)'
            raise ConversionError(f'{path}: {key} is {said}{given}, but the weights say {found[field]} ({what}); '
                                  f'fix {HF_CONFIG} to match the weights (or use the {HF_CONFIG} saved with them)')
    for heads, width in (('num_attention_heads', 'hidden_size'), ('decoder_num_attention_heads',
                                                                  'decoder_hidden_size')):
        if int(g[width]) % int(g[heads]):
            raise ConversionError(f'{path}: {heads} is {g[heads]}, which does not divide {width} {g[width]}; fix '
                                  f'{HF_CONFIG} (the heads it was trained with)')


def _meta_config(meta: Mapping[str, Any], state_dict: Mapping[str, Any], layout: str,
                 where: str) -> model_lib.MAEConfig:
    """The MAEConfig an export's settings give, checked against the shapes of its weights."""
    try:
        c = model_lib.MAEConfig(**{k: v for k, v in meta['model'].items() if k in _META_FIELDS})
    except TypeError as e:
        raise ConversionError(f'{where}: unreadable model settings ({e}); delete it to infer the model from the '
                              f'shapes') from None
    found = _shape_fields(state_dict, layout)
    for field in ('width', 'depth', 'mlp_dim', 'patch', 'channels', 'image_size_found', 'dec_width', 'dec_depth'):
        name = field.replace('_found', '')
        if found.get(field) is not None and getattr(c, name) != found[field]:
            raise ConversionError(f'{where}: {name} is {getattr(c, name)}, but the weights say {found[field]}; it '
                                  f'belongs to another export: delete it (the model is then inferred from the '
                                  f'shapes) or export again')
    return c


def infer_config(state_dict: Mapping[str, Any], layout: str | None = None,
                 **given: Any) -> tuple[model_lib.MAEConfig, list[str]]:
    """The :class:`MAEConfig` a state dict's shapes describe, and notes on what was assumed.

    ``given`` (MAEConfig fields) wins over the shapes. Heads are not in the shapes: unless given, the
    encoder's come from :data:`colormae_jax.models.mae.VARIANTS` (matched on width, depth and MLP width) and
    the decoder's from MAE's published decoder (512 wide, 8 deep, 16 heads). The image size comes from
    ``pos_embed`` (224 if there is none). Hugging Face names without their ``config.json``: transformers'
    defaults, LayerNorm epsilon 1e-12 and ``norm_pix_loss`` False, unless given.
    """
    layout = layout or detect_layout(state_dict)
    if layout == HF:
        sd, _ = hf_to_official(state_dict)
        hf_given = {'ln_eps': 1e-12, 'norm_pix_loss': False, **given}
        c, notes = infer_config(sd, _official_layout(sd), **hf_given)
        assumed = [k for k in ('ln_eps', 'norm_pix_loss') if k not in given]
        if assumed:
            notes.append(f'no config.json: {", ".join(f"{k}={hf_given[k]}" for k in assumed)} (transformers\' '
                         f'defaults)')
        return c, notes

    f = _shape_fields(state_dict, layout)
    f.pop('dec_mlp_dim', None)
    if f.pop('image_size_found') is None:
        f['image_size'] = 224
    dec_depth = f.get('dec_depth', 0)
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
        return self.describe()

    def describe(self, verbose: bool = False, shown: int = 3) -> str:
        """A few lines: the parameters left at their initialisation and the unused source keys are
        counted, the first ``shown`` named (a whole missing decoder: none); ``verbose``: every one."""
        c = self.config
        lines = [f'Read {self.source}: layout {self.layout}.',
                 f'Model: image {c.image_size}, patch {c.patch}, encoder {c.width} wide x {c.depth} deep, MLP '
                 f'{c.mlp_dim}, {c.heads} heads; decoder {c.dec_width} x {c.dec_depth}, {c.dec_heads} heads.',
                 f'Filled {len(self.filled)} of {len(self.filled) + len(self.unfilled)} parameter arrays.']
        for head, names in ((f'Left at their initialisation ({len(self.unfilled)})', self.unfilled),
                            (f'Source keys not used ({len(self.unused)})', self.unused)):
            if not names:
                continue
            if verbose:
                lines += [head + ':'] + [f'  {n}' for n in names]
                continue
            if names is self.unfilled and not any(f.startswith('decoder/') for f in self.filled) and all(
                    n.startswith('decoder/') for n in names):
                lines.append(f'{head}: the whole decoder, which the source does not have (--verbose lists them).')
                continue
            more = f', ... ({len(names) - shown} more; --verbose lists them)' if len(names) > shown else ''
            lines.append(f'{head}: {", ".join(names[:shown])}{more}.')
        lines += [f'Note: {n}' for n in self.notes]
        return '\n'.join(lines)


def import_torch(source: str | Mapping[str, Any], mae_config: model_lib.MAEConfig | None = None, *,
                 layout: str | None = None, seed: int = 0) -> tuple[Params, ImportReport]:
    """A PyTorch checkpoint -> (our params as a pure dict, an :class:`ImportReport`).

    ``source``: a ``.pth`` path or a loaded checkpoint / state dict (torch tensors or numpy arrays).
    ``mae_config``: the model to fill; None infers it from the shapes (:func:`infer_config`).
    ``layout``: 'mae', 'mmpretrain', 'timm' or 'hf'; None detects it. Parameters the checkpoint lacks (the
    decoder, for encoder-only files) keep the initialisation of ``MAE(mae_config, rngs=nnx.Rngs(seed))``
    and are listed in the report. A tensor whose shape does not fit, or a block count that differs from
    the config's, raises :class:`ConversionError` naming the key.
    """
    sd, where = read_state_dict(source)
    layout = layout or detect_layout(sd)
    notes: list[str] = []
    if mae_config is None:
        mae_config, notes = infer_config(sd, layout)
    shown = layout
    if layout == HF:
        sd, hf_notes = hf_to_official(sd)
        layout, notes = _official_layout(sd), hf_notes + notes
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
    report = ImportReport(where, shown, c, [path_str(p) for p in abstract if p not in unfilled],
                          [path_str(p) for p in unfilled], sorted(set(sd) - used), notes)
    return traverse_util.unflatten_dict({p: flat[p] for p in abstract}), report


# ------------------------------------------------------------------------------ export

def export_state_dict(params: Params, mae_config: model_lib.MAEConfig, *, layout: str = 'mae',
                      with_decoder: bool = False, hf_names: str = 'v4') -> dict[str, np.ndarray]:
    """Our params -> a state dict of float32 numpy arrays in ``layout`` ('mae', 'timm', 'mmpretrain',
    'hf'; 'hf' always has the decoder and uses transformers ``hf_names``, 'v5' or 'v4').

    ``pos_embed`` / ``decoder_pos_embed`` are our sin-cos tables with a zero [CLS] row (``pos_embed``:
    the learned table of a fine-tuned encoder, if it has one).
    """
    hf = layout == HF
    if not hf:
        layout_key('cls_token', layout)  # refuses an unknown layout
    if with_decoder and layout == 'timm':
        raise ConversionError("timm's VisionTransformer has no decoder: export the decoder with --layout mae "
                              "(or mmpretrain, hf), or leave out --with_decoder.")
    c = mae_config
    have = {tuple(str(p) for p in path): np.asarray(x) for path, x in _flat(params).items()}
    abstract = _flat(model_lib.abstract_mae(c)[1])
    sd: dict[str, np.ndarray] = {}

    def put(key: str, x: np.ndarray) -> None:
        sd[key if hf else layout_key(key, layout)] = np.array(x, np.float32, order='C')  # a writable copy

    for e in official_keys(c, decoder=with_decoder or hf):
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
    return official_to_hf(sd, hf_names) if hf else sd


# What an export carries for its re-import (the model's settings: heads are not in the shapes): in a
# .safetensors file's metadata under this key, beside a .pth file as ``<file>.json``.
EXPORT_META = 'colormae_jax'
_META_FIELDS = ('image_size', 'patch', 'width', 'depth', 'mlp_dim', 'heads', 'dec_width', 'dec_depth', 'dec_heads',
                'dec_mlp_ratio', 'channels', 'norm_pix_loss', 'ln_eps')


def export_meta(c: model_lib.MAEConfig, layout: str, with_decoder: bool) -> dict[str, Any]:
    """The settings an export of ``c`` in ``layout`` carries (:data:`EXPORT_META`)."""
    return {'format': EXPORT_META, 'layout': layout, 'with_decoder': bool(with_decoder),
            'model': {f: getattr(c, f) for f in _META_FIELDS}}


def meta_file(path: str) -> str:
    """Where :func:`export_torch` writes the settings of the ``.pth`` file ``path``."""
    return path + '.json'


def read_export_meta(path: str) -> tuple[dict | None, str]:
    """(the settings an export carries, where they were read), or (None, '') for a file without
    them (a file from elsewhere, or one whose ``.json`` was not copied with it)."""
    where = ''
    try:
        if path.endswith('.safetensors'):
            from safetensors import safe_open
            with safe_open(path, framework='np') as f:
                text = (f.metadata() or {}).get(EXPORT_META)
            where = f'{path} (its metadata)'
        else:
            where = meta_file(path)
            if not os.path.isfile(where):
                return None, ''
            with open(where) as f:
                text = f.read()
        meta = json.loads(text) if text else None
    except Exception:  # noqa: BLE001 - unreadable settings are no settings: the shapes and the table decide
        return None, ''
    if not isinstance(meta, dict) or meta.get('format') != EXPORT_META or not isinstance(meta.get('model'), dict):
        return None, ''
    return meta, where


def save_safetensors(state_dict: Mapping[str, np.ndarray], path: str, meta: Mapping[str, Any] | None = None) -> None:
    """Writes a bare state dict with ``safetensors.numpy`` (metadata format 'pt', as transformers wants;
    ``meta``: :func:`export_meta`'s settings under :data:`EXPORT_META`)."""
    from safetensors.numpy import save_file
    metadata = {'format': 'pt', **({EXPORT_META: json.dumps(meta)} if meta else {})}
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path, metadata=metadata)


def export_torch(params: Params, mae_config: model_lib.MAEConfig, path: str | None = None, *,
                 layout: str = 'mae', with_decoder: bool = False) -> dict[str, Any]:
    """Our params -> a PyTorch state dict (``{key: torch.Tensor}``, float32), written to ``path`` if given
    (a ``.safetensors`` path: a bare state dict written without torch, returned as numpy arrays).

    'mae': the official ``MaskedAutoencoderViT`` names, saved as ``{'model': state_dict}`` like MAE's
    releases; with ``with_decoder`` it loads with ``strict=True`` into ``MaskedAutoencoderViT``, without
    it is an encoder-only file like ``mae_pretrain_vit_base.pth``. 'timm': a bare state dict for timm's
    ``VisionTransformer`` (encoder only; no ``head.*``: build the model with ``num_classes=0`` or load with
    ``strict=False``). 'mmpretrain': the MAE names of mmpretrain, saved as ``{'state_dict': ...}``.
    The file carries what its re-import needs (:func:`export_meta`: the layout and the model, heads
    included): a ``.safetensors`` file in its metadata, a ``.pth`` file in ``<path>.json`` beside it.
    """
    sd = export_state_dict(params, mae_config, layout=layout, with_decoder=with_decoder)
    meta = export_meta(mae_config, layout, with_decoder)
    if path is not None and path.endswith('.safetensors'):
        save_safetensors(sd, path, meta)
        return sd
    torch = _torch()
    sd = {k: torch.from_numpy(v) for k, v in sd.items()}
    if path is not None:
        wrapper = WRAPPERS[layout]
        torch.save({wrapper: sd} if wrapper else sd, path)
        with open(meta_file(path), 'w') as f:
            json.dump(meta, f, indent=1)
    return sd


def export_hf(params: Params, mae_config: model_lib.MAEConfig, folder: str, *, names: str = 'v4') -> dict:
    """Our params (with the decoder) -> a new folder with ``config.json`` and ``model.safetensors`` that
    ``transformers.ViTMAEForPreTraining.from_pretrained(folder)`` loads. Returns the state dict. ``names``:
    'v4' (default: the Hub's names, which transformers 4 and 5 load, and what 5.24's ``save_pretrained``
    writes itself) or 'v5' (transformers 5's module names, which transformers 4 cannot load)."""
    if os.path.exists(folder):
        raise ConversionError(f'{os.path.abspath(folder)} exists; choose a new directory (it is never overwritten).')
    sd = export_state_dict(params, mae_config, layout=HF, hf_names=names)
    os.makedirs(folder)
    save_safetensors(sd, os.path.join(folder, HF_WEIGHTS))
    with open(os.path.join(folder, HF_CONFIG), 'w') as f:
        json.dump(hf_config_json(mae_config), f, indent=2)
    return sd


# ------------------------------------------------------------------------------ any source

def import_source(source: str | Mapping[str, Any], mae_config: model_lib.MAEConfig | None = None, *,
                  layout: str | None = None, seed: int = 0, **given: Any) -> tuple[Params, ImportReport]:
    """Any foreign source -> (our params, an :class:`ImportReport`): a ``.pth`` or ``.safetensors`` file, a
    transformers ``save_pretrained`` folder, or a state dict.

    The model: ``mae_config`` if given; else a ViTMAE ``config.json`` (the folder's, or next to a
    ``.safetensors`` file; its LayerNorm epsilon is carried even into a given ``mae_config``); else
    inferred from the shapes (:func:`infer_config`, with ``given`` MAEConfig fields).
    """
    sd, where = read_state_dict(source)
    detected = detect_layout(sd)
    meta, meta_where = read_export_meta(source) if isinstance(source, str) and os.path.isfile(source) else (None, '')
    notes = []
    if meta is not None and not (meta.get('layout') == detected or {meta.get('layout'), detected} == {'mae', 'timm'}):
        notes.append(f'{meta_where} is ignored: it describes a {meta.get("layout")} export, the names are {detected}')
        meta = None
    if layout:
        found, how = layout, 'given'
    elif meta is not None:
        found, how = meta['layout'], f'from {meta_where}'
    else:
        found, how = detected, 'detected from the key names'
    notes.insert(0, f'layout {how}')
    hf_cfg = read_hf_config(source) if isinstance(source, str) and found == HF else None
    if hf_cfg is not None:
        check_hf_config(hf_cfg, sd, _hf_config_path(source))
    if mae_config is None and hf_cfg is None and meta is not None:
        c = _meta_config(meta, sd, found, meta_where)
        mae_config = dataclasses.replace(c, **given)
        notes.append(f'model from {meta_where} (written by tools.convert export)')
    if mae_config is not None:
        c = mae_config
        if hf_cfg is not None and c.ln_eps != hf_mae_config(hf_cfg)[0].ln_eps:
            c = dataclasses.replace(c, ln_eps=hf_mae_config(hf_cfg)[0].ln_eps)
            notes.append(f'LayerNorm epsilon {c.ln_eps:g} from config.json')
    elif hf_cfg is not None:
        c, more = hf_mae_config(hf_cfg)
        c = dataclasses.replace(c, **given)
        notes += more
    else:
        c, more = infer_config(sd, found, **given)
        notes += more
    params, report = import_torch(sd, c, layout=found, seed=seed)
    return params, dataclasses.replace(report, source=where, notes=notes + report.notes)

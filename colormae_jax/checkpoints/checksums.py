"""Checksums of checkpoint steps: what is recorded at save and compared at restore.

:func:`fingerprints` reduces each array, in a jitted integer sum that does not depend on the
sharding or the process count, to 64 bits; :func:`digest` hashes a JSON item (config, layout,
an iterator state). :mod:`colormae_jax.checkpoints.checkpointer` writes the record (the ``checksums`` item)
in the same orbax save as the step and verifies it on restore; :mod:`colormae_jax.interop.weights`
verifies the params it reads. :func:`compare`, :func:`expect` and :func:`agree` turn a
comparison into the one-line reason a damaged step is set aside for.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils

CHECKSUMS = 'checksums'  # the item holding a step's checksum record
RECORD_VERSION = 1


def keystr(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator='/')


# ------------------------------------------------------------------------------ fingerprints
# An array's fingerprint: its elements as uint32 words (one per element of 1, 2 or 4 bytes,
# two per 8-byte element), each mixed with its flat index, summed mod 2**32 in two lanes.
# Integer sums do not depend on the order of the reduction, so the fingerprint of a global
# array is the same on every mesh and process count (one jitted reduction, equal on all
# processes), and numpy computes the same number for a host array.

_M1, _M2, _GOLD, _SALT = (np.uint32(v) for v in (0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9, 0x7F4A7C15))


def _mix(h):
    """murmur3's 32-bit finaliser (numpy or jax uint32: the same wrapping arithmetic)."""
    h = h ^ (h >> 16)
    h = h * _M1
    h = h ^ (h >> 13)
    h = h * _M2
    return h ^ (h >> 16)


def _lanes(w, i):
    a = i * _GOLD
    return _mix(w ^ a), _mix((w + _SALT) ^ (a >> 7) ^ (a << 11))


def _jax_words(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    n = jnp.dtype(x.dtype).itemsize
    if n in (4, 8):  # an 8-byte element -> [..., 2] words
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[n]).astype(jnp.uint32)


@jax.jit
def _jax_fingerprint(x):
    w = _jax_words(x)
    i, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for d in reversed(range(w.ndim)):  # the row-major flat index, mod 2**32
        i = i + lax.broadcasted_iota(jnp.uint32, w.shape, d) * np.uint32(stride % 2 ** 32)
        stride *= w.shape[d]
    a, b = _lanes(w, i)
    return jnp.sum(a, dtype=jnp.uint32), jnp.sum(b, dtype=jnp.uint32)


def _np_fingerprint(x: np.ndarray, chunk: int = 1 << 22) -> tuple[int, int]:
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.bool_:
        w = flat.astype(np.uint32)
    elif flat.dtype.itemsize in (4, 8):
        w = flat.view(np.uint32)  # little-endian words, as XLA's bitcast
    else:
        w = flat.view({1: np.uint8, 2: np.uint16}[flat.dtype.itemsize]).astype(np.uint32)
    sa = sb = 0
    for start in range(0, w.size, chunk):
        part = w[start:start + chunk]
        a, b = _lanes(part, (np.arange(start, start + part.size, dtype=np.uint64) % 2 ** 32).astype(np.uint32))
        sa, sb = (sa + int(a.sum(dtype=np.uint32))) % 2 ** 32, (sb + int(b.sum(dtype=np.uint32))) % 2 ** 32
    return sa, sb


def fingerprints(tree: Any) -> dict:
    """``{path: {'dtype', 'shape', 'fp'}}`` of every leaf of ``tree`` (jax arrays, sharded or
    not, and host arrays alike); ``fp``: 16 hex digits, the same for the same values whatever
    their sharding or process count. Every process must call it (a jitted reduction per
    global array)."""
    leaves = [(keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]
    pending = {k: _jax_fingerprint(x) for k, x in leaves if isinstance(x, jax.Array)}  # all dispatched first
    out = {}
    for k, x in leaves:
        if k in pending:
            a, b = (int(np.asarray(v.addressable_data(0))) for v in pending[k])
        else:
            x = np.asarray(x)
            a, b = _np_fingerprint(x)
        out[k] = {'dtype': str(x.dtype), 'shape': list(np.shape(x)), 'fp': f'{a:08x}{b:08x}'}
    return out


def digest(obj: Any) -> str:
    """16 hex digits of a JSON value (key order ignored)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(',', ':')).encode()).hexdigest()[:16]


def all_digests(d: str | None) -> list[str] | None:
    """Every process's ``d`` (a ``digest``), in process order."""
    if d is None or jax.process_count() == 1:
        return None if d is None else [d]
    words = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(d), np.uint32))
    return [np.asarray(w, np.uint32).tobytes().hex() for w in np.asarray(words).reshape(jax.process_count(), -1)]


def compare(recorded: dict, got: dict, item: str) -> list[str]:
    """What differs between the recorded and the restored fingerprints of an item."""
    bad = []
    for k, v in got.items():
        r = recorded.get(k)
        if r is None:
            bad.append(f'{item}/{k}: no checksum recorded')
        elif r['dtype'] == v['dtype'] and r['fp'] != v['fp']:  # (restored as another dtype: not comparable)
            bad.append(f'{item}/{k}: checksum differs')
    return bad


def agree(reason: str | None) -> str | None:
    """Every process's verdict: None if the step is good on all processes."""
    if jax.process_count() == 1:
        return reason
    failed = np.asarray(multihost_utils.process_allgather(np.asarray(reason is not None))).reshape(-1)
    if reason is None and failed.any():
        reason = f'failed on process {", ".join(str(i) for i in np.flatnonzero(failed))} (see its log)'
    return reason


def error_summary(e: BaseException) -> str:
    if 'See full TensorStore details' in str(e) and e.__cause__ is not None:
        e = e.__cause__  # orbax's wrapper prints a page of spec; the cause names the array and the error
    text = str(e).strip().splitlines()
    text = text[0] if text else ''
    return f'{type(e).__name__}: {text[:240]}{"..." if len(text) > 240 else ""}'


def expect(record: dict | None, name: str, value: Any) -> None:
    if record is not None and record.get(name) != digest(value):
        raise ValueError(f'the {name!r} item differs from its checksum')

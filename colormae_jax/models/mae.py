"""The MAE model (Flax NNX): ViT encoder, MAE decoder, their layers and the MAE loss.

The MAE forward pass never scatters or unshuffles: the masking partition gives three
index arrays (visible, thrown, masked), the encoder runs on the visible patches only,
and the decoder runs on ``[cls, visible..., mask tokens at masked positions...]`` with
position embeddings gathered by index. Thrown patches are never computed anywhere.

:func:`abstract_mae` and :func:`init_mae_params` build the parameters as a pure dict. The
classification heads on the encoder are in :mod:`colormae_jax.models.classifier`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# name -> (width, depth, mlp_dim, heads); as in big_vision / the ViT and MAE papers.
VARIANTS = {
    'mu': (32, 1, 128, 2),  # tiny smoke model, for tests and the quick start
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}


def parse_variant(variant: str) -> tuple[str, int]:
    """'B/16' -> ('B', 16). Raises ValueError with the valid choices."""
    try:
        name, patch = variant.split('/')
        patch = int(patch)
    except ValueError:
        raise ValueError(f"model.variant={variant!r}: expected 'NAME/PATCH' such as 'B/16' "
                         f"with NAME in {sorted(VARIANTS)}") from None
    if name not in VARIANTS:
        raise ValueError(f"model.variant={variant!r}: unknown size {name!r}; valid: {sorted(VARIANTS)}")
    if patch <= 0:
        raise ValueError(f"model.variant={variant!r}: the patch size must be positive")
    return name, patch


def sincos_2d(grid: int, dim: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE's get_2d_sincos_pos_embed).

    Computed with numpy at trace time, so it is an XLA constant: no parameter, nothing to
    checkpoint, nothing to shard.
    """
    if dim % 4:
        raise ValueError(f'sin-cos position embeddings need a width divisible by 4, got {dim}')
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    h, w = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing='ij')
    out_h = np.einsum('m,d->md', h.reshape(-1), omega)
    out_w = np.einsum('m,d->md', w.reshape(-1), omega)
    # MAE's order: the first half embeds the width coordinate, the second the height.
    return np.concatenate([np.sin(out_w), np.cos(out_w), np.sin(out_h), np.cos(out_h)], 1).astype(np.float32)


def sincos_table_with_cls(grid: int, dim: int) -> np.ndarray:
    """MAE's ``pos_embed`` layout [1, 1+grid*grid, dim]: a zero row for [CLS], then :func:`sincos_2d`."""
    return np.concatenate([np.zeros((1, dim), np.float32), sincos_2d(grid, dim)])[None]


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """[B, H, W, C] -> [B, N, patch*patch*C], row-major over the patch grid."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
    """Inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches.shape
    g = int(round(n ** 0.5))
    x = patches.reshape(b, g, g, patch, patch, channels)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, g * patch, g * patch, channels)


def take_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Gather tokens: x [B, N, D], idx [B, K] -> [B, K, D]."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def _xavier():
    return nnx.initializers.xavier_uniform()


# ----------------------------------------------------------------------- forms for XLA:CPU
# With ``attn_impl='auto'`` on the CPU backend (or ``'cpu'`` on any), the layers run the same
# maths in forms that XLA:CPU executes faster: each has a written-out backward (``jax.custom_vjp``)
# that avoids the slow operand layouts. Parameters, their tree and their values are the same; the
# results equal the plain forms to float rounding (tests/test_fast_forms.py). ``CPU_FORMS`` names
# the forms in use; benchmarks/cpu_forms.py switches them one at a time (docs/benchmarks.md).
CPU_FORM_NAMES = ('attention', 'layernorm', 'dense')
# 'dense' (a written-out Linear backward) showed no consistent gain on the 2-core VM: opt-in.
CPU_FORMS = frozenset({'attention', 'layernorm'})


_FORMS_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar('colormae_forms_platform', default=None)


@contextlib.contextmanager
def forms_for(target):
    """Within this context, ``attn_impl='auto'`` traces the forms of ``target``: a platform name
    ('cpu', 'tpu', 'gpu') or a mesh (its devices' platform), whatever ``jax.default_backend()`` is;
    e.g. a step compiled from a CPU host for TPU devices. Enter it around the tracing (``.lower``)."""
    platform = target if isinstance(target, str) or target is None else target.devices.flat[0].platform
    token = _FORMS_PLATFORM.set(platform)
    try:
        yield
    finally:
        _FORMS_PLATFORM.reset(token)


def forms_platform() -> str:
    """The platform whose layer forms ``'auto'`` traces: :func:`forms_for`'s, else that of the
    abstract mesh in context (``jax.set_mesh``), else ``jax.default_backend()``."""
    platform = _FORMS_PLATFORM.get()
    if platform is None:
        device = getattr(jax.sharding.get_abstract_mesh(), 'abstract_device', None)
        platform = device.platform if device is not None else jax.default_backend()
    return platform


def cpu_forms(impl: str | None) -> frozenset:
    """The CPU forms in use for a model with ``attn_impl=impl`` (read at trace time)."""
    if impl == 'cpu' or (impl == 'auto' and forms_platform() == 'cpu'):
        return CPU_FORMS
    return frozenset()


@jax.custom_vjp
def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ()))) + bias


def _dense_fwd(x, kernel, bias):
    return _dense(x, kernel, bias), (x, kernel)


def _dense_bwd(res, dy):
    x, kernel = res
    # dy @ kernel.T with the transpose materialised (a small array): XLA:CPU would otherwise fold
    # it into the product, which then runs markedly slower.
    kernel_t = jax.lax.optimization_barrier(kernel.T)
    return dy @ kernel_t, x.T @ dy, dy.sum(0)


_dense.defvjp(_dense_fwd, _dense_bwd)


def dense_tokens(layer: nnx.Linear, x: jax.Array, impl: str | None = None) -> jax.Array:
    """Applies a Linear to [B, N, D] as one [B*N, D] matrix product. XLA:CPU runs the
    2-D form (and its weight gradient) markedly faster; on GPU/TPU it is the same op.
    With the 'dense' CPU form (see :func:`cpu_forms`), the product has a written-out backward."""
    x2 = x.reshape(-1, x.shape[-1])
    if 'dense' in cpu_forms(impl) and layer.bias is not None:
        x2, kernel, bias = layer.promote_dtype((x2, layer.kernel[...], layer.bias[...]), dtype=layer.dtype)
        y = _dense(x2, kernel, bias)
    else:
        y = layer(x2)
    return y.reshape(*x.shape[:-1], -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    return _layer_norm_fwd(x, scale, bias, eps)[0]


def _layer_norm_fwd(x, scale, bias, eps):
    # flax's statistics (in float32, the "fast variance" E[x^2] - E[x]^2 clipped at 0) and its
    # order of operations, so the forward is nnx.LayerNorm's.
    x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x32 * x32, -1, keepdims=True) - mean * mean)
    rstd = jax.lax.rsqrt(var + eps)
    y = (x - mean) * (rstd * scale) + bias
    return y.astype(x.dtype), (x, mean, rstd, scale)


def _layer_norm_bwd(eps, res, g):
    del eps
    x, mean, rstd, scale = res
    xhat = (x - mean) * rstd
    g32 = g.astype(xhat.dtype)
    gs = g32 * scale
    dx = rstd * (gs - gs.mean(-1, keepdims=True) - xhat * (gs * xhat).mean(-1, keepdims=True))
    red = tuple(range(g.ndim - 1))
    return dx.astype(x.dtype), (g32 * xhat).sum(red), g32.sum(red)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` over the last axis (the same parameters ``scale`` and ``bias``); with
    the 'layernorm' CPU form, its backward is written out (one fused pass on XLA:CPU)."""

    def __init__(self, dim: int, *, epsilon: float, dtype, rngs: nnx.Rngs, impl: str | None = None):
        super().__init__(dim, epsilon=epsilon, dtype=dtype, rngs=rngs)
        self.impl = impl

    def __call__(self, x, *, mask=None):
        if mask is not None or 'layernorm' not in cpu_forms(self.impl):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return _layer_norm(x, scale, bias, self.epsilon)


ATTN_IMPLS = ('auto', 'xla', 'cudnn', 'einsum', 'cpu')


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None) -> jax.Array:
    """The one place where the attention implementation is chosen. q, k, v: [B, N, heads, dim].

    'xla', 'cudnn': ``jax.nn.dot_product_attention`` ('cudnn' is the fused flash kernel on
    NVIDIA GPUs). 'einsum': the same maths with the heads next to the batch, which XLA:CPU
    runs faster (10% of a ViT-Ti/4 CIFAR step). 'cpu': with the 'attention' CPU form
    (:func:`cpu_forms`), the heads folded into the batch and a written-out backward
    (:func:`_attention_core`), else 'einsum'. 'auto': 'cpu' when tracing for the CPU
    (:func:`forms_platform`), elsewhere ``jax.nn.dot_product_attention`` choosing for itself.
    """
    if impl == 'auto':
        impl = 'cpu' if forms_platform() == 'cpu' else None
    if impl == 'cpu' and 'attention' in cpu_forms(impl):
        b, n, h, d = q.shape
        q = q * np.asarray(1.0 / np.sqrt(d), q.dtype)
        q, k, v = (t.transpose(0, 2, 1, 3).reshape(b * h, n, d) for t in (q, k, v))
        return _attention_core(q, k, v).reshape(b, h, n, d).transpose(0, 2, 1, 3)
    if impl not in ('einsum', 'cpu'):
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v).transpose(0, 2, 1, 3)


def _bmm(a: jax.Array, b: jax.Array, ca: int, cb: int) -> jax.Array:
    """Batched product over the leading axis, contracting axis ``ca`` of ``a`` with ``cb`` of ``b``."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((0,), (0,))))


@jax.custom_vjp
def _attention_core(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T) v on [batch*heads, N, dim] (q already scaled), float32 softmax."""
    return _attention_core_fwd(q, k, v)[0]


def _attention_core_fwd(q, k, v):
    p = jax.nn.softmax(_bmm(q, k, 2, 2).astype(jnp.float32), axis=-1).astype(v.dtype)
    o = _bmm(p, v, 2, 1)
    return o, (q, k, v, p, o)


def _attention_core_bwd(res, do):
    # The softmax backward through delta = rowsum(do * o) (as flash attention), which spares the
    # [N, N] product p * dp of autodiff; ds then feeds the three products directly.
    q, k, v, p, o = res
    dp = _bmm(do, v, 2, 2).astype(jnp.float32)
    delta = jnp.sum((do * o).astype(jnp.float32), -1, keepdims=True)
    ds = (p.astype(jnp.float32) * (dp - delta)).astype(q.dtype)
    return _bmm(ds, k, 2, 1), _bmm(ds, q, 1, 1), _bmm(p, do, 1, 1)


_attention_core.defvjp(_attention_core_fwd, _attention_core_bwd)


class Attention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, attn_impl: str | None, dtype, rngs: nnx.Rngs):
        if dim % heads:
            raise ValueError(f'width {dim} is not divisible by {heads} heads')
        self.heads = heads
        self.attn_impl = attn_impl
        self.qkv = nnx.Linear(dim, 3 * dim, kernel_init=_xavier(), dtype=dtype, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, kernel_init=_xavier(), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, d = x.shape
        qkv = dense_tokens(self.qkv, x, self.attn_impl).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = jnp.split(qkv, 3, axis=2)
        y = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attn_impl)
        return dense_tokens(self.proj, y.reshape(b, n, d), self.attn_impl)

    def cls_attention(self, x: jax.Array) -> jax.Array:
        """[CLS]-to-patch attention probabilities [B, heads, N-1] (for attention-guided masking)."""
        b, n, d = x.shape
        qkv = dense_tokens(self.qkv, x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k = qkv[:, :1, 0], qkv[:, :, 1]
        logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(d // self.heads)
        return jax.nn.softmax(logits, axis=-1)[:, :, 0, 1:]


_SQRT_HALF = float(np.sqrt(0.5))
_INV_SQRT_2PI = float(1.0 / np.sqrt(2.0 * np.pi))


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, ``x * Phi(x)`` with the normal CDF through ``erf``, as torch's (and timm's)
    ``nn.GELU``, with its derivative ``Phi(x) + x * phi(x)`` written out: XLA:CPU then runs the
    MLP's forward and backward 15-20% faster than with ``jax.nn.gelu(approximate=False)``
    (``erfc``, differentiated by JAX), with the same values to float rounding."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * _SQRT_HALF))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _SQRT_HALF))
    return x * cdf, t * (cdf + x * (jnp.exp(-0.5 * x * x) * _INV_SQRT_2PI))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs, impl: str | None = None):
        self.impl = impl
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=_xavier(), dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=_xavier(), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return dense_tokens(self.fc2, gelu(dense_tokens(self.fc1, x, self.impl)), self.impl)


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-block drop path rates rising linearly from 0 to ``max_rate`` (timm / MAE:
    ``torch.linspace(0, drop_path_rate, depth)``)."""
    if not 0.0 <= max_rate <= 1.0:
        raise ValueError(f'drop_path_rate={max_rate} is not in [0, 1]')
    return [float(r) for r in np.linspace(0.0, max_rate, depth)]


class Block(nnx.Module):
    """Pre-norm transformer block (timm / MAE layout) on tokens [B, N, D].

    ``drop_path_rate`` (static) is the stochastic-depth rate of both residual branches
    (timm's ``DropPath``: each sample's branch is zeroed with probability ``rate`` and
    otherwise scaled by ``1 / (1 - rate)``). That is ``nnx.Dropout`` with one draw per
    sample (``broadcast_dims`` over the tokens and features); it acts only when
    ``__call__`` gets a ``drop_key`` (branch k uses ``fold_in(drop_key, k)``). Without a
    key the block is deterministic and computes exactly what it always did.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, attn_impl, dtype, rngs: nnx.Rngs,
                 drop_path_rate: float = 0.0, eps: float = 1e-6):
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f'drop_path_rate={drop_path_rate} is not in [0, 1]')
        self.norm1 = LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs, impl=attn_impl)
        self.attn = Attention(dim, heads, attn_impl=attn_impl, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(dim, epsilon=eps, dtype=dtype, rngs=rngs, impl=attn_impl)
        self.mlp = Mlp(dim, mlp_dim, dtype=dtype, rngs=rngs, impl=attn_impl)
        self.drop_path = nnx.Dropout(float(drop_path_rate), broadcast_dims=(1, 2))

    @property
    def drop_path_rate(self) -> float:
        return self.drop_path.rate

    def __call__(self, x, *, drop_key: jax.Array | None = None):
        def branch(k: int, y: jax.Array) -> jax.Array:
            if drop_key is None:
                return y
            return self.drop_path(y, deterministic=False, rngs=jax.random.fold_in(drop_key, k))

        x = x + branch(0, self.attn(self.norm1(x)))
        return x + branch(1, self.mlp(self.norm2(x)))


@dataclasses.dataclass(frozen=True)
class MAEConfig:
    """Static shape of an MAE; built from ``config.model`` by :func:`mae_config`."""
    image_size: int = 224
    patch: int = 16
    width: int = 768
    depth: int = 12
    mlp_dim: int = 3072
    heads: int = 12
    dec_width: int = 512
    dec_depth: int = 8
    dec_heads: int = 16
    dec_mlp_ratio: int = 4
    channels: int = 3
    norm_pix_loss: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters are always float32
    attn_impl: str = 'auto'
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    ln_eps: float = 1e-6  # every LayerNorm's epsilon (MAE: 1e-6; Hugging Face ViTMAE: 1e-12)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch * self.patch * self.channels


def mae_config(model_cfg, image_size: int) -> MAEConfig:
    name, patch = parse_variant(model_cfg.variant)
    width, depth, mlp_dim, heads = VARIANTS[name]
    return MAEConfig(
        image_size=image_size, patch=patch, width=width, depth=depth, mlp_dim=mlp_dim, heads=heads,
        dec_width=model_cfg.decoder.width, dec_depth=model_cfg.decoder.depth, dec_heads=model_cfg.decoder.heads,
        norm_pix_loss=model_cfg.norm_pix_loss, dtype=jnp.dtype(model_cfg.compute_dtype),
        attn_impl=model_cfg.attn_impl, remat=bool(model_cfg.remat))


class ViTEncoder(nnx.Module):
    """ViT with a [CLS] token and fixed 2-D sin-cos position embeddings.

    ``__call__(images, keep_idx)`` encodes only the patches listed in ``keep_idx`` ([B, K],
    or None for all of them) and returns ``[B, 1+K, width]`` after the final norm;
    :meth:`tokens` returns them before it.

    ``drop_path_rate``: stochastic depth for fine-tuning, block i of ``depth`` dropping its
    residual branches with rate ``drop_path_rate * i / (depth - 1)`` (timm / MAE). It acts
    only when a ``drop_key`` is given (block i uses ``fold_in(drop_key, i)``); with
    ``drop_key=None`` the encoder is deterministic and computes exactly what it computes
    without drop path. The rate is static (not a parameter): the parameters are the same.
    """

    def __init__(self, c: MAEConfig, *, rngs: nnx.Rngs, drop_path_rate: float = 0.0, learn_pos_embed: bool = False):
        self.c = c
        if learn_pos_embed:  # fine-tuning (MAE's timm ViT): a parameter [1, 1+N, width] from the sin-cos table
            self.pos_embed = nnx.Param(jnp.asarray(sincos_table_with_cls(c.grid, c.width)))
        fan_in = c.patch_dim
        # MAE initialises the patch projection like a linear layer (xavier on the flattened kernel).
        self.patch_embed = nnx.Linear(fan_in, c.width, kernel_init=_xavier(), dtype=c.dtype, rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, c.width)) * 0.02)
        self.blocks = nnx.List([Block(c.width, c.heads, c.mlp_dim, attn_impl=c.attn_impl, dtype=c.dtype, rngs=rngs,
                                      drop_path_rate=rate, eps=c.ln_eps)
                                for rate in drop_path_rates(drop_path_rate, c.depth)])
        self.norm = LayerNorm(c.width, epsilon=c.ln_eps, dtype=c.dtype, rngs=rngs, impl=c.attn_impl)

    def embed(self, images: jax.Array, keep_idx: jax.Array | None) -> jax.Array:
        c = self.c
        patches = patchify(images, c.patch)
        if keep_idx is not None:
            patches = take_tokens(patches, keep_idx)  # gather pixels first: thrown/masked never embedded
        learned = getattr(self, 'pos_embed', None)
        table = jnp.asarray(sincos_2d(c.grid, c.width)) if learned is None else learned[...][0, 1:]
        pos = table[None] if keep_idx is None else table[keep_idx]
        x = dense_tokens(self.patch_embed, patches, c.attn_impl) + pos.astype(c.dtype)
        cls = self.cls_token[...] if learned is None else self.cls_token[...] + learned[...][:, :1]
        cls = jnp.broadcast_to(cls.astype(c.dtype), (x.shape[0], 1, c.width))
        return jnp.concatenate([cls, x], axis=1)

    def tokens(self, images: jax.Array, keep_idx: jax.Array | None = None, *,
               drop_key: jax.Array | None = None) -> jax.Array:
        """The tokens ``[B, 1+K, width]`` after the last block, before the final norm."""
        x = self.embed(images, keep_idx)
        for i, block in enumerate(self.blocks):
            x = run_block(block, x, None if drop_key is None else jax.random.fold_in(drop_key, i), self.c.remat)
        return x

    def __call__(self, images: jax.Array, keep_idx: jax.Array | None = None, *,
                 drop_key: jax.Array | None = None) -> jax.Array:
        return self.norm(self.tokens(images, keep_idx, drop_key=drop_key))

    def cls_attention(self, images: jax.Array) -> jax.Array:
        """Last block's [CLS]-to-patch attention on the whole image, [B, heads, N]."""
        x = self.embed(images, None)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        return last.attn.cls_attention(last.norm1(x))


def run_block(block: 'Block', x: jax.Array, drop_key: jax.Array | None, remat: bool) -> jax.Array:
    """One block, under ``nnx.remat`` (activation recomputation in the backward pass) if asked."""
    if not remat:
        return block(x, drop_key=drop_key)
    return nnx.remat(lambda b, y, k: b(y, drop_key=k))(block, x, drop_key)


class MAEDecoder(nnx.Module):
    def __init__(self, c: MAEConfig, *, rngs: nnx.Rngs):
        self.c = c
        self.embed = nnx.Linear(c.width, c.dec_width, kernel_init=_xavier(), dtype=c.dtype, rngs=rngs)
        self.mask_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, c.dec_width)) * 0.02)
        self.blocks = nnx.List([
            Block(c.dec_width, c.dec_heads, c.dec_width * c.dec_mlp_ratio, attn_impl=c.attn_impl, dtype=c.dtype,
                  rngs=rngs, eps=c.ln_eps) for _ in range(c.dec_depth)])
        self.norm = LayerNorm(c.dec_width, epsilon=c.ln_eps, dtype=c.dtype, rngs=rngs, impl=c.attn_impl)
        self.pred = nnx.Linear(c.dec_width, c.patch_dim, kernel_init=_xavier(), dtype=c.dtype, rngs=rngs)

    def __call__(self, latent: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array) -> jax.Array:
        """latent [B, 1+V, width] -> predictions for the masked patches [B, M, patch_dim]."""
        c = self.c
        b, m = masked_idx.shape
        pos = jnp.asarray(sincos_2d(c.grid, c.dec_width)).astype(c.dtype)
        x = dense_tokens(self.embed, latent, c.attn_impl)
        x_vis = x[:, 1:] + pos[visible_idx]
        mask_tok = self.mask_token[...].astype(c.dtype) + pos[masked_idx]
        x = jnp.concatenate([x[:, :1], x_vis, jnp.broadcast_to(mask_tok, (b, m, c.dec_width))], axis=1)
        for block in self.blocks:
            x = run_block(block, x, None, c.remat)
        x = self.norm(x[:, -m:])  # only the mask-token slots are predicted
        return dense_tokens(self.pred, x, c.attn_impl).astype(jnp.float32)


class MAE(nnx.Module):
    def __init__(self, c: MAEConfig, *, rngs: nnx.Rngs):
        self.c = c
        self.encoder = ViTEncoder(c, rngs=rngs)
        self.decoder = MAEDecoder(c, rngs=rngs)

    def __call__(self, images: jax.Array, part) -> tuple[jax.Array, jax.Array]:
        """images [B,H,W,C] (normalised, float), part: a masking.Partition.

        Returns (loss, predictions of the masked patches [B, M, patch_dim]).
        """
        latent = self.encoder(images.astype(self.c.dtype), part.visible)
        pred = self.decoder(latent, part.visible, part.masked)
        target = take_tokens(patchify(images.astype(jnp.float32), self.c.patch), part.masked)
        return mae_loss(pred, target, self.c.norm_pix_loss), pred


def abstract_mae(c: MAEConfig) -> tuple[nnx.GraphDef, dict]:
    """(graphdef, abstract params) of ``MAE(c)``: the params as a pure dict of
    ``jax.ShapeDtypeStruct`` (nothing is initialised or allocated)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MAE(c, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


def init_mae_params(c: MAEConfig, seed: int) -> dict:
    """The initial params of ``MAE(c)`` from ``seed``, as a pure dict (the structure of
    :func:`abstract_mae`'s)."""
    return nnx.to_pure_dict(nnx.split(MAE(c, rngs=nnx.Rngs(seed)))[1])


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)  # MAE uses torch's unbiased .var()
    return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: jax.Array, target: jax.Array, norm_pix: bool) -> jax.Array:
    """Mean squared error over the masked patches only (pred/target hold just those)."""
    if norm_pix:
        target = normalize_patches(target)
    return jnp.mean(jnp.square(pred - target))


def pooled_features(tokens: jax.Array) -> dict[str, jax.Array]:
    """Encoder output [B, 1+N, D] (after its final norm) -> float32 {'cls': [B, D], 'mean': [B, D]}
    (the [CLS] token, and the mean over the patch tokens)."""
    return {'cls': tokens[:, 0].astype(jnp.float32), 'mean': tokens[:, 1:].astype(jnp.float32).mean(1)}

"""ViT encoder and MAE decoder (Flax NNX).

The MAE forward pass never scatters or unshuffles: the masking partition gives three
index arrays (visible, thrown, masked), the encoder runs on the visible patches only,
and the decoder runs on ``[cls, visible..., mask tokens at masked positions...]`` with
position embeddings gathered by index. Thrown patches are never computed anywhere.

For evaluation, :class:`Classifier` puts MAE's fine-tuning or linear-probe head on the same
encoder (with optional drop path), run functionally by :func:`classifier_apply`.
"""
from __future__ import annotations

import dataclasses
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


def dense_tokens(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """Applies a Linear to [B, N, D] as one [B*N, D] matrix product. XLA:CPU runs the
    2-D form (and its weight gradient) markedly faster; on GPU/TPU it is the same op."""
    return layer(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


ATTN_IMPLS = ('auto', 'xla', 'cudnn', 'einsum')


def attention(q: jax.Array, k: jax.Array, v: jax.Array, impl: str | None) -> jax.Array:
    """The one place where the attention implementation is chosen. q, k, v: [B, N, heads, dim].

    'xla', 'cudnn': ``jax.nn.dot_product_attention`` ('cudnn' is the fused flash kernel on
    NVIDIA GPUs). 'einsum': the same maths with the heads next to the batch, which XLA:CPU
    runs faster (10% of a ViT-Ti/4 CIFAR step). 'auto': 'einsum' on the CPU, elsewhere
    ``jax.nn.dot_product_attention`` choosing for itself.
    """
    if impl == 'auto':
        impl = 'einsum' if jax.default_backend() == 'cpu' else None
    if impl != 'einsum':
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
    logits = jnp.einsum('bhqd,bhkd->bhqk', q, k) / np.sqrt(q.shape[-1]).astype(q.dtype)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    return jnp.einsum('bhqk,bhkd->bhqd', probs, v).transpose(0, 2, 1, 3)


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
        q, k, v = jnp.split(dense_tokens(self.qkv, x).reshape(b, n, 3, self.heads, d // self.heads), 3, axis=2)
        y = attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], self.attn_impl)
        return dense_tokens(self.proj, y.reshape(b, n, d))

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
    def __init__(self, dim: int, hidden: int, *, dtype, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, hidden, kernel_init=_xavier(), dtype=dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, kernel_init=_xavier(), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return dense_tokens(self.fc2, gelu(dense_tokens(self.fc1, x)))


def drop_path(key: jax.Array, x: jax.Array, rate: float) -> jax.Array:
    """Stochastic depth on a residual branch ``x`` [B, ...] (timm's ``DropPath``): each sample's
    branch is zeroed with probability ``rate`` and otherwise scaled by ``1 / (1 - rate)``, so
    the expectation is ``x``. ``rate`` 1 drops every branch."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f'drop path rate {rate} is not in [0, 1]')
    if rate == 0.0:
        return x
    if rate == 1.0:
        return jnp.zeros_like(x)
    keep_prob = 1.0 - rate
    keep = jax.random.bernoulli(key, keep_prob, (x.shape[0],)).reshape((-1,) + (1,) * (x.ndim - 1))
    return x * (keep.astype(x.dtype) / jnp.asarray(keep_prob, x.dtype))


def drop_path_rates(max_rate: float, depth: int) -> list[float]:
    """Per-block drop path rates rising linearly from 0 to ``max_rate`` (timm / MAE:
    ``torch.linspace(0, drop_path_rate, depth)``)."""
    if not 0.0 <= max_rate <= 1.0:
        raise ValueError(f'drop_path_rate={max_rate} is not in [0, 1]')
    return [float(r) for r in np.linspace(0.0, max_rate, depth)]


class Block(nnx.Module):
    """Pre-norm transformer block (timm / MAE layout).

    ``drop_path_rate`` (static) is the stochastic-depth rate of both residual branches; it
    acts only when ``__call__`` gets a ``drop_key`` (branch k uses ``fold_in(drop_key, k)``).
    Without a key the block is deterministic and computes exactly what it always did.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, attn_impl, dtype, rngs: nnx.Rngs,
                 drop_path_rate: float = 0.0):
        if not 0.0 <= drop_path_rate <= 1.0:
            raise ValueError(f'drop_path_rate={drop_path_rate} is not in [0, 1]')
        self.norm1 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.attn = Attention(dim, heads, attn_impl=attn_impl, dtype=dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, epsilon=1e-6, dtype=dtype, rngs=rngs)
        self.mlp = Mlp(dim, mlp_dim, dtype=dtype, rngs=rngs)
        self.drop_path_rate = float(drop_path_rate)

    def __call__(self, x, *, drop_key: jax.Array | None = None):
        if drop_key is None or self.drop_path_rate == 0.0:
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        rate = self.drop_path_rate
        x = x + drop_path(jax.random.fold_in(drop_key, 0), self.attn(self.norm1(x)), rate)
        return x + drop_path(jax.random.fold_in(drop_key, 1), self.mlp(self.norm2(x)), rate)


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
        attn_impl=model_cfg.attn_impl, remat=bool(model_cfg.get('remat', False)))


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
                                      drop_path_rate=rate)
                                for rate in drop_path_rates(drop_path_rate, c.depth)])
        self.norm = nnx.LayerNorm(c.width, epsilon=1e-6, dtype=c.dtype, rngs=rngs)

    def embed(self, images: jax.Array, keep_idx: jax.Array | None) -> jax.Array:
        c = self.c
        patches = patchify(images, c.patch)
        if keep_idx is not None:
            patches = take_tokens(patches, keep_idx)  # gather pixels first: thrown/masked never embedded
        learned = getattr(self, 'pos_embed', None)
        table = jnp.asarray(sincos_2d(c.grid, c.width)) if learned is None else learned[...][0, 1:]
        pos = table[None] if keep_idx is None else table[keep_idx]
        x = dense_tokens(self.patch_embed, patches) + pos.astype(c.dtype)
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
                  rngs=rngs) for _ in range(c.dec_depth)])
        self.norm = nnx.LayerNorm(c.dec_width, epsilon=1e-6, dtype=c.dtype, rngs=rngs)
        self.pred = nnx.Linear(c.dec_width, c.patch_dim, kernel_init=_xavier(), dtype=c.dtype, rngs=rngs)

    def __call__(self, latent: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array) -> jax.Array:
        """latent [B, 1+V, width] -> predictions for the masked patches [B, M, patch_dim]."""
        c = self.c
        b, m = masked_idx.shape
        pos = jnp.asarray(sincos_2d(c.grid, c.dec_width)).astype(c.dtype)
        x = dense_tokens(self.embed, latent)
        x_vis = x[:, 1:] + pos[visible_idx]
        mask_tok = self.mask_token[...].astype(c.dtype) + pos[masked_idx]
        x = jnp.concatenate([x[:, :1], x_vis, jnp.broadcast_to(mask_tok, (b, m, c.dec_width))], axis=1)
        for block in self.blocks:
            x = run_block(block, x, None, c.remat)
        x = self.norm(x[:, -m:])  # only the mask-token slots are predicted
        return dense_tokens(self.pred, x).astype(jnp.float32)


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


def normalize_patches(target: jax.Array, eps: float = 1e-6) -> jax.Array:
    mean = target.mean(-1, keepdims=True)
    var = target.var(-1, keepdims=True, ddof=1)  # MAE uses torch's unbiased .var()
    return (target - mean) / jnp.sqrt(var + eps)


def mae_loss(pred: jax.Array, target: jax.Array, norm_pix: bool) -> jax.Array:
    """Mean squared error over the masked patches only (pred/target hold just those)."""
    if norm_pix:
        target = normalize_patches(target)
    return jnp.mean(jnp.square(pred - target))


# ------------------------------------------------------------------------------ classification

CLASSIFIER_HEADS = ('finetune', 'linear_probe')
CLASSIFIER_POOLS = ('mean', 'cls')


def _timm_trunc_normal(std: float) -> nnx.Initializer:
    """timm's ``trunc_normal_(w, std=std)``: its bounds (-2, 2) are absolute, not in units of
    ``std``, so at the small stds used for heads it is a plain normal(0, std)."""
    return nnx.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


def pooled_features(tokens: jax.Array) -> dict[str, jax.Array]:
    """Encoder output [B, 1+N, D] (after its final norm) -> float32 {'cls': [B, D], 'mean': [B, D]}
    (the [CLS] token, and the mean over the patch tokens)."""
    return {'cls': tokens[:, 0].astype(jnp.float32), 'mean': tokens[:, 1:].astype(jnp.float32).mean(1)}


def _linear_probe_layers(dim: int, num_classes: int, rngs: nnx.Rngs) -> tuple[nnx.BatchNorm, nnx.Linear]:
    """MAE's linear-probe head (``main_linprobe.py``): BatchNorm without affine (eps 1e-6),
    then a linear layer (trunc-normal std 0.01, bias 0)."""
    bn = nnx.BatchNorm(dim, use_running_average=True, use_bias=False, use_scale=False, epsilon=1e-6, momentum=0.9,
                       rngs=rngs)
    head = nnx.Linear(dim, num_classes, kernel_init=_timm_trunc_normal(0.01),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)
    return bn, head


class LinearProbeHead(nnx.Module):
    """The linear-probe head of :class:`Classifier` without the encoder, on features [B, D]
    (the fast linear probe); its params and stats have the Classifier's names (``head``, ``bn``)."""

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.bn, self.head = _linear_probe_layers(dim, num_classes, rngs)

    def __call__(self, feats: jax.Array, *, train: bool = False) -> jax.Array:
        return self.head(self.bn(feats, use_running_average=not train)).astype(jnp.float32)


class Classifier(nnx.Module):
    """A ViT encoder with a classification head, as MAE's fine-tuning and linear probe.

    ``self.encoder`` is a :class:`ViTEncoder` with the parameter names and shapes of
    ``MAE.encoder``, so ``params['encoder']`` of a pre-training checkpoint drops in (see
    :func:`load_encoder`). The head, by ``head`` and ``pool``:

    * ``'finetune'`` (MAE ``models_vit.py``): ``pool='mean'`` (MAE's ``global_pool``) averages
      the patch tokens *before* the encoder's final norm and applies ``fc_norm`` (LayerNorm, eps
      1e-6); ``encoder.norm`` is then unused (MAE deletes it; here it stays, so that the
      encoder keeps the pre-training structure, and gets zero gradients). ``pool='cls'``:
      the [CLS] token after ``encoder.norm``. Then ``head``: Linear, weights ~ N(0, 2e-5),
      bias 0. ``drop_path_rate``: stochastic depth, rising linearly over the blocks.
    * ``'linear_probe'`` (MAE ``main_linprobe.py``): features from the frozen encoder (a
      ``stop_gradient``: no gradient reaches the encoder), i.e. the [CLS] token after the
      final norm (``pool='cls'``, MAE's default) or the mean of the normed patch tokens
      (``pool='mean'``, the same features as :meth:`features`; MAE's ``--global_pool`` probe
      would instead take an untrained LayerNorm of the mean of the pre-norm tokens), then
      ``bn`` = BatchNorm without scale or bias (eps 1e-6; flax momentum 0.9 = torch's 0.1)
      and ``head``: Linear, weights ~ N(0, 0.01), bias 0, both in float32. Only
      ``params['head']`` is to be trained (``optim.freeze_encoder`` masks the encoder out of
      the optimizer).

    BatchNorm in the functional (pure dict) style: the state is split in two pure dicts,
    ``params`` (``nnx.Param``: what the optimizer sees) and ``stats`` (``nnx.BatchStat``:
    the running ``mean`` / ``var`` under ``stats['bn']``; ``{}`` for the fine-tuning head).
    :func:`classifier_apply` merges both, runs the model and returns the logits with the new
    stats. With ``train=True`` the BatchNorm normalises with the statistics of the batch
    (under ``jit`` with a sharded batch: of the global batch) and moves the running averages
    towards them, and the train step must keep the returned stats; with ``train=False`` it
    normalises with the running averages and the stats come back unchanged. (Running
    variances are the biased batch variances, torch keeps the unbiased ones.)
    """

    def __init__(self, c: MAEConfig, num_classes: int, *, pool: str = 'mean', head: str = 'finetune',
                 drop_path_rate: float = 0.0, learn_pos_embed: bool = False, rngs: nnx.Rngs):
        if head not in CLASSIFIER_HEADS:
            raise ValueError(f'head={head!r}; valid: {CLASSIFIER_HEADS}')
        if pool not in CLASSIFIER_POOLS:
            raise ValueError(f'pool={pool!r}; valid: {CLASSIFIER_POOLS}')
        if head == 'linear_probe' and drop_path_rate:
            raise ValueError('the linear probe runs a frozen encoder: drop_path_rate must be 0')
        if head == 'linear_probe' and learn_pos_embed:
            raise ValueError('the linear probe runs a frozen encoder: learn_pos_embed must be False')
        if num_classes < 1:
            raise ValueError(f'num_classes={num_classes} must be positive')
        self.c, self.pool, self.head_type = c, pool, head
        self.encoder = ViTEncoder(c, drop_path_rate=drop_path_rate, learn_pos_embed=learn_pos_embed, rngs=rngs)
        zeros = nnx.initializers.zeros_init()
        if head == 'finetune':
            if pool == 'mean':
                self.fc_norm = nnx.LayerNorm(c.width, epsilon=1e-6, dtype=c.dtype, rngs=rngs)
            self.head = nnx.Linear(c.width, num_classes, kernel_init=_timm_trunc_normal(2e-5), bias_init=zeros,
                                   dtype=c.dtype, rngs=rngs)
        else:
            self.bn, self.head = _linear_probe_layers(c.width, num_classes, rngs)

    def __call__(self, images: jax.Array, *, train: bool = False, drop_key: jax.Array | None = None) -> jax.Array:
        """images [B, H, W, C] (normalised) -> float32 logits [B, num_classes].

        ``train`` only selects the BatchNorm mode of the linear probe (batch statistics, which
        it then records in its running averages); drop path acts only when ``drop_key`` is
        given (use :func:`classifier_apply`, which passes it in training only).
        """
        x = images.astype(self.c.dtype)
        if self.head_type == 'finetune':
            if self.pool == 'mean':
                feats = self.fc_norm(self.encoder.tokens(x, drop_key=drop_key)[:, 1:].mean(1))
            else:
                feats = self.encoder(x, drop_key=drop_key)[:, 0]
            return self.head(feats).astype(jnp.float32)
        feats = jax.lax.stop_gradient(pooled_features(self.encoder(x, drop_key=drop_key))[self.pool])
        return self.head(self.bn(feats, use_running_average=not train)).astype(jnp.float32)

    def features(self, images: jax.Array) -> dict[str, jax.Array]:
        """Deterministic float32 features of the encoder (with its final norm), for kNN and
        the fast linear probe: {'cls': [B, D], 'mean': [B, D]} (see :func:`pooled_features`)."""
        return pooled_features(self.encoder(images.astype(self.c.dtype)))


def split_classifier(model: Classifier) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, stats): ``params`` the ``nnx.Param`` pure dict (trained by the
    optimizer), ``stats`` the ``nnx.BatchStat`` pure dict (``{}`` without BatchNorm). Works
    on the abstract model of ``nnx.eval_shape(lambda: Classifier(...))`` too."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def classifier_apply(graphdef: nnx.GraphDef, params: dict, stats: dict, images: jax.Array, *, train: bool,
                     drop_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Pure forward pass of a :class:`Classifier`: ``(logits [B, K] float32, new stats)``.

    ``train=True``: drop path with ``drop_key`` (if given) and BatchNorm on batch statistics;
    return the new stats in the train state. ``train=False``: deterministic (``drop_key`` is
    ignored), running statistics, ``stats`` returned unchanged. Differentiable in ``params``;
    jit it (or the step around it) with ``graphdef`` and ``train`` static.
    """
    model = nnx.merge(graphdef, params, stats)
    logits = model(images, train=train, drop_key=drop_key if train else None)
    return logits, nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))


def load_encoder(params: dict, encoder_params: dict) -> dict:
    """``params`` (a :class:`Classifier`'s pure dict) with ``params['encoder']`` replaced by
    ``encoder_params`` (e.g. ``params['encoder']`` of an MAE checkpoint), after checking that
    both have the same structure, shapes and dtypes (arrays or ``jax.ShapeDtypeStruct`` s)."""
    want, got = params['encoder'], encoder_params
    if 'pos_embed' in want and 'pos_embed' not in got:  # pre-trained with the fixed table: start from it
        got = {**got, 'pos_embed': want['pos_embed']}
    s_want, s_got = jax.tree.structure(want), jax.tree.structure(got)
    if s_want != s_got:
        raise ValueError(f'the encoder parameters do not match the classifier: expected {s_want}, got {s_got}')
    bad = [f'{jax.tree_util.keystr(path)}: expected {a.shape} {a.dtype}, got {b.shape} {b.dtype}'
           for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got))
           if (a.shape, a.dtype) != (b.shape, b.dtype)]
    if bad:
        raise ValueError('the encoder parameters do not match the classifier: ' + '; '.join(bad[:5]))
    return {**params, 'encoder': got}

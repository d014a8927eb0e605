"""Semantic segmentation on the pre-trained ViT (Flax NNX): mmseg's MAE + UperNet recipe.

The model is mmsegmentation's ``EncoderDecoder`` of ColorMAE's ADE20K config
(``colormae-base_upernet_8xb2-amp-160k_ade20k-512x512.py``, docs/segmentation.md):

* :class:`SegViT`, mmseg's ``MAE`` backbone: our :class:`model.ViTEncoder` (same parameter
  names, so a pre-trained encoder drops in) with a learned position table, and blocks
  (:class:`SegBlock`) that add BEiT's layer scale (``gamma_1``, ``gamma_2``, init 1.0) and a
  zero-initialised relative position bias per block; the patch tokens after blocks
  ``out_indices`` (3, 5, 7, 11) come out as [B, g, g, D] maps, with no final norm;
* :class:`Feature2Pyramid`: rescales 4 (deconv, BN, GELU, deconv), 2 (deconv), 1, 0.5 (max pool);
* :class:`UPerHead` (PPM with scales 1, 2, 3, 6 on the last level, FPN, 3x3 fusion) and the
  auxiliary :class:`FCNHead` on the third level; conv + BN + ReLU modules, channel dropout
  (``Dropout2d``) before the 1x1 classifier;
* :func:`seg_loss`: the logits resized (bilinear, ``align_corners=False``) to the labels,
  cross-entropy with ignore index 255, averaged over all pixels as mmseg's default
  (``avg_non_ignore=False``); the auxiliary head's weighted 0.4.

BatchNorm is mmseg's SyncBN: under ``jit`` with a batch-sharded input the batch statistics are
those of the global batch, and the running variance moves with the unbiased one (:class:`BN`).
Also: sliding-window inference (:func:`slide_logits`) and the mIoU / aAcc / mAcc of mmseg's
``IoUMetric`` (:func:`intersect_and_union`, :func:`seg_metrics`).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from colormae_jax.models import mae as model_lib, norm

IGNORE_INDEX = 255


@dataclasses.dataclass(frozen=True)
class SegConfig:
    """The static shape and options of a :class:`SegModel` (``config.seg``; docs/segmentation.md)."""
    num_classes: int = 150
    out_indices: tuple[int, ...] = (3, 5, 7, 11)
    rescales: tuple[float, ...] = (4, 2, 1, 0.5)
    channels: int = 768  # UPerHead
    pool_scales: tuple[int, ...] = (1, 2, 3, 6)
    aux_channels: int = 256  # FCNHead
    aux_in_index: int = 2
    dropout: float = 0.1
    drop_path: float = 0.1
    layer_scale: float = 1.0  # BEiT's gamma init (0: no layer scale)
    rel_pos_bias: bool = True  # BEiT's relative position bias (zero init, learned)
    bn_momentum: float = 0.9  # flax's (torch's 0.1)
    bn_eps: float = 1e-5


# ------------------------------------------------------------------------------ ops as torch's

def resize_bilinear(x: jax.Array, hw: Sequence[int]) -> jax.Array:
    """[B, H, W, C] -> [B, h, w, C], ``F.interpolate(mode='bilinear', align_corners=False)``
    (half-pixel centres, no antialiasing; pinned against torch in tests/test_segment.py)."""
    hw = tuple(int(s) for s in hw)
    if tuple(x.shape[1:3]) == hw:
        return x
    # two small matrix products: the same weights as jax.image.resize(antialias=False), a simpler graph
    mh, mw = bilinear_matrix(x.shape[1], hw[0]), bilinear_matrix(x.shape[2], hw[1])
    return jnp.einsum('ih,bhwc,jw->bijc', mh.astype(x.dtype), x, mw.astype(x.dtype))


def adaptive_pool_matrix(n: int, s: int) -> np.ndarray:
    """[s, n] averaging weights of torch's ``AdaptiveAvgPool`` (bin i: floor(i n / s) to ceil((i+1) n / s))."""
    m = np.zeros((s, n), np.float32)
    for i in range(s):
        a, b = (i * n) // s, -(-((i + 1) * n) // s)
        m[i, a:b] = 1.0 / (b - a)
    return m


def adaptive_avg_pool(x: jax.Array, s: int) -> jax.Array:
    """[B, H, W, C] -> [B, s, s, C], as ``nn.AdaptiveAvgPool2d(s)``."""
    mh, mw = adaptive_pool_matrix(x.shape[1], s), adaptive_pool_matrix(x.shape[2], s)
    return jnp.einsum('ih,bhwc,jw->bijc', mh, x, mw)


def dropout2d(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """``nn.Dropout2d`` on [B, H, W, C]: whole channels of a sample dropped; identity without a key."""
    if key is None or rate == 0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0], 1, 1, x.shape[3]))
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _kaiming_fan_out():  # mmcv ConvModule: kaiming_init(mode='fan_out', nonlinearity='relu'), normal
    return nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _torch_default(fan_in: int):  # torch's default Conv/ConvTranspose init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / np.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


# ------------------------------------------------------------------------------ backbone

def rel_pos_index(grid: int) -> np.ndarray:
    """BEiT's ``relative_position_index`` [1+N, 1+N] for a grid x grid window with a [CLS] token
    (the last three table rows: cls-to-token, token-to-cls, cls-to-cls)."""
    coords = np.stack(np.meshgrid(np.arange(grid), np.arange(grid), indexing='ij')).reshape(2, -1)
    rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0)
    rel[..., 0] += grid - 1
    rel[..., 1] += grid - 1
    rel[..., 0] *= 2 * grid - 1
    num = (2 * grid - 1) ** 2 + 3
    n = grid * grid
    idx = np.zeros((n + 1, n + 1), np.int32)
    idx[1:, 1:] = rel.sum(-1)
    idx[0, 0:] = num - 3
    idx[0:, 0] = num - 2
    idx[0, 0] = num - 1
    return idx


class SegBlock(model_lib.Block):
    """mmseg's ``MAETransformerEncoderLayer`` (BEiT's layer): :class:`model.Block` (same parameter
    names) with learned layer scales ``gamma_1``, ``gamma_2`` and a relative position bias table
    (zero init) added to the attention logits."""

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, grid: int, layer_scale: float, rel_pos_bias: bool,
                 **kw):
        super().__init__(dim, heads, mlp_dim, **kw)
        self.grid = grid
        if layer_scale:
            self.gamma_1 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
            self.gamma_2 = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))
        if rel_pos_bias:
            self.rel_pos_bias = nnx.Param(jnp.zeros(((2 * grid - 1) ** 2 + 3, heads), jnp.float32))

    def attend(self, x: jax.Array) -> jax.Array:
        a = self.attn
        b, n, d = x.shape
        h = a.heads
        qkv = model_lib.dense_tokens(a.qkv, x).reshape(b, n, 3, h, d // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = jnp.einsum('bqhd,bkhd->bhqk', q * np.float32((d // h) ** -0.5).astype(q.dtype), k)
        logits = logits.astype(jnp.float32)
        table = getattr(self, 'rel_pos_bias', None)
        if table is not None:
            idx = rel_pos_index(self.grid)
            if idx.shape[0] != n:
                raise ValueError(f'{n} tokens, but the relative position table is for a {self.grid}x{self.grid} grid')
            logits = logits + table[...][idx.reshape(-1)].reshape(n, n, h).transpose(2, 0, 1)[None]
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        y = jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, n, d)
        return model_lib.dense_tokens(a.proj, y)

    def __call__(self, x, *, drop_key: jax.Array | None = None):
        def branch(i: int, y: jax.Array, gamma: str) -> jax.Array:
            g = getattr(self, gamma, None)
            if g is not None:
                y = y * g[...].astype(y.dtype)
            if drop_key is None:
                return y
            return self.drop_path(y, deterministic=False, rngs=jax.random.fold_in(drop_key, i))

        x = x + branch(0, self.attend(self.norm1(x)), 'gamma_1')
        return x + branch(1, self.mlp(self.norm2(x)), 'gamma_2')


class SegViT(model_lib.ViTEncoder):
    """mmseg's ``MAE`` backbone: a :class:`model.ViTEncoder` (learned position table, same
    parameter names) whose blocks are :class:`SegBlock` s; :meth:`features` gives the patch
    tokens after blocks ``out_indices`` as [B, g, g, width] maps (no final norm:
    ``final_norm=False``; ``norm`` stays in the tree, unused)."""

    def __init__(self, c: model_lib.MAEConfig, s: SegConfig, *, rngs: nnx.Rngs):
        super().__init__(c, rngs=rngs, drop_path_rate=0.0, learn_pos_embed=True)
        self.out_indices = tuple(int(i) for i in s.out_indices)
        if not all(0 <= i < c.depth for i in self.out_indices):
            raise ValueError(f'out_indices {self.out_indices}: the encoder has blocks 0..{c.depth - 1}')
        self.blocks = nnx.List([
            SegBlock(c.width, c.heads, c.mlp_dim, grid=c.grid, layer_scale=s.layer_scale, rel_pos_bias=s.rel_pos_bias,
                     attn_impl=c.attn_impl, dtype=c.dtype, rngs=rngs, drop_path_rate=rate, eps=c.ln_eps)
            for rate in model_lib.drop_path_rates(s.drop_path, c.depth)])

    def features(self, images: jax.Array, *, drop_key: jax.Array | None = None) -> list[jax.Array]:
        c = self.c
        b, h, w, _ = images.shape
        x = self.embed(images.astype(c.dtype), None)
        outs = {}
        for i, block in enumerate(self.blocks[:max(self.out_indices) + 1]):
            x = model_lib.run_block(block, x, None if drop_key is None else jax.random.fold_in(drop_key, i), c.remat)
            if i in self.out_indices:
                outs[i] = x[:, 1:].reshape(b, h // c.patch, w // c.patch, c.width)
        return [outs[i] for i in self.out_indices]  # an index may repeat (a one-block smoke encoder)


# ------------------------------------------------------------------------------ neck and heads

class BN(norm.TorchBatchNorm):
    """BatchNorm (SyncBN under a sharded jit) with torch's running variance; ``train`` picks batch
    statistics (docs/segmentation.md)."""

    def __init__(self, n: int, s: SegConfig, rngs: nnx.Rngs):
        super().__init__(n, momentum=s.bn_momentum, epsilon=s.bn_eps, use_running_average=True, rngs=rngs)


class ConvModule(nnx.Module):
    """mmcv's ``ConvModule`` with a norm: conv (no bias), BN, ReLU."""

    def __init__(self, cin: int, cout: int, k: int, s: SegConfig, rngs: nnx.Rngs):
        self.conv = nnx.Conv(cin, cout, (k, k), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                             kernel_init=_kaiming_fan_out(), rngs=rngs)
        self.bn = BN(cout, s, rngs)

    def __call__(self, x, train: bool):
        return jax.nn.relu(self.bn(self.conv(x), use_running_average=not train))


def _deconv(dim: int, rngs: nnx.Rngs) -> nnx.ConvTranspose:
    fan = dim * 4
    return nnx.ConvTranspose(dim, dim, (2, 2), strides=(2, 2), padding='VALID', kernel_init=_torch_default(fan),
                             bias_init=_torch_default(fan), rngs=rngs)


class Feature2Pyramid(nnx.Module):
    """mmseg's ``Feature2Pyramid``: rescale 4 = deconv 2x2/2, BN, GELU, deconv; 2 = deconv;
    1 = identity; 0.5 and 0.25 = max pool."""

    def __init__(self, dim: int, s: SegConfig, rngs: nnx.Rngs):
        self.rescales = tuple(float(r) for r in s.rescales)
        bad = set(self.rescales) - {4.0, 2.0, 1.0, 0.5, 0.25}
        if bad:
            raise ValueError(f'rescales {sorted(bad)}: valid are 4, 2, 1, 0.5, 0.25')
        if 4.0 in self.rescales:
            self.up4_a, self.up4_bn, self.up4_b = _deconv(dim, rngs), BN(dim, s, rngs), _deconv(dim, rngs)
        if 2.0 in self.rescales:
            self.up2 = _deconv(dim, rngs)

    def __call__(self, feats: Sequence[jax.Array], train: bool) -> list[jax.Array]:
        outs = []
        for r, x in zip(self.rescales, feats):
            if r == 4.0:
                x = self.up4_b(model_lib.gelu(self.up4_bn(self.up4_a(x), use_running_average=not train)))
            elif r == 2.0:
                x = self.up2(x)
            elif r < 1.0:
                k = int(round(1 / r))
                x = nnx.max_pool(x, (k, k), strides=(k, k))
            outs.append(x)
        return outs


class _SegHead(nnx.Module):
    """What mmseg's ``BaseDecodeHead`` adds: Dropout2d, then the 1x1 ``conv_seg`` (N(0, 0.01), bias 0)."""

    def _init_cls(self, channels: int, s: SegConfig, rngs: nnx.Rngs):
        self.dropout_rate = float(s.dropout)
        self.conv_seg = nnx.Conv(channels, s.num_classes, (1, 1), kernel_init=nnx.initializers.normal(0.01),
                                 bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def cls_seg(self, x, key):
        return self.conv_seg(dropout2d(x, self.dropout_rate, key)).astype(jnp.float32)


class UPerHead(_SegHead):
    """mmseg's ``UPerHead``: PPM on the last level + bottleneck, lateral 1x1 convs, top-down sums
    (bilinear), 3x3 FPN convs, everything resized to the first level, 3x3 fusion, classifier."""

    def __init__(self, dim: int, s: SegConfig, rngs: nnx.Rngs):
        ch, n = s.channels, len(s.rescales)
        self.pool_scales = tuple(int(p) for p in s.pool_scales)
        self.psp = nnx.List([ConvModule(dim, ch, 1, s, rngs) for _ in self.pool_scales])
        self.bottleneck = ConvModule(dim + len(self.pool_scales) * ch, ch, 3, s, rngs)
        self.lateral = nnx.List([ConvModule(dim, ch, 1, s, rngs) for _ in range(n - 1)])
        self.fpn = nnx.List([ConvModule(ch, ch, 3, s, rngs) for _ in range(n - 1)])
        self.fpn_bottleneck = ConvModule(n * ch, ch, 3, s, rngs)
        self._init_cls(ch, s, rngs)

    def __call__(self, feats: Sequence[jax.Array], train: bool, key=None) -> jax.Array:
        top = feats[-1]
        psp = [top] + [resize_bilinear(m(adaptive_avg_pool(top, p), train), top.shape[1:3])
                       for m, p in zip(self.psp, self.pool_scales)]
        lat = [m(x, train) for m, x in zip(self.lateral, feats[:-1])] + [
            self.bottleneck(jnp.concatenate(psp, -1), train)]
        for i in range(len(lat) - 1, 0, -1):
            lat[i - 1] = lat[i - 1] + resize_bilinear(lat[i], lat[i - 1].shape[1:3])
        outs = [m(x, train) for m, x in zip(self.fpn, lat[:-1])] + [lat[-1]]
        outs = [outs[0]] + [resize_bilinear(x, outs[0].shape[1:3]) for x in outs[1:]]
        return self.cls_seg(self.fpn_bottleneck(jnp.concatenate(outs, -1), train), key)


class FCNHead(_SegHead):
    """mmseg's ``FCNHead`` (num_convs=1, kernel 3, concat_input=False) on level ``aux_in_index``."""

    def __init__(self, dim: int, s: SegConfig, rngs: nnx.Rngs):
        self.conv = ConvModule(dim, s.aux_channels, 3, s, rngs)
        self._init_cls(s.aux_channels, s, rngs)

    def __call__(self, x: jax.Array, train: bool, key=None) -> jax.Array:
        return self.cls_seg(self.conv(x, train), key)


class SegModel(nnx.Module):
    """Backbone (``encoder``: pre-trained names), neck, decode head, auxiliary head.
    ``__call__`` -> (logits at 1/4 of the input, auxiliary logits at 1/16), float32 [B, h, w, K]."""

    def __init__(self, c: model_lib.MAEConfig, s: SegConfig, *, rngs: nnx.Rngs):
        if len(s.rescales) != len(s.out_indices):
            raise ValueError(f'{len(s.out_indices)} out_indices but {len(s.rescales)} rescales')
        self.s = s
        self.encoder = SegViT(c, s, rngs=rngs)
        self.neck = Feature2Pyramid(c.width, s, rngs)
        self.decode_head = UPerHead(c.width, s, rngs)
        self.auxiliary_head = FCNHead(c.width, s, rngs)

    def __call__(self, images: jax.Array, *, train: bool = False, key: jax.Array | None = None):
        keys = [None] * 3 if key is None else list(jax.random.split(key, 3))
        feats = self.neck(self.encoder.features(images, drop_key=keys[0]), train)
        main = self.decode_head(feats, train, keys[1])
        aux = self.auxiliary_head(feats[self.s.aux_in_index], train, keys[2]) if train else None
        return main, aux


def split_model(m: SegModel) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, batch stats) as pure dicts."""
    graphdef, params, stats = nnx.split(m, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def init_model(c: model_lib.MAEConfig, s: SegConfig, seed: int) -> tuple[nnx.GraphDef, dict, dict]:
    """:func:`split_model` of a new ``SegModel(c, s)``, initialised in one jitted call (building
    the model eagerly dispatches every initialiser op by op: 20 s for a tiny model on a busy CPU)."""
    graphdef, init = _initializer(c, s, seed)
    params, stats = init()
    return graphdef, params, stats


@functools.lru_cache(maxsize=4)
def _initializer(c: model_lib.MAEConfig, s: SegConfig, seed: int):
    """(graphdef, jitted init) per model: a second run in the same process (a resumed one, a
    sweep) reuses the compiled initialiser; only the executable is kept, not the arrays."""
    graphdef = split_model(nnx.eval_shape(lambda: SegModel(c, s, rngs=nnx.Rngs(seed))))[0]
    return graphdef, jax.jit(lambda: split_model(SegModel(c, s, rngs=nnx.Rngs(seed)))[1:])


def apply(graphdef, params, stats, images, *, train: bool, key=None):
    """Pure forward: ((logits, aux logits or None), new stats)."""
    m = nnx.merge(graphdef, params, stats)
    out = m(images, train=train, key=key if train else None)
    return out, nnx.to_pure_dict(nnx.state(m, nnx.BatchStat))


def load_encoder(params: dict, encoder: dict, pos_embed: np.ndarray) -> dict:
    """``params`` with the pre-trained ``encoder`` parameters put in, ``pos_embed`` [1, 1+N, D]
    (resized to this grid) as the learned table; what the pre-trained encoder lacks (layer
    scales, relative position tables) keeps its initial value. Shapes are checked."""
    want = params['encoder']
    flat_want = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(want)}
    got = dict(encoder, pos_embed=np.asarray(pos_embed, np.float32))
    flat_got = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(got)}
    extra = sorted(set(flat_got) - set(flat_want))
    if extra:
        raise ValueError(f'the pre-trained encoder has parameters the segmentation backbone lacks: {extra[:5]}')
    bad = [f'{k}: expected {flat_want[k].shape}, got {np.shape(v)}' for k, v in flat_got.items()
           if tuple(flat_want[k].shape) != tuple(np.shape(v))]
    if bad:
        raise ValueError('the pre-trained encoder does not match the segmentation backbone: ' + '; '.join(bad[:5]))
    merged = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.asarray(flat_got.get(jax.tree_util.keystr(p), x), x.dtype), want)
    return {**params, 'encoder': merged}


# ------------------------------------------------------------------------------ loss

def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = IGNORE_INDEX,
                  avg_non_ignore: bool = False) -> jax.Array:
    """mmseg's ``CrossEntropyLoss`` after ``loss_by_feat``: logits [B, h, w, K] resized to the
    labels [B, H, W] (bilinear), per-pixel CE, ignored pixels 0, averaged over all pixels
    (``avg_non_ignore=False``, mmseg's default) or over the others."""
    logits = resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])
    labels = labels.astype(jnp.int32)
    valid = labels != ignore_index
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(valid, labels, 0))
    total = jnp.where(valid, ce, 0.0).sum()
    denom = jnp.maximum(valid.sum(), 1) if avg_non_ignore else labels.size
    return total / denom


def seg_loss(main: jax.Array, aux: jax.Array | None, labels: jax.Array, *, aux_weight: float = 0.4,
             avg_non_ignore: bool = False) -> tuple[jax.Array, dict]:
    """decode CE + ``aux_weight`` x auxiliary CE; also the pixel accuracy of the decode head (mmseg's ``acc_seg``)."""
    l_main = cross_entropy(main, labels, avg_non_ignore=avg_non_ignore)
    out = {'loss_decode': l_main}
    loss = l_main
    if aux is not None:
        out['loss_aux'] = cross_entropy(aux, labels, avg_non_ignore=avg_non_ignore)
        loss = loss + aux_weight * out['loss_aux']
    return loss, out


# ------------------------------------------------------------------------------ inference

def slide_windows(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg's ``slide_inference`` windows (y1, y2, x1, x2): a grid of stride ``stride``, the last
    row and column moved back to end at the border."""
    hg = max(h - crop + stride - 1, 0) // stride + 1
    wg = max(w - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(hg):
        for j in range(wg):
            y2, x2 = min(i * stride + crop, h), min(j * stride + crop, w)
            out.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return out


def slide_logits(fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, *, crop: int, stride: int,
                 num_classes: int, batch: int = 1) -> np.ndarray:
    """Logits [H, W, K] of an image [H, W, C] (normalised): ``fn`` (windows [n, crop, crop, C] ->
    logits [n, crop, crop, K], ``n`` = ``batch``) on every window, summed where windows overlap and
    divided by the count. An image smaller than the window is padded with 0 at the bottom and right
    (mmseg would run the model on the smaller crop, which a fixed position table cannot)."""
    h, w = image.shape[:2]
    ph, pw = max(h, crop), max(w, crop)
    if (ph, pw) != (h, w):
        image = np.pad(image, ((0, ph - h), (0, pw - w), (0, 0)))
    wins = slide_windows(ph, pw, crop, stride)
    preds = np.zeros((ph, pw, num_classes), np.float32)
    count = np.zeros((ph, pw, 1), np.float32)
    for start in range(0, len(wins), batch):
        chunk = wins[start:start + batch]
        x = np.stack([image[y1:y2, x1:x2] for y1, y2, x1, x2 in chunk]
                     + [np.zeros((crop, crop, image.shape[2]), image.dtype)] * (batch - len(chunk)))
        out = np.asarray(fn(x))
        for (y1, y2, x1, x2), o in zip(chunk, out):
            preds[y1:y2, x1:x2] += o
            count[y1:y2, x1:x2] += 1
    return (preds / count)[:h, :w]


def bilinear_matrix(n: int, size: int) -> np.ndarray:
    """[size, n] weights of a 1-D bilinear resize n -> size, ``align_corners=False`` (torch's:
    source ``(i + .5) n / size - .5``, negative clamped to 0)."""
    src = np.maximum((np.arange(size) + 0.5) * (n / size) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n - 1)
    i1 = np.minimum(i0 + 1, n - 1)
    f = src - i0
    m = np.zeros((size, n), np.float64)
    m[np.arange(size), i0] += 1 - f
    m[np.arange(size), i1] += f
    return m.astype(np.float32)


def resize_logits(logits: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """[H, W, K] -> [h, w, K], bilinear as torch (mmseg resizes the logits to the original image)."""
    h, w = hw
    if logits.shape[:2] == (h, w):
        return logits
    return np.einsum('ih,hwk,jw->ijk', bilinear_matrix(logits.shape[0], h), logits,
                     bilinear_matrix(logits.shape[1], w), optimize=True)


# ------------------------------------------------------------------------------ metrics

def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """mmseg's ``IoUMetric.intersect_and_union``: [4, K] areas (intersection, union, prediction,
    label) over the pixels whose label is not ``ignore_index``."""
    keep = label != ignore_index
    p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
    inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
    area_p = np.bincount(p[(p >= 0) & (p < num_classes)], minlength=num_classes)[:num_classes]
    area_t = np.bincount(t[(t >= 0) & (t < num_classes)], minlength=num_classes)[:num_classes]
    return np.stack([inter, area_p + area_t - inter, area_p, area_t]).astype(np.float64)


def seg_metrics(areas: np.ndarray) -> dict:
    """aAcc, mIoU, mAcc (percent) from areas summed over the whole set: mIoU and mAcc are
    ``nanmean`` over classes (a class absent from labels and predictions has no IoU; one absent
    from the labels has no accuracy), as mmseg. Also the per-class IoU (NaN where undefined)."""
    inter, union, _, label = areas
    with np.errstate(divide='ignore', invalid='ignore'):
        iou, acc = inter / union, inter / label
    return {'aAcc': float(100 * inter.sum() / max(label.sum(), 1)), 'mIoU': float(100 * np.nanmean(iou)),
            'mAcc': float(100 * np.nanmean(acc)), 'IoU': iou * 100}


# ------------------------------------------------------------------------------ pictures

def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """[K + 1, 3] uint8 colours (the last one, black, for ignored pixels)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.integers(0, 256, (num_classes, 3)), [[0, 0, 0]]]).astype(np.uint8)


def label_picture(image: np.ndarray, label: np.ndarray, pred: np.ndarray, num_classes: int,
                  alpha: float = 0.5) -> np.ndarray:
    """[H, 3W, 3] uint8: the image, the true labels over it, the predicted labels over it."""
    pal = palette(num_classes)

    def over(lab):
        idx = np.where(lab >= num_classes, num_classes, lab)
        return (alpha * pal[idx] + (1 - alpha) * image).astype(np.uint8)
    return np.concatenate([image, over(label), over(pred)], axis=1)


# ------------------------------------------------------------------------------ schedule

def lr_schedule(base_lr: float, total_steps: int, warmup_steps: int, *, start_factor: float = 1e-6,
                power: float = 1.0) -> optax.Schedule:
    """mmengine's ``LinearLR(start_factor, begin=0, end=W)`` then ``PolyLR(eta_min=0, power,
    begin=W, end=T)`` (``by_epoch=False``) as optax schedules of the 0-based step k: the factor
    rises from ``start_factor`` to 1 over steps 0..W-1 (mmengine's ``total_iters = end - begin - 1``),
    then ``base_lr * (1 - (k - W) / (T - W - 1)) ** power``, 0 at the last step T-1."""
    decay = optax.polynomial_schedule(base_lr, 0.0, power, max(total_steps - warmup_steps - 1, 1))

    def poly(count):  # float32 rounding may end a hair below 0
        return jnp.maximum(decay(count), 0.0)
    if warmup_steps <= 0:
        return poly
    n = max(warmup_steps - 1, 1)

    def warm(count):  # as a factor of base_lr: optax.linear_schedule's (init - end) * (1 - t) + end loses 1e-10
        t = jnp.minimum(count, n).astype(jnp.float32) / n
        return base_lr * (start_factor + (1.0 - start_factor) * t)
    return optax.join_schedules([warm, poly], [warmup_steps])


def decay_mask(params, decay_tokens: bool = True):
    """mmseg's ``LearningRateDecayOptimizerConstructor``: no weight decay on 1-D parameters (biases,
    norms, layer scales); its name test (``name in ('pos_embed', 'cls_token')``) never matches the
    full names (``backbone.pos_embed``), so the position table and [CLS] token are decayed
    (``decay_tokens=True``; False spares them)."""
    def keep(path, x):
        name = str(getattr(path[-1], 'key', path[-1]))
        return x.ndim >= 2 and (decay_tokens or name not in ('pos_embed', 'cls_token'))
    return jax.tree_util.tree_map_with_path(keep, params)

"""Classification heads on the MAE encoder, for evaluation (Flax NNX).

:class:`Classifier` is MAE's fine-tuning model (the pre-trained :class:`model.ViTEncoder`
with drop path and a pooled linear head), split into pure dicts by :func:`split_classifier`
and run functionally by :func:`classifier_apply`; :func:`load_encoder` puts pre-trained
encoder parameters into it. :class:`LinearProbeHead` is MAE's linear-probe head on
features of the frozen encoder (:func:`model.pooled_features`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from colormae_jax.models import norm
from colormae_jax.models.mae import MAEConfig, ViTEncoder

CLASSIFIER_POOLS = ('mean', 'cls')


def _timm_trunc_normal(std: float) -> nnx.Initializer:
    """timm's ``trunc_normal_(w, std=std)``: its bounds (-2, 2) are absolute, not in units of
    ``std``, so at the small stds used for heads it is a plain normal(0, std)."""
    return nnx.initializers.truncated_normal(std, lower=-2.0 / std, upper=2.0 / std)


class LinearProbeHead(nnx.Module):
    """MAE's linear-probe head (``main_linprobe.py``) on features [B, D] of the frozen
    encoder: ``bn`` = BatchNorm without scale or bias (eps 1e-6; flax momentum 0.9 = torch's
    0.1), then ``head``: Linear, weights ~ N(0, 0.01), bias 0, both in float32.

    Functional use: ``nnx.split(head, nnx.Param, nnx.BatchStat)`` (or :func:`split_classifier`)
    gives ``params`` (what the optimizer sees) and ``stats`` (the running ``mean`` / ``var``
    under ``stats['bn']``). With ``train=True`` the BatchNorm normalises with the statistics of
    the batch (under ``jit`` with a sharded batch: of the global batch) and moves the running
    averages towards them (the variance unbiased, as torch's); with ``train=False`` it normalises with
    the running averages.
    """

    def __init__(self, dim: int, num_classes: int, *, rngs: nnx.Rngs):
        self.bn = norm.TorchBatchNorm(dim, use_running_average=True, use_bias=False, use_scale=False, epsilon=1e-6,
                                momentum=0.9, rngs=rngs)
        self.head = nnx.Linear(dim, num_classes, kernel_init=_timm_trunc_normal(0.01),
                               bias_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, feats: jax.Array, *, train: bool = False) -> jax.Array:
        return self.head(self.bn(feats, use_running_average=not train)).astype(jnp.float32)


class Classifier(nnx.Module):
    """A ViT encoder with MAE's fine-tuning head (``models_vit.py``).

    ``self.encoder`` is a :class:`model.ViTEncoder` with the parameter names and shapes of
    ``MAE.encoder``, so ``params['encoder']`` of a pre-training checkpoint drops in (see
    :func:`load_encoder`). ``pool='mean'`` (MAE's ``global_pool``) averages the patch tokens
    *before* the encoder's final norm and applies ``fc_norm`` (LayerNorm, eps 1e-6);
    ``encoder.norm`` is then unused (MAE deletes it; here it stays, so that the encoder keeps
    the pre-training structure, and gets zero gradients). ``pool='cls'``: the [CLS] token after
    ``encoder.norm``. Then ``head``: Linear, weights ~ N(0, 2e-5), bias 0.
    ``drop_path_rate``: stochastic depth, rising linearly over the blocks.
    ``learn_pos_embed``: a learned ``pos_embed`` started from the fixed sin-cos table.
    """

    def __init__(self, c: MAEConfig, num_classes: int, *, pool: str = 'mean', drop_path_rate: float = 0.0,
                 learn_pos_embed: bool = False, rngs: nnx.Rngs):
        if pool not in CLASSIFIER_POOLS:
            raise ValueError(f'pool={pool!r}; valid: {CLASSIFIER_POOLS}')
        if num_classes < 1:
            raise ValueError(f'num_classes={num_classes} must be positive')
        self.c, self.pool = c, pool
        self.encoder = ViTEncoder(c, drop_path_rate=drop_path_rate, learn_pos_embed=learn_pos_embed, rngs=rngs)
        if pool == 'mean':
            self.fc_norm = nnx.LayerNorm(c.width, epsilon=c.ln_eps, dtype=c.dtype, rngs=rngs)
        self.head = nnx.Linear(c.width, num_classes, kernel_init=_timm_trunc_normal(2e-5),
                               bias_init=nnx.initializers.zeros_init(), dtype=c.dtype, rngs=rngs)

    def __call__(self, images: jax.Array, *, drop_key: jax.Array | None = None) -> jax.Array:
        """images [B, H, W, C] (normalised) -> float32 logits [B, num_classes]. Drop path acts
        only when ``drop_key`` is given (use :func:`classifier_apply`, which passes it in
        training only)."""
        x = images.astype(self.c.dtype)
        if self.pool == 'mean':
            feats = self.fc_norm(self.encoder.tokens(x, drop_key=drop_key)[:, 1:].mean(1))
        else:
            feats = self.encoder(x, drop_key=drop_key)[:, 0]
        return self.head(feats).astype(jnp.float32)


def split_classifier(model: nnx.Module) -> tuple[nnx.GraphDef, dict, dict]:
    """(graphdef, params, stats): ``params`` the ``nnx.Param`` pure dict (trained by the
    optimizer), ``stats`` the ``nnx.BatchStat`` pure dict (``{}`` for :class:`Classifier`,
    the BatchNorm's running averages for :class:`LinearProbeHead`). Works on the abstract
    model of ``nnx.eval_shape(lambda: Classifier(...))`` too."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return graphdef, nnx.to_pure_dict(params), nnx.to_pure_dict(stats)


def classifier_apply(graphdef: nnx.GraphDef, params: dict, stats: dict, images: jax.Array, *, train: bool,
                     drop_key: jax.Array | None = None) -> tuple[jax.Array, dict]:
    """Pure forward pass of a :class:`Classifier`: ``(logits [B, K] float32, stats)``, in the
    ``(params, stats)`` form of the classifier task loop (``stats``, ``{}``: there is no
    BatchNorm, comes back unchanged).

    ``train=True``: drop path with ``drop_key`` (if given); ``train=False``: deterministic
    (``drop_key`` is ignored). Differentiable in ``params``; jit it (or the step around it)
    with ``graphdef`` and ``train`` static.
    """
    model = nnx.merge(graphdef, params, stats)
    return model(images, drop_key=drop_key if train else None), stats


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

"""Optimizers and learning-rate schedules of every task, MAE's recipes.

* :func:`make_schedule`: linear warm-up, then cosine decay (MAE's ``lr_sched.py``).
* :func:`make_optimizer`: pre-training's AdamW (optionally after global-norm clipping), no
  weight decay on biases, norms, tokens and position embeddings (:func:`decay_mask`).
* :func:`make_finetune_optimizer`: AdamW with layer-wise learning-rate decay (MAE's
  ``util/lr_decay.py`` ``param_groups_lrd``): parameter ``p`` of layer ``layer_id(p)`` learns
  at ``lr * layer_decay ** (depth + 1 - layer_id(p))``, and weight decay spares biases,
  norms and tokens.
* :func:`make_lars`: MAE's LARS (``util/lars.py``) for the linear probe.

Parameter trees are pure dicts (``nnx.to_pure_dict``), such as a
:class:`colormae_jax.models.mae.Classifier`'s: ``{'encoder': {'cls_token', 'patch_embed',
'blocks': {0: ..., 1: ...}, 'norm'}, 'fc_norm', 'head', ...}`` (the ``'encoder'`` level is
optional).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import optax


def decay_mask(params, decay_tokens: bool = False) -> Any:
    """Weight decay on matrices only: no decay on biases, norms or position embeddings (MAE's
    ``no_weight_decay``; pre-training's are fixed constants, fine-tuning's a parameter), nor on
    the [CLS] and mask tokens unless ``decay_tokens`` (MAE's pre-training code decays them:
    timm's ``add_weight_decay`` without a skip list spares only 1-D parameters)."""
    def keep(path, x):
        name = str(getattr(path[-1], 'key', path[-1]))
        return x.ndim >= 2 and (decay_tokens or 'token' not in name) and name != 'pos_embed'
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """0 -> ``base_lr * batch_size / 256`` linearly over ``warmup_steps``, then a cosine to
    ``min_lr`` at ``total_steps``."""
    peak = config.base_lr * config.batch_size / 256
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup_steps, max(total_steps, warmup_steps + 1),
                                              end_value=config.min_lr)


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    # Clipping or not, the optimizer state has the same tree (both have an empty state), so a
    # run that diverged can be resumed with grad_clip_norm set.
    clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm else optax.identity()
    mask = functools.partial(decay_mask, decay_tokens=config.decay_tokens)
    return optax.chain(clip, optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.wd, mask=mask))

# Names at the top of the encoder whose parameters belong to "layer 0" (the embedding).
_EMBED_NAMES = ('cls_token', 'pos_embed', 'patch_embed')


def _path_names(path: Any) -> list[str]:
    """A key path (``tree_map_with_path``'s, a tuple of names, or 'blocks.3.attn') -> names."""
    if isinstance(path, str):
        return path.split('.')
    return [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]


def layer_id(path: Any, depth: int) -> int:
    """MAE's ``get_layer_id_for_vit``: the cls token and the patch embedding are layer 0,
    ``blocks.i`` is layer ``i + 1``, everything else (the final norm, ``fc_norm``, the
    head, ...) is layer ``depth + 1``. A leading ``'encoder'`` is skipped."""
    names = _path_names(path)
    if names and names[0] == 'encoder':
        names = names[1:]
    if not names:
        raise ValueError(f'empty parameter path {path!r}')
    if names[0] in _EMBED_NAMES:
        return 0
    if names[0] == 'blocks':
        i = int(names[1])
        if not 0 <= i < depth:
            raise ValueError(f'parameter {".".join(names)} is in block {i}, but the model has depth {depth}')
        return i + 1
    return depth + 1


def lr_scales(params: Any, depth: int, decay: float) -> Any:
    """A tree like ``params`` of Python floats ``decay ** (depth + 1 - layer_id)``: 1 for the
    head, ``decay ** (depth + 1)`` for the embedding. ``params`` may be abstract."""
    return jax.tree_util.tree_map_with_path(lambda path, _: float(decay ** (depth + 1 - layer_id(path, depth))),
                                            params)


def scale_by_tree(scales: Any) -> optax.GradientTransformation:
    """Multiplies each update leaf by the matching float of ``scales`` (same tree as the params)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s, updates, scales), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_finetune_optimizer(schedule: optax.ScalarOrSchedule, params: Any, *, depth: int, layer_decay: float,
                            weight_decay: float, b1: float = 0.9, b2: float = 0.999,
                            decay_mask_fn: Callable[[Any], Any] | None = None) -> optax.GradientTransformation:
    """AdamW with layer-wise lr decay: ``adamw(schedule)`` followed by scaling each update by
    its :func:`lr_scales` factor (``params`` only gives the tree; it may be abstract).

    This is exactly AdamW with a per-layer learning rate ``schedule * scale``, weight decay
    included: adamw's update is ``-lr * (adam_direction + weight_decay * p)``, linear in
    ``lr``, so scaling it afterwards scales both terms, as torch's AdamW does with
    ``param_group['lr'] = lr * lr_scale`` (MAE). ``decay_mask_fn`` (params -> tree of bools)
    defaults to :func:`decay_mask`: no decay on 1-D parameters (biases,
    norms) nor on tokens, as MAE's ``param_groups_lrd``. Adam's eps is torch's default (1e-8).
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f'layer_decay={layer_decay} must be in (0, 1]')
    scales = lr_scales(params, depth, layer_decay)
    return optax.chain(
        optax.adamw(schedule, b1=b1, b2=b2, eps=1e-8, weight_decay=weight_decay,
                    mask=decay_mask if decay_mask_fn is None else decay_mask_fn),
        scale_by_tree(scales))


def _matrices(params: Any) -> Any:
    """True for parameters with more than one dimension (MAE's LARS: ``p.ndim > 1``)."""
    return jax.tree.map(lambda p: p.ndim > 1, params)


def make_lars(schedule: optax.ScalarOrSchedule, *, weight_decay: float = 0.0, momentum: float = 0.9,
              trust_coefficient: float = 0.001) -> optax.GradientTransformation:
    """MAE's LARS (``util/lars.py``; the linear probe uses weight decay 0, momentum 0.9).

    MAE, per parameter ``p`` with gradient ``g``: if ``p.ndim > 1``, ``g += wd * p`` and
    ``g *= trust_coefficient * |p| / |g|`` (1 where a norm is 0); 1-D parameters (biases,
    BatchNorm) get neither; then ``mu = momentum * mu + g`` and ``p -= lr * mu``.

    ``optax.lars`` (0.2.8: ``learning_rate, weight_decay=0., weight_decay_mask=True,
    trust_coefficient=1e-3, eps=0., trust_ratio_mask=True, momentum=0.9, nesterov=False``)
    computes the same weight decay and trust ratio (its ratio ``tc * |p| / (|g| + eps)``, 1
    where a norm is 0, is MAE's with ``eps=0``; the masks select the matrices), but it
    multiplies by the learning rate *before* the momentum, so its momentum buffer holds past
    steps at their old learning rates; MAE's (torch's) holds raw directions and scales the
    sum by the current rate. The two agree only at a constant learning rate, so this chains
    the same optax pieces with the momentum before the learning rate, which is MAE's update
    exactly under any schedule (warm-up, cosine).
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay, mask=_matrices),
        optax.masked(optax.scale_by_trust_ratio(trust_coefficient=trust_coefficient, eps=0.0), _matrices),
        optax.trace(decay=momentum),
        optax.scale_by_learning_rate(schedule))


__all__ = ['decay_mask', 'make_schedule', 'make_optimizer', 'layer_id', 'lr_scales', 'scale_by_tree',
           'make_finetune_optimizer', 'make_lars']

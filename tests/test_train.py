import functools
import os
import sys

import jax
import numpy as np
import pytest

from colormae_jax import masking, optim, parallel
from colormae_jax.models import mae as model
from colormae_jax.tasks import pretrain

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10  # noqa: E402


def smoke_config(**over):
    c = cifar10.get_config('smoke')
    c.total_steps, c.warmup_steps = 40, 0
    for k, v in over.items():
        setattr(c, k, v)
    return c


def synthetic_batch(n, size=32, seed=0):
    rng = np.random.default_rng(seed)
    return {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            'index': np.arange(n, dtype=np.int32), 'label': np.zeros(n, np.int32)}


def run_steps(config, devices, batch, steps):
    mesh = parallel.make_mesh(config.mesh, devices)
    t = pretrain.make_trainer(config, mesh, steps_per_epoch=10)
    strategy = masking.create(config.mask, t.mae.grid)
    rep = parallel.replicated(mesh)
    step = pretrain.compile_step(t, strategy, ())
    state = pretrain.init_state(t)
    gb = {k: jax.device_put(v, parallel.batch_sharding(mesh)) for k, v in batch.items()}
    losses = []
    for _ in range(steps):
        state, m = step(state, gb, ())
        losses.append(float(m['loss']))
    del rep
    return state, losses, m


def test_weight_decay_mask():
    c = smoke_config()
    _, params = model.abstract_mae(model.mae_config(c.model, c.data.image_size))
    mask = optim.decay_mask(params)
    assert mask['encoder']['blocks'][0]['attn']['qkv']['kernel'] is True
    assert mask['encoder']['blocks'][0]['attn']['qkv']['bias'] is False
    assert mask['encoder']['norm']['scale'] is False
    assert mask['encoder']['cls_token'] is False and mask['decoder']['mask_token'] is False
    assert mask['encoder']['patch_embed']['kernel'] is True


def test_lr_schedule_warmup_then_cosine():
    c = smoke_config(base_lr=1e-3, batch_size=512)
    s = optim.make_schedule(c, total_steps=100, warmup_steps=10)
    peak = 1e-3 * 512 / 256
    np.testing.assert_allclose([s(0), s(5), s(10), s(55), s(100)], [0, peak / 2, peak, peak / 2, 0], atol=1e-9)


@pytest.mark.slow
def test_repeated_batch_lowers_loss():
    c = smoke_config(base_lr=0.05)
    _, losses, m = run_steps(c, jax.devices()[:1], synthetic_batch(32), 40)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert np.isfinite(float(m['grad_norm'])) and float(m['lr']) > 0


@pytest.mark.slow
def test_sharded_step_matches_single_device():
    assert jax.device_count() == 4
    c = smoke_config(base_lr=0.05)
    batch = synthetic_batch(32)
    s4, l4, _ = run_steps(c, jax.devices(), batch, 3)
    s1, l1, _ = run_steps(c, jax.devices()[:1], batch, 3)
    assert len(s4['params']['encoder']['cls_token'].sharding.device_set) == 4
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    p4, p1 = without_key_bias(s4['params']), without_key_bias(s1['params'])
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), p4, p1)


def without_key_bias(params):
    """The key bias has an exactly-zero gradient (softmax ignores a shift shared by all keys),
    so its "gradient" is rounding noise that Adam rescales to a full-size step: it differs
    between any two reduction orders. Every other parameter must match."""
    def drop(path, x):
        x = np.asarray(x)
        if 'qkv' in jax.tree_util.keystr(path) and x.ndim == 1:
            d = x.shape[0] // 3
            return np.concatenate([x[:d], x[2 * d:]])
        return x
    return jax.tree_util.tree_map_with_path(drop, params)


@pytest.mark.slow
def test_fsdp_shards_params_and_matches():
    c = smoke_config(base_lr=0.05, mesh=(('data', 2), ('fsdp', 2)))
    batch = synthetic_batch(32)
    s, losses, _ = run_steps(c, jax.devices(), batch, 2)
    kernel = s['params']['encoder']['blocks'][0]['mlp']['fc1']['kernel']
    assert 'fsdp' in str(kernel.sharding.spec)
    _, l1, _ = run_steps(smoke_config(base_lr=0.05), jax.devices()[:1], batch, 2)
    np.testing.assert_allclose(losses, l1, rtol=1e-5)


@pytest.mark.slow
def test_remat_gives_the_same_step():
    batch = synthetic_batch(8)
    outs = []
    for remat in (False, True):
        c = smoke_config(batch_size=8)
        c.model.remat = remat
        _, losses, m = run_steps(c, jax.devices()[:1], batch, 2)
        outs.append((losses, float(m['grad_norm'])))
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5)


def test_warmup_longer_than_training_names_the_key_that_was_set():
    import pytest

    from colormae_jax import config_lib
    mesh = parallel.make_mesh((('data', -1), ('fsdp', 1)), jax.devices()[:1])
    with pytest.raises(config_lib.ConfigError, match=r'config.warmup_steps: warm-up \(5 steps\) is longer'):
        pretrain.make_trainer(smoke_config(total_steps=2, warmup_steps=5), mesh, steps_per_epoch=10)
    with pytest.raises(config_lib.ConfigError, match=r'config.warmup_epochs: warm-up \(30 steps\) is longer'):
        pretrain.make_trainer(smoke_config(total_steps=2, warmup_steps=None, warmup_epochs=3.0), mesh,
                              steps_per_epoch=10)


@pytest.mark.parametrize('decay_tokens', [True, False])
def test_token_weight_decay_follows_the_config(decay_tokens):
    """MAE's and AMT's code decay cls_token and mask_token (timm's add_weight_decay, no skip
    list); mmpretrain (ColorMAE) does not. Zero gradients: only weight decay moves a parameter."""
    c = smoke_config(decay_tokens=decay_tokens, wd=0.5, warmup_steps=0)
    _, abstract = model.abstract_mae(model.mae_config(c.model, c.data.image_size))
    mask = optim.decay_mask(abstract, decay_tokens=decay_tokens)
    assert mask['encoder']['cls_token'] is decay_tokens and mask['decoder']['mask_token'] is decay_tokens
    params = model.init_mae_params(model.mae_config(c.model, c.data.image_size), 0)
    tx = optim.make_optimizer(c, optim.make_schedule(c, 10, 0))
    grads = jax.tree.map(np.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    moved = {k: bool(np.abs(np.asarray(updates[p][k])).max() > 0) for p, k in (('encoder', 'cls_token'),
                                                                             ('decoder', 'mask_token'))}
    assert moved == {'cls_token': decay_tokens, 'mask_token': decay_tokens}
    assert bool(np.abs(np.asarray(updates['encoder']['norm']['scale'])).max() == 0)  # norms: never decayed


@pytest.mark.parametrize('total,warmup', [(100, 10), (20, 0), (10, 10), (50, 1)])
def test_schedule_is_optax_warmup_cosine_bitwise(total, warmup):
    """optim.make_schedule (optax.warmup_cosine_decay_schedule) equals the join of optax's linear
    warm-up and cosine decay the loop used before, value for value."""
    import optax
    c = smoke_config(base_lr=1.5e-4, batch_size=256, min_lr=1e-6)
    peak = c.base_lr * c.batch_size / 256
    before = optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)),
                                   optax.cosine_decay_schedule(peak, max(total - warmup, 1), alpha=c.min_lr / peak)],
                                  [warmup])
    now = optim.make_schedule(c, total, warmup)
    for step in range(total + 3):
        assert float(now(step)) == float(before(step)), step

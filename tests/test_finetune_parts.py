"""Building blocks of fine-tuning and linear probing: drop path, the classifier heads,
layer-wise lr decay, LARS, mixup / cutmix, random erasing and RandAugment."""
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from PIL import Image

from colormae_jax import optim
from colormae_jax.data import augment, pipeline as data
from colormae_jax.models import classifier as C, mae as M
from colormae_jax.optim import decay_mask


def tiny(**kw):
    base = dict(image_size=32, patch=8, width=32, depth=2, mlp_dim=64, heads=2, dec_width=16, dec_depth=1,
                dec_heads=2)
    base.update(kw)
    return M.MAEConfig(**base)


B = 4  # one batch size for the model tests: eager ops compile once per shape


def images(b=B, seed=0, size=32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(b, size, size, 3)), jnp.float32)


K = 10  # classes; one head shape for all tests (every new parameter shape costs a compilation)


def pure(module):
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def abstract_encoder_params(c):
    """The encoder params of ``MAE(c)``, as ShapeDtypeStructs (no initialisation)."""
    return pure(nnx.eval_shape(lambda: M.MAE(c, rngs=nnx.Rngs(0))))['encoder']


# ------------------------------------------------------------------------------ drop path

def _reference_encoder(enc, x, keep_idx=None):
    """The encoder's forward pass as it was before drop path existed."""
    x = enc.embed(x, keep_idx)
    for blk in enc.blocks:
        x = x + blk.attn(blk.norm1(x))
        x = x + blk.mlp(blk.norm2(x))
    return enc.norm(x)


def test_drop_path_off_is_bit_identical():
    c = tiny()
    x = images()
    keep = jnp.asarray(np.stack([np.random.default_rng(i).permutation(16) for i in range(B)]))  # all, shuffled
    plain = M.ViTEncoder(c, rngs=nnx.Rngs(0))
    dropping = M.ViTEncoder(c, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    for enc in (plain, dropping):
        for idx in (None, keep):
            np.testing.assert_array_equal(enc(x, idx), _reference_encoder(enc, x, idx))
    np.testing.assert_array_equal(dropping(x), plain(x))
    np.testing.assert_array_equal(dropping.norm(dropping.tokens(x)), dropping(x))
    # A key with rate 0 draws nothing either.
    np.testing.assert_array_equal(plain(x, drop_key=jax.random.PRNGKey(1)), plain(x))


def test_drop_path_on_is_random_per_key():
    c = tiny()
    enc = M.ViTEncoder(c, drop_path_rate=0.5, rngs=nnx.Rngs(0))
    x = images()
    off = enc(x)
    a, a2, b = (enc(x, drop_key=jax.random.PRNGKey(k)) for k in (1, 1, 2))
    np.testing.assert_array_equal(a, a2)
    assert not np.allclose(a, off) and not np.allclose(a, b)
    blk = _block(1.0)
    t = jax.random.normal(jax.random.PRNGKey(3), (4, 5, 32))
    np.testing.assert_array_equal(blk(t, drop_key=jax.random.PRNGKey(0)), t)  # both branches dropped
    assert not np.allclose(blk(t), t)


def _block(rate):
    return M.Block(32, 2, 64, attn_impl='auto', dtype=jnp.float32, rngs=nnx.Rngs(0), drop_path_rate=rate)


def test_drop_path_statistics():
    """The block's drop path (``nnx.Dropout``, one draw per sample) is timm's DropPath."""
    x = jnp.ones((20000, 2, 3))
    key = jax.random.PRNGKey(0)
    drop = _block(0.3).drop_path
    y = np.asarray(drop(x, deterministic=False, rngs=key))
    per_sample = y.reshape(len(y), -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    np.testing.assert_allclose(np.unique(per_sample), [0.0, 1 / 0.7], rtol=1e-6)
    assert abs((per_sample[:, 0] == 0).mean() - 0.3) < 0.015
    assert abs(y.mean() - 1.0) < 0.02  # mean-preserving
    # timm's formula, one Bernoulli(1 - rate) per sample from the same key: the same masks.
    t = jax.random.normal(jax.random.PRNGKey(1), (64, 5, 32))
    keep = jax.random.bernoulli(key, 0.7, (64,))[:, None, None]
    np.testing.assert_allclose(drop(t, deterministic=False, rngs=key), t * keep / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(_block(0.0).drop_path(x, deterministic=False, rngs=key), x)
    with pytest.raises(ValueError):
        _block(1.5)


def test_drop_path_rate_schedule():
    enc = M.ViTEncoder(tiny(depth=3), drop_path_rate=0.2, rngs=nnx.Rngs(0))
    np.testing.assert_allclose([b.drop_path_rate for b in enc.blocks], [0.0, 0.1, 0.2])
    assert M.drop_path_rates(0.1, 1) == [0.0]
    assert M.drop_path_rates(0.1, 5)[-1] == pytest.approx(0.1)
    with pytest.raises(ValueError):
        M.drop_path_rates(-0.1, 3)


# ------------------------------------------------------------------------------ classifier

@pytest.mark.parametrize('pool', C.CLASSIFIER_POOLS)
def test_classifier_shapes(pool):
    c = tiny()
    model = C.Classifier(c, K, pool=pool, rngs=nnx.Rngs(0))
    graphdef, params, stats = C.split_classifier(model)
    x = images()
    for train in (True, False):
        logits, new_stats = C.classifier_apply(graphdef, params, stats, x, train=train,
                                               drop_key=jax.random.PRNGKey(0))
        assert logits.shape == (4, K) and logits.dtype == jnp.float32
        assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    extra = sorted(k for k in params if k != 'encoder')
    assert extra == (['fc_norm', 'head'] if pool == 'mean' else ['head'])
    assert stats == {}
    with pytest.raises(ValueError, match='pool'):
        C.Classifier(c, K, pool='max', rngs=nnx.Rngs(0))


def test_pooled_features():
    c = tiny()
    x = images()
    encoder = M.ViTEncoder(c, rngs=nnx.Rngs(0))
    tokens = encoder(x)
    f = M.pooled_features(tokens)
    assert f['cls'].shape == f['mean'].shape == (4, c.width) and f['mean'].dtype == jnp.float32
    np.testing.assert_allclose(f['mean'], tokens[:, 1:].mean(1), rtol=1e-6)
    np.testing.assert_array_equal(f['cls'], tokens[:, 0])


def test_classifier_encoder_loads_pretrained_params():
    c = tiny()
    mae = abstract_encoder_params(c)
    for pool in C.CLASSIFIER_POOLS:
        _, params, _ = C.split_classifier(nnx.eval_shape(lambda: C.Classifier(c, K, pool=pool, rngs=nnx.Rngs(1))))
        assert jax.tree.structure(params['encoder']) == jax.tree.structure(mae)
        assert jax.tree.map(lambda a: (a.shape, a.dtype), params['encoder']) == \
            jax.tree.map(lambda a: (a.shape, a.dtype), mae)
    # Values: a pre-trained encoder (here another seed's) replaces the classifier's.
    pretrained = pure(M.ViTEncoder(c, rngs=nnx.Rngs(5)))
    _, params, _ = C.split_classifier(C.Classifier(c, K, drop_path_rate=0.1, rngs=nnx.Rngs(1)))
    loaded = C.load_encoder(params, pretrained)
    jax.tree.map(np.testing.assert_array_equal, loaded['encoder'], pretrained)
    np.testing.assert_array_equal(loaded['head']['kernel'], params['head']['kernel'])
    assert not np.array_equal(params['encoder']['cls_token'], pretrained['cls_token'])
    with pytest.raises(ValueError, match='do not match'):
        C.load_encoder(params, abstract_encoder_params(tiny(width=64)))
    with pytest.raises(ValueError, match='do not match'):
        C.load_encoder(params, abstract_encoder_params(tiny(depth=3)))


@pytest.mark.slow
def test_learned_pos_embed_starts_as_the_fixed_table_and_is_trained_without_decay():
    """MAE's fine-tuning ViT learns pos_embed [1, 1+N, D] (loaded from the fixed sin-cos table,
    zero [CLS] row; layer 0 of the lr decay; no weight decay)."""
    c = tiny()
    x = images()
    pretrained = pure(M.ViTEncoder(c, rngs=nnx.Rngs(5)))
    fixed = C.load_encoder(C.split_classifier(C.Classifier(c, K, rngs=nnx.Rngs(1)))[1], pretrained)
    graphdef, params, stats = C.split_classifier(C.Classifier(c, K, learn_pos_embed=True, rngs=nnx.Rngs(1)))
    learned = C.load_encoder(params, pretrained)
    pos = learned['encoder']['pos_embed']
    assert pos.shape == (1, 1 + c.grid ** 2, c.width) and np.all(pos[0, 0] == 0)
    g_fixed = C.split_classifier(C.Classifier(c, K, rngs=nnx.Rngs(1)))[0]
    np.testing.assert_allclose(C.classifier_apply(graphdef, learned, stats, x, train=False)[0],
                               C.classifier_apply(g_fixed, fixed, stats, x, train=False)[0], rtol=1e-5, atol=1e-6)
    grads = jax.grad(lambda p: C.classifier_apply(graphdef, p, stats, x, train=False)[0].sum())(learned)
    pos_grad = np.abs(grads['encoder']['pos_embed'][0])
    assert pos_grad[1:].max() > 0 and pos_grad[0].max() > 0
    assert optim.decay_mask(learned)['encoder']['pos_embed'] is False
    assert optim.layer_id(('encoder', 'pos_embed'), c.depth) == 0
    learned['head']['kernel'] = jnp.ones_like(learned['head']['kernel'])  # make the logits sensitive
    moved = jax.tree.map(lambda a: a, learned)
    moved['encoder']['pos_embed'] = pos + jax.random.normal(jax.random.PRNGKey(0), pos.shape)
    assert not np.allclose(C.classifier_apply(graphdef, moved, stats, x, train=False)[0],
                           C.classifier_apply(graphdef, learned, stats, x, train=False)[0])


def test_finetune_heads_follow_mae():
    c = tiny()
    x = images()
    for pool, uses_norm in (('mean', False), ('cls', True)):
        graphdef, params, stats = C.split_classifier(C.Classifier(c, K, pool=pool, rngs=nnx.Rngs(0)))
        assert abs(params['head']['kernel'].std() / 2e-5 - 1) < 0.15 and np.all(params['head']['bias'] == 0)
        params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])  # make the logits sensitive
        moved = jax.tree.map(lambda a: a, params)
        moved['encoder']['norm']['bias'] = params['encoder']['norm']['bias'] + 1.0
        a = C.classifier_apply(graphdef, params, stats, x, train=False)[0]
        b = C.classifier_apply(graphdef, moved, stats, x, train=False)[0]
        assert (not np.allclose(a, b)) == uses_norm  # mean pooling skips encoder.norm (fc_norm instead)
    model = C.Classifier(c, K, pool='mean', rngs=nnx.Rngs(0))
    want = model.head(model.fc_norm(model.encoder.tokens(x)[:, 1:].mean(1)))
    np.testing.assert_allclose(model(x), want, rtol=1e-6)


def _probe_apply(graphdef, params, stats, feats, train):
    head = nnx.merge(graphdef, params, stats)
    return head(feats, train=train), nnx.to_pure_dict(nnx.state(head, nnx.BatchStat))


def test_linear_probe_batchnorm():
    c = tiny()
    x = images()
    f = M.pooled_features(M.ViTEncoder(c, rngs=nnx.Rngs(0))(x))['cls']
    model = C.LinearProbeHead(c.width, K, rngs=nnx.Rngs(0))
    graphdef, params, stats = C.split_classifier(model)
    assert sorted(params) == ['head'] and set(stats['bn']) == {'mean', 'var'}
    assert abs(params['head']['kernel'].std() / 0.01 - 1) < 0.15 and np.all(params['head']['bias'] == 0)
    mu, var = f.mean(0), f.var(0)
    logits, new = _probe_apply(graphdef, params, stats, f, train=True)
    assert logits.shape == (4, K) and logits.dtype == jnp.float32
    normed = (f - mu) / jnp.sqrt(var + 1e-6)
    np.testing.assert_allclose(normed.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(logits, model.head(normed), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(new['bn']['mean'], 0.1 * mu, rtol=1e-5, atol=1e-7)
    n = f.shape[0]  # torch's BatchNorm1d moves the unbiased variance (x n/(n-1)): 4/3 here
    np.testing.assert_allclose(new['bn']['var'], 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    logits_eval, same = _probe_apply(graphdef, params, new, f, train=False)
    jax.tree.map(np.testing.assert_array_equal, same, new)
    running = (f - new['bn']['mean']) / jnp.sqrt(new['bn']['var'] + 1e-6)
    np.testing.assert_allclose(logits_eval, model.head(running), rtol=1e-4, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: _probe_apply(graphdef, p, stats, f, train=True)[0].sum()))(params)
    assert float(jnp.abs(grads['head']['kernel']).max()) > 0


def test_linear_probe_batchnorm_running_stats_equal_torch():
    """MAE's probe BatchNorm (torch.nn.BatchNorm1d(affine=False, eps=1e-6)): running mean and
    variance after three training batches of 5, and the eval-mode output."""
    torch = pytest.importorskip('torch')
    head = C.LinearProbeHead(6, K, rngs=nnx.Rngs(0))
    graphdef, params, stats = C.split_classifier(head)
    ref = torch.nn.BatchNorm1d(6, affine=False, eps=1e-6)
    rng = np.random.default_rng(0)
    for i in range(3):
        x = (rng.normal(size=(5, 6)) * (1 + i) + i).astype(np.float32)
        _, stats = _probe_apply(graphdef, params, stats, jnp.asarray(x), train=True)
        ref.train()(torch.tensor(x))
    np.testing.assert_allclose(stats['bn']['mean'], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['bn']['var'], ref.running_var.numpy(), rtol=1e-5)
    bn = nnx.merge(graphdef, params, stats).bn
    np.testing.assert_allclose(bn(jnp.asarray(x), use_running_average=True), ref.eval()(torch.tensor(x)).numpy(),
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ optimizers

def toy_params(depth=2):
    r = np.random.default_rng(0)

    def a(*shape):
        return jnp.asarray(r.normal(size=shape), jnp.float32)

    def lin(i, o):
        return {'kernel': a(i, o), 'bias': a(o)}

    blocks = {i: {'attn': {'qkv': lin(4, 12)}, 'norm1': {'scale': a(4), 'bias': a(4)}} for i in range(depth)}
    return {'encoder': {'cls_token': a(1, 1, 4), 'patch_embed': lin(6, 4), 'blocks': blocks,
                        'norm': {'scale': a(4), 'bias': a(4)}},
            'fc_norm': {'scale': a(4), 'bias': a(4)}, 'head': lin(4, 3)}


def test_layer_ids_and_lr_scales():
    assert optim.layer_id('encoder.cls_token', 2) == optim.layer_id('patch_embed.kernel', 2) == 0
    assert optim.layer_id('blocks.1.attn.qkv.kernel', 2) == 2
    assert optim.layer_id('head.kernel', 2) == optim.layer_id('encoder.norm.scale', 2) == 3
    with pytest.raises(ValueError):
        optim.layer_id('blocks.2.attn.qkv.kernel', 2)
    s = optim.lr_scales(toy_params(), depth=2, decay=0.75)
    assert s['encoder']['cls_token'] == s['encoder']['patch_embed']['kernel'] == 0.421875
    assert s['encoder']['blocks'][0]['attn']['qkv']['bias'] == 0.5625
    assert s['encoder']['blocks'][1]['norm1']['scale'] == 0.75
    assert s['encoder']['norm']['bias'] == s['fc_norm']['scale'] == s['head']['kernel'] == 1.0


def test_llrd_equals_per_group_adamw():
    params = toy_params()
    schedule = optax.join_schedules([optax.linear_schedule(0.0, 1e-2, 2), optax.cosine_decay_schedule(1e-2, 4)], [2])
    tx = optim.make_finetune_optimizer(schedule, params, depth=2, layer_decay=0.6, weight_decay=0.3)
    ids = jax.tree_util.tree_map_with_path(lambda p, _: str(optim.layer_id(p, 2)), params)
    groups = {str(i): optax.adamw(lambda n, s=0.6 ** (3 - i): schedule(n) * s, b1=0.9, b2=0.999, eps=1e-8,
                                  weight_decay=0.3, mask=decay_mask) for i in range(4)}
    ref_tx = optax.multi_transform(groups, ids)

    @jax.jit
    def steps(grads):
        p, q = params, params
        st, ref_st = tx.init(p), ref_tx.init(q)
        for g in grads:
            u, st = tx.update(g, st, p)
            v, ref_st = ref_tx.update(g, ref_st, q)
            p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        zero = jax.tree.map(jnp.zeros_like, params)
        _, st = tx.update(zero, tx.init(params), params)
        return p, q, tx.update(zero, st, params)[0]  # the second update: lr = schedule(1)

    r = np.random.default_rng(1)
    grads = [jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), params) for _ in range(3)]
    p, q, u = steps(grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p, q)
    assert not np.allclose(p['head']['kernel'], params['head']['kernel'])
    # With zero gradients: weight decay only, on matrices (not biases, norms, tokens), scaled by layer.
    lr = float(schedule(1))
    np.testing.assert_allclose(u['head']['kernel'], -lr * 0.3 * params['head']['kernel'], rtol=1e-5)
    np.testing.assert_allclose(u['encoder']['patch_embed']['kernel'],
                               -lr * 0.6 ** 3 * 0.3 * params['encoder']['patch_embed']['kernel'], rtol=1e-5)
    for leaf in (u['head']['bias'], u['encoder']['cls_token'], u['fc_norm']['scale']):
        np.testing.assert_array_equal(leaf, 0)


def _mae_lars(params, grads, lrs, wd, momentum=0.9, tc=1e-3):
    """MAE's util/lars.py in numpy."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    mu = {k: np.zeros_like(v) for k, v in p.items()}
    for g, lr in zip(grads, lrs):
        for k in p:
            dp = np.asarray(g[k], np.float64)
            if p[k].ndim > 1:
                dp = dp + wd * p[k]
                pn, un = np.linalg.norm(p[k]), np.linalg.norm(dp)
                dp = dp * (tc * pn / un if pn > 0 and un > 0 else 1.0)
            mu[k] = momentum * mu[k] + dp
            p[k] = p[k] - lr * mu[k]
    return p


@pytest.mark.parametrize('wd', [0.0, 0.05])
def test_lars_matches_mae(wd):
    r = np.random.default_rng(0)
    params = {'kernel': jnp.asarray(r.normal(size=(5, 3)), jnp.float32), 'bias': jnp.zeros(3)}
    schedule = optax.linear_schedule(0.0, 0.4, 4)  # a changing lr: where optax.lars differs
    grads = [jax.tree.map(lambda x: jnp.asarray(r.normal(size=x.shape), jnp.float32), params) for _ in range(6)]
    tx = optim.make_lars(schedule, weight_decay=wd)

    @jax.jit
    def steps(grads):
        p, st = params, tx.init(params)
        for g in grads:
            u, st = tx.update(g, st, p)
            p = optax.apply_updates(p, u)
        return p

    p = steps(grads)
    want = _mae_lars(params, grads, [float(schedule(i)) for i in range(6)], wd)
    for k in params:
        np.testing.assert_allclose(p[k], want[k], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ mixup / cutmix

NB = 6  # batch of the augmentation tests (even: no image is mixed with itself)


def test_mixup_cutmix_targets_and_determinism():
    x = images(b=NB)
    y = jnp.arange(NB) % 5
    smooth = np.full((NB, 5), 0.02) + 0.9 * np.eye(5)[np.asarray(y)]
    out, t = augment.mixup_cutmix(jax.random.PRNGKey(0), x, y, num_classes=5, prob=0.0)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_allclose(t, smooth, rtol=1e-6)
    np.testing.assert_allclose(augment.smooth_labels(y, 5, 0.1), smooth, rtol=1e-6)
    hot = augment.mixup_cutmix(jax.random.PRNGKey(0), x, jax.nn.one_hot(y, 5), prob=0.0)[1]
    np.testing.assert_allclose(hot, smooth, rtol=1e-6)  # one-hot labels are smoothed the same way


def test_mixup_and_cutmix_lam():
    """MAE's settings (mixup 0.8, cutmix 1.0, switch 0.5), without smoothing so that lam shows."""
    x = images(b=NB)
    xn = np.asarray(x)
    y = jnp.arange(NB)  # distinct labels: lam is the weight of the own label
    modes = []
    for k in range(12):
        key = jax.random.PRNGKey(k)
        out, t = augment.mixup_cutmix(key, x, y, label_smoothing=0.0, num_classes=NB)
        out2, t2 = augment.mixup_cutmix(key, x, y, label_smoothing=0.0, num_classes=NB)
        np.testing.assert_array_equal(out, out2)
        np.testing.assert_array_equal(t, t2)
        out, t = np.asarray(out), np.asarray(t)
        assert out.dtype == xn.dtype and t.shape == (NB, NB)
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        lam = float(t[0, 0])
        np.testing.assert_allclose(np.diag(t), lam, rtol=1e-6)
        np.testing.assert_allclose(np.diag(t[:, ::-1]), 1 - lam, rtol=1e-5, atol=1e-6)
        pasted = np.all(out == xn[::-1], axis=-1)
        if np.all(pasted | np.all(out == xn, axis=-1)):  # CutMix: every pixel from one of the two
            modes.append('cutmix')
            np.testing.assert_array_equal(pasted[0], pasted[1])  # one box for the whole batch
            assert pasted[0].mean() == pytest.approx(1 - lam, abs=1e-6)  # lam = the unpasted area
            rows, cols = np.nonzero(pasted[0])
            if len(rows):  # a rectangle
                assert pasted[0][rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        else:
            modes.append('mixup')
            np.testing.assert_allclose(out, lam * xn + (1 - lam) * xn[::-1], rtol=1e-5, atol=1e-5)
    assert modes.count('cutmix') >= 3 and modes.count('mixup') >= 3, modes


def test_smooth_labels_is_timms():
    """optax.smooth_labels of the one-hot labels: smoothing / K on every class, plus
    1 - smoothing on the true one (timm's mixup_target)."""
    y = jnp.asarray([0, 3, 9, 3])
    for smoothing in (0.0, 0.1, 0.3):
        want = np.full((4, K), smoothing / K)
        want[np.arange(4), np.asarray(y)] = 1 - smoothing + smoothing / K
        got = augment.smooth_labels(y, K, smoothing)
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('alpha', [0.8, 1.0])
def test_mixup_lam_is_beta(alpha):
    """lam ~ Beta(alpha, alpha) (jax.random.beta): mean 1/2, variance 1 / (4 (2 alpha + 1))."""
    x = images(b=2, size=4)
    y = jnp.arange(2)  # distinct labels: lam is the weight of the own label
    keys = jax.random.split(jax.random.PRNGKey(0), 20000)
    lam = np.asarray(jax.vmap(lambda k: augment.mixup_cutmix(
        k, x, y, mixup_alpha=alpha, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=2)[1][0, 0])(keys))
    assert lam.min() >= 0 and lam.max() <= 1
    assert abs(lam.mean() - 0.5) < 0.01
    assert abs(lam.var() - 1 / (4 * (2 * alpha + 1))) < 0.004


def test_soft_cross_entropy():
    logits = np.random.default_rng(0).normal(size=(4, 6)).astype(np.float32)
    labels = np.array([0, 5, 2, 2])
    targets = np.full((4, 6), 0.1) + 0.4 * np.eye(6)[labels]
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(augment.soft_cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                               -(targets * log_p).sum(-1).mean(), rtol=1e-5)


# ------------------------------------------------------------------------------ random erasing

def test_random_erasing():
    b, s = 400, 16
    x = images(b=b, size=s)
    xn = np.asarray(x)
    out = np.asarray(augment.random_erasing(jax.random.PRNGKey(1), x, prob=0.25))
    changed = np.any(out != xn, axis=(1, 2, 3))
    assert 0.18 < changed.mean() < 0.32
    np.testing.assert_array_equal(out[~changed], xn[~changed])
    np.testing.assert_array_equal(out, augment.random_erasing(jax.random.PRNGKey(1), x, prob=0.25))
    px = np.all(out != xn, axis=-1)[changed]  # [n, s, s] erased pixels
    frac = px.mean((1, 2))
    assert frac.min() >= 0.01 and frac.max() <= 0.45  # areas 2%..33% (sides rounded)
    for m in px[:20]:
        rows, cols = np.nonzero(m)
        assert m[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    zeros = np.asarray(augment.random_erasing(jax.random.PRNGKey(1), x, prob=1.0, mode='const'))
    erased = np.any(zeros != xn, axis=(1, 2, 3))
    assert erased.mean() > 0.95 and np.all(zeros[zeros != xn] == 0)
    np.testing.assert_array_equal(augment.random_erasing(jax.random.PRNGKey(1), x, prob=0.0), x)


# ------------------------------------------------------------------------------ RandAugment

def _element(h=40, w=52):
    yy, xx = np.mgrid[0:h, 0:w]
    texture = 20 * ((yy // 4 + xx // 4) % 2)  # edges, for the sharpness filter
    img = np.stack([60 + 2 * yy + texture, 50 + 2 * xx, 100 + yy + xx], -1).clip(0, 255).astype(np.uint8)
    return {'image': img, 'label': np.int32(1), 'index': np.int32(3)}


def test_rand_augment_ops():
    img = Image.fromarray(_element()['image'])
    rng = np.random.default_rng(0)
    changed = 0
    for name, op in augment.RAND_AUGMENT_OPS.items():
        out = op(img, 0.9, rng, augment.FILL)
        assert out.size == img.size and out.mode == 'RGB', name
        changed += not np.array_equal(np.asarray(out), np.asarray(img))
    assert len(augment.RAND_AUGMENT_OPS) == 15 and changed == 15


def test_rand_augment_transform():
    el = _element()
    t = augment.RandAugmentCropFlip(24)
    crop_only = data.RandomResizedCropFlip(24, (0.08, 1.0))
    differs = 0
    for seed in range(6):
        out = t.random_map(dict(el), np.random.default_rng(seed))
        assert set(out) == {'image', 'label', 'index', 'crop', 'flip'}
        assert out['image'].shape == (24, 24, 3) and out['image'].dtype == np.uint8
        assert out['label'] == 1 and out['index'] == 3 and out['crop'].dtype == np.float32
        again = t.random_map(dict(el), np.random.default_rng(seed))
        for k in out:
            np.testing.assert_array_equal(out[k], again[k])
        ref = crop_only.random_map(dict(el), np.random.default_rng(seed))  # same draws first
        np.testing.assert_array_equal(out['crop'], ref['crop'])
        assert out['flip'] == ref['flip']
        differs += not np.array_equal(out['image'], ref['image'])
    assert differs >= 3
    ds = grain.MapDataset.source([el] * 4).random_map(t, seed=7)
    a, b = [x['image'] for x in ds], [x['image'] for x in ds]
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    normed = augment.RandAugmentCropFlip(24, mean=data.MAE_MEAN, std=data.MAE_STD).random_map(
        dict(el), np.random.default_rng(0))
    assert normed['image'].dtype == np.float32
    np.testing.assert_allclose(normed['image'],
                               data.normalize(t.random_map(dict(el), np.random.default_rng(0))['image'],
                                              data.MAE_MEAN, data.MAE_STD))


def test_posterize_at_the_top_magnitude():
    img = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3))
    out = augment.RAND_AUGMENT_OPS['PosterizeIncreasing'](img, 1.0, np.random.default_rng(0), augment.FILL)
    assert np.asarray(out).max() <= 128  # 1 bit left, no error from PIL

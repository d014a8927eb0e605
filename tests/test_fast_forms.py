"""The XLA:CPU forms of the model (model.CPU_FORMS) compute what the plain forms compute."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colormae_jax import masking
from colormae_jax.models import mae as M


def small(**kw):
    base = dict(image_size=16, patch=4, width=32, depth=2, mlp_dim=64, heads=2, dec_width=16, dec_depth=2,
                dec_heads=2, attn_impl='einsum')
    base.update(kw)
    return M.MAEConfig(**base)


def loss_and_grads(c: M.MAEConfig, params: dict, x, part):
    graphdef, state = nnx.split(M.MAE(c, rngs=nnx.Rngs(0)))

    def f(p):
        s = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graphdef, s)(x, part)[0]

    return jax.jit(jax.value_and_grad(f))(params)


def check_against_plain(monkeypatch, form_sets):
    c = small()
    params = M.init_mae_params(c, 0)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (4, 16)), masking.mae_counts(16, 0.75))
    loss0, g0 = loss_and_grads(c, params, x, part)
    for forms in form_sets:
        monkeypatch.setattr(M, 'CPU_FORMS', frozenset(forms))
        loss1, g1 = loss_and_grads(dataclasses.replace(c, attn_impl='cpu'), params, x, part)
        np.testing.assert_allclose(loss1, loss0, rtol=1e-6, err_msg=str(forms))
        for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()), err_msg=str(forms))


def test_mae_loss_and_grads_equal_the_plain_forms(monkeypatch):
    """All forms together against the plain forms ('einsum'), on the same params."""
    check_against_plain(monkeypatch, [M.CPU_FORM_NAMES])


@pytest.mark.slow
def test_each_form_alone_equals_the_plain_forms(monkeypatch):
    check_against_plain(monkeypatch, [[f] for f in M.CPU_FORM_NAMES])


def test_a_wrong_backward_is_caught(monkeypatch):
    """The comparisons have teeth: a wrong backward (LayerNorm's without its mean terms) differs."""
    def wrong_bwd(eps, res, g):
        x, mean, rstd, scale = res
        xhat = (x - mean) * rstd
        return rstd * g * scale, (g * xhat).sum((0, 1)), g.sum((0, 1))

    monkeypatch.setattr(M, 'CPU_FORMS', frozenset({'layernorm'}))
    ln = M.LayerNorm(8, epsilon=1e-6, dtype=jnp.float32, rngs=nnx.Rngs(0), impl='cpu')
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8))
    good = jax.jit(jax.grad(lambda y: jnp.sum(ln(y) * jnp.arange(8.0))))(x)
    M._layer_norm.defvjp(M._layer_norm_fwd, wrong_bwd)
    try:
        bad = jax.jit(jax.grad(lambda y: jnp.sum(ln(y) * jnp.arange(8.0))))(x)
    finally:
        M._layer_norm.defvjp(M._layer_norm_fwd, M._layer_norm_bwd)
    assert float(jnp.abs(bad - good).max()) > 1e-2


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_layer_norm_equals_nnx_layer_norm(monkeypatch, dtype):
    monkeypatch.setattr(M, 'CPU_FORMS', frozenset({'layernorm'}))
    ours = M.LayerNorm(24, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0), impl='cpu')
    ref = nnx.LayerNorm(24, epsilon=1e-6, dtype=dtype, rngs=nnx.Rngs(0))
    assert nnx.to_pure_dict(nnx.state(ours)).keys() == {'scale', 'bias'}
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    for m in (ours, ref):
        m.scale[...] = 1 + 0.3 * jax.random.normal(k[0], (24,))
        m.bias[...] = 0.3 * jax.random.normal(k[1], (24,))
    x = (3 + 2 * jax.random.normal(k[2], (4, 5, 24))).astype(dtype)
    w = jax.random.normal(k[3], (4, 5, 24))

    def grads(m):
        graphdef, state = nnx.split(m)
        return jax.jit(jax.grad(lambda s, y: jnp.sum(nnx.merge(graphdef, s)(y).astype(jnp.float32) * w),
                                (0, 1)))(state, x)

    assert ours(x).dtype == ref(x).dtype == dtype
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.float32(ours(x)), np.float32(ref(x)), atol=tol)
    (s1, x1), (s0, x0) = grads(ours), grads(ref)
    np.testing.assert_allclose(np.float32(x1), np.float32(x0), atol=tol * 10)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s0)):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol * 10)


def test_attention_core_equals_dot_product_attention():
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    q, kk, v, w = (jax.random.normal(key, (3, 7, 2, 8)) for key in k)

    def loss(impl):
        return lambda a, b, c: jnp.sum(M.attention(a, b, c, impl) * w)

    np.testing.assert_allclose(jax.jit(lambda *a: M.attention(*a, 'cpu'))(q, kk, v),
                               jax.jit(jax.nn.dot_product_attention)(q, kk, v), atol=1e-6)
    g1 = jax.jit(jax.grad(loss('cpu'), (0, 1, 2)))(q, kk, v)
    g0 = jax.jit(jax.grad(lambda a, b, c: jnp.sum(jax.nn.dot_product_attention(a, b, c) * w), (0, 1, 2)))(q, kk, v)
    for a, b in zip(g1, g0):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_forms_follow_the_backend_and_keep_the_params(monkeypatch):
    assert M.cpu_forms('auto') == M.CPU_FORMS  # tests run on the CPU backend
    assert M.cpu_forms('cpu') == M.CPU_FORMS
    for impl in ('einsum', 'xla', 'cudnn', None):
        assert M.cpu_forms(impl) == frozenset()
    monkeypatch.setattr(M.jax, 'default_backend', lambda: 'gpu')
    assert M.cpu_forms('auto') == frozenset()  # the accelerator path is the plain one
    c = small()
    trees = [jax.tree.map(lambda a: (a.shape, a.dtype), M.abstract_mae(dataclasses.replace(c, attn_impl=i))[1])
             for i in ('auto', 'cpu', 'einsum', 'xla')]
    assert all(t == trees[0] for t in trees)
    assert trees[0]['decoder']['blocks'][0]['norm1'].keys() == {'scale', 'bias'}

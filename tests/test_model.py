import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colormae_jax import masking
from colormae_jax.models import mae as M


def tiny(**kw):
    base = dict(image_size=32, patch=8, width=32, depth=2, mlp_dim=64, heads=2, dec_width=16, dec_depth=1,
                dec_heads=2)
    base.update(kw)
    return M.MAEConfig(**base)


def test_variants_and_parse():
    assert M.parse_variant('B/16') == ('B', 16)
    assert M.VARIANTS['B'][:2] == (768, 12) and M.VARIANTS['L'][1] == 24 and M.VARIANTS['H'][0] == 1280
    for bad in ('B16', 'X/16', 'B/x'):
        with pytest.raises(ValueError, match='variant'):
            M.parse_variant(bad)


def test_sincos_matches_mae_formula():
    pe = M.sincos_2d(4, 8)
    assert pe.shape == (16, 8)
    # Token (h=1, w=2): first half embeds w, second half h; omega = [1, 1/100].
    w, h = 2.0, 1.0
    want = [np.sin(w), np.sin(w / 100), np.cos(w), np.cos(w / 100),
            np.sin(h), np.sin(h / 100), np.cos(h), np.cos(h / 100)]
    np.testing.assert_allclose(pe[1 * 4 + 2], want, rtol=1e-6)


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    p = M.patchify(x, 8)
    assert p.shape == (2, 16, 8 * 8 * 3)
    np.testing.assert_array_equal(p[0, 1], x[0, 0:8, 8:16].reshape(-1))  # row-major patch order
    np.testing.assert_array_equal(M.unpatchify(p, 8), x)


@pytest.mark.slow
@pytest.mark.parametrize('image_size,patch,ratio,throw', [(32, 8, 0.75, 0.0), (48, 16, 0.5, 0.25), (28, 4, 0.75, 0.0)])
def test_shapes(image_size, patch, ratio, throw):
    c = tiny(image_size=image_size, patch=patch)
    mae = M.MAE(c, rngs=nnx.Rngs(0))
    n = c.num_patches
    cnt = masking.amt_counts(n, ratio, throw) if throw else masking.mae_counts(n, ratio)
    x = jnp.zeros((3, image_size, image_size, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (3, n)), cnt)
    latent = mae.encoder(x, part.visible)
    assert latent.shape == (3, 1 + cnt.visible, c.width)
    pred = mae.decoder(latent, part.visible, part.masked)
    assert pred.shape == (3, cnt.masked, c.patch_dim)
    loss, _ = mae(x, part)
    assert loss.shape == ()
    assert mae.encoder(x).shape == (3, 1 + n, c.width)
    assert mae.encoder.cls_attention(x).shape == (3, c.heads, n)


def test_cls_attention_is_a_distribution_over_patches_and_cls():
    c = tiny()
    enc = M.MAE(c, rngs=nnx.Rngs(0)).encoder
    a = enc.cls_attention(jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3)))
    assert bool(jnp.all(a > 0)) and bool(jnp.all(a.sum(-1) < 1.0))  # the rest is attention to [CLS] itself


def test_cls_attention_is_the_last_blocks_cls_row():
    """FAMT's map: the [CLS] row of the last block's attention. Checked against what that
    block computes: its attention output at [CLS] is these probabilities times its values
    (with 1 - sum for [CLS] itself), through the block's own attention code path."""
    c = tiny(depth=3)
    enc = M.MAE(c, rngs=nnx.Rngs(0)).encoder
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    a = enc.cls_attention(x)  # [B, heads, N]
    h = enc.embed(x, None)
    for block in enc.blocks[:-1]:
        h = block(h)
    last = enc.blocks[-1]
    h = last.norm1(h)
    out = last.attn(h)[:, 0]  # the block's attention output at [CLS], [B, D]
    b, n, d = h.shape
    v = M.dense_tokens(last.attn.qkv, h).reshape(b, n, 3, c.heads, d // c.heads)[:, :, 2]
    probs = jnp.concatenate([1 - a.sum(-1, keepdims=True), a], axis=-1)  # [B, heads, 1 + N]
    z = jnp.einsum('bhk,bkhd->bhd', probs, v).reshape(b, d)
    np.testing.assert_allclose(M.dense_tokens(last.attn.proj, z[:, None])[:, 0], out, atol=2e-5)
    # another row (patch 0's) or another block's attention does not reproduce it
    first = enc.blocks[0]
    wrong = first.attn.cls_attention(first.norm1(enc.embed(x, None)))
    probs = jnp.concatenate([1 - wrong.sum(-1, keepdims=True), wrong], axis=-1)
    z = jnp.einsum('bhk,bkhd->bhd', probs, v).reshape(b, d)
    assert float(jnp.abs(M.dense_tokens(last.attn.proj, z[:, None])[:, 0] - out).max()) > 1e-3


def _reference_loss(mae, x, part, n):
    """MAE's formulation: predictions over the full grid, (loss * mask).sum() / mask.sum().
    Predictions at non-masked positions are garbage: they must not matter."""
    _, pred = mae(x, part)
    b = x.shape[0]
    rows = jnp.arange(b)[:, None]
    full = jnp.full((b, n, pred.shape[-1]), 1e6).at[rows, part.masked].set(pred)
    target = M.normalize_patches(M.patchify(x, mae.c.patch))
    per_token = jnp.mean((full - target) ** 2, -1)
    mask = jnp.zeros((b, n)).at[rows, part.masked].set(1.0)
    return (per_token * mask).sum() / mask.sum()


@pytest.mark.slow
def test_loss_covers_masked_tokens_only():
    c = tiny(patch=8)
    mae = M.MAE(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), masking.amt_counts(16, 0.5, 0.25))
    loss, _ = mae(x, part)
    np.testing.assert_allclose(loss, _reference_loss(mae, x, part, 16), rtol=1e-5)


@pytest.mark.slow
def test_thrown_patches_are_never_computed():
    """Changing the pixels of thrown patches changes neither the loss nor any gradient."""
    c = tiny(patch=8)
    graphdef, params = nnx.split(M.MAE(c, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), masking.amt_counts(16, 0.5, 0.25))
    patches = M.patchify(x, 8)
    rows = jnp.arange(2)[:, None]
    x2 = M.unpatchify(patches.at[rows, part.thrown].add(100.0), 8)
    x3 = M.unpatchify(patches.at[rows, part.masked].multiply(-1.0), 8)  # norm-pix ignores shifts, not flips

    def f(p, img):
        return nnx.merge(graphdef, p)(img, part)[0]

    (l1, g1), (l2, g2) = jax.value_and_grad(f)(params, x), jax.value_and_grad(f)(params, x2)
    assert float(l1) == float(l2)
    jax.tree.map(np.testing.assert_array_equal, g1, g2)
    assert float(f(params, x3)) != float(l1)  # but masked pixels are the targets


def test_norm_pix_switch():
    c1, c2 = tiny(norm_pix_loss=True), tiny(norm_pix_loss=False)
    x = 5.0 + jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), masking.mae_counts(16, 0.75))
    l1 = M.MAE(c1, rngs=nnx.Rngs(0))(x, part)[0]
    l2 = M.MAE(c2, rngs=nnx.Rngs(0))(x, part)[0]
    assert float(l2) > 10 * float(l1)  # raw targets around 5 are far from predictions near 0


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params():
    c = tiny(dtype=jnp.bfloat16)
    mae = M.MAE(c, rngs=nnx.Rngs(0))
    _, params = nnx.split(mae)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), masking.mae_counts(16, 0.75))
    assert mae.encoder(x, part.visible).dtype == jnp.bfloat16
    loss, pred = mae(x, part)
    assert loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))


@pytest.mark.slow
def test_attention_implementations_agree():
    q, k, v = jax.random.normal(jax.random.PRNGKey(0), (3, 2, 17, 3, 8))
    ref = M.attention(q, k, v, 'xla')
    np.testing.assert_allclose(M.attention(q, k, v, 'einsum'), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(M.attention(q, k, v, 'auto'), ref, rtol=1e-5, atol=1e-6)


def test_gelu_is_the_exact_gelu_with_its_derivative():
    x = jnp.linspace(-6.0, 6.0, 20001)
    # through erf as torch's nn.GELU: below about -5 the tail (< 1e-6) rounds to 0, where erfc keeps it
    np.testing.assert_allclose(M.gelu(x), jax.nn.gelu(x, approximate=False), rtol=1e-6, atol=1e-6)
    grad = jax.vmap(jax.grad(M.gelu))(x)
    want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-6)
    assert abs(float(jax.grad(M.gelu)(0.0)) - 0.5) < 1e-7  # Phi(0)
    xb = x.astype(jnp.bfloat16)
    assert M.gelu(xb).dtype == jnp.bfloat16 and jax.grad(lambda v: M.gelu(v).sum())(xb).dtype == jnp.bfloat16


def test_abstract_and_initial_params():
    c = tiny()
    graphdef, abstract = M.abstract_mae(c)
    params = M.init_mae_params(c, seed=3)
    assert sorted(params) == ['decoder', 'encoder']
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(abstract))
    assert jax.tree.structure(abstract) == jax.tree.structure(params)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(lambda a: (a.shape, a.dtype), params)
    assert params['encoder']['cls_token'].shape == (1, 1, c.width)
    # The seed is the model's: the same as MAE(c, rngs=nnx.Rngs(seed)), another seed differs.
    want = nnx.to_pure_dict(nnx.state(M.MAE(c, rngs=nnx.Rngs(3)), nnx.Param))
    jax.tree.map(np.testing.assert_array_equal, params, want)
    assert not np.array_equal(M.init_mae_params(c, seed=4)['encoder']['cls_token'], params['encoder']['cls_token'])
    # The graphdef runs with the pure dict.
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
    part = masking.partition(jax.random.uniform(jax.random.PRNGKey(1), (2, 16)), masking.mae_counts(16, 0.75))
    loss, _ = nnx.merge(graphdef, params)(x, part)
    np.testing.assert_array_equal(loss, M.MAE(c, rngs=nnx.Rngs(3))(x, part)[0])

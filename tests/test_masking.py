import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colormae_jax import masking


@pytest.mark.parametrize('n,ratio,throw', [(64, 0.75, 0.0), (196, 0.75, 0.0), (196, 0.45, 0.40), (16, 0.5, 0.25)])
def test_partition_counts_disjoint_complete(n, ratio, throw):
    c = masking.counts(n, ratio, throw)
    assert c.masked == round(n * ratio) and c.thrown == round(n * throw)
    assert c.visible + c.thrown + c.masked == n
    scores = jax.random.uniform(jax.random.PRNGKey(0), (5, n))
    p = masking.partition(scores, c)
    assert p.visible.shape == (5, c.visible) and p.thrown.shape == (5, c.thrown) and p.masked.shape == (5, c.masked)
    allidx = np.concatenate([p.visible, p.thrown, p.masked], axis=1)
    for row in allidx:
        assert sorted(row.tolist()) == list(range(n))  # disjoint and complete


def test_partition_keeps_highest_scores_visible():
    scores = jnp.asarray([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]])
    p = masking.partition(scores, masking.counts(8, 0.5, 0.25))
    assert set(p.visible[0].tolist()) == {1, 4}
    assert set(p.thrown[0].tolist()) == {6, 2}
    assert set(p.masked[0].tolist()) == {7, 3, 5, 0}


def test_counts_refuse_empty_sets():
    with pytest.raises(ValueError, match='visible'):
        masking.counts(16, 0.5, 0.5)
    with pytest.raises(ValueError, match='visible'):
        masking.counts(4, 0.9)


def _cfg(**kw):
    return ml_collections.ConfigDict(dict(strategy='random', ratio=0.75, throw_ratio=0.0, **kw))


def test_random_strategy_keys():
    s = masking.create(_cfg(), grid=8)
    batch = {'image': jnp.zeros((4, 32, 32, 3))}
    a = s(jax.random.PRNGKey(0), batch, s.init_aux(None))
    b = s(jax.random.PRNGKey(0), batch, ())
    c = s(jax.random.PRNGKey(1), batch, ())
    np.testing.assert_array_equal(a.masked, b.masked)
    assert not np.array_equal(a.masked, c.masked)
    assert len({tuple(sorted(r)) for r in np.asarray(a.visible).tolist()}) == 4  # a fresh mask per sample
    assert a.visible.shape == (4, 16)


def test_random_strategy_has_no_position_bias():
    s = masking.create(_cfg(), grid=8)
    p = jax.jit(lambda k: s(k, {'image': jnp.zeros((2000, 1))}, ()))(jax.random.PRNGKey(3))
    freq = np.bincount(np.asarray(p.visible).ravel(), minlength=64) / 2000
    assert abs(freq.mean() - 0.25) < 1e-9
    assert freq.min() > 0.25 - 0.05 and freq.max() < 0.25 + 0.05  # ~5 sigma at n=2000


def test_unknown_strategy():
    with pytest.raises(ValueError, match="valid: \\['blue', 'famt', 'green', 'purple', 'random', 'red'"):
        masking.create(_cfg(), grid=8, name='nope')

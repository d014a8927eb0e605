import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colormae_jax import masking


@pytest.mark.parametrize('n,ratio,throw', [(64, 0.75, 0.0), (196, 0.75, 0.0), (196, 0.45, 0.40), (16, 0.5, 0.25)])
def test_partition_counts_disjoint_complete(n, ratio, throw):
    c = masking.amt_counts(n, ratio, throw) if throw else masking.mae_counts(n, ratio)
    assert c.visible + c.thrown + c.masked == n
    scores = jax.random.uniform(jax.random.PRNGKey(0), (5, n))
    p = masking.partition(scores, c)
    assert p.visible.shape == (5, c.visible) and p.thrown.shape == (5, c.thrown) and p.masked.shape == (5, c.masked)
    allidx = np.concatenate([p.visible, p.thrown, p.masked], axis=1)
    for row in allidx:
        assert sorted(row.tolist()) == list(range(n))  # disjoint and complete


def test_partition_keeps_highest_scores_visible():
    scores = jnp.asarray([[0.1, 0.9, 0.5, 0.3, 0.8, 0.2, 0.7, 0.4]])
    p = masking.partition(scores, masking.amt_counts(8, 0.5, 0.25))
    assert set(p.visible[0].tolist()) == {1, 4}
    assert set(p.thrown[0].tolist()) == {6, 2}
    assert set(p.masked[0].tolist()) == {7, 3, 5, 0}


def test_counts_refuse_empty_sets():
    with pytest.raises(ValueError, match='0 visible'):
        masking.amt_counts(16, 0.5, 0.5)
    with pytest.raises(ValueError, match='0 visible'):
        masking.mae_counts(4, 0.9)


# The official formulas, as written in the official code.
def mae_official(L, mask_ratio):  # facebookresearch/mae models_mae.py random_masking; ColorMAE the same
    len_keep = int(L * (1 - mask_ratio))
    return len_keep, 0, L - len_keep  # visible, thrown, masked


def amt_official(L, mask_ratio, throw_ratio):  # guijiejie/AMT mae-AMT/models_mae.py amt_masking_throwing
    len_mask_tail = int(L * mask_ratio)
    len_keep_head = int(L * (mask_ratio + throw_ratio))
    return L - len_keep_head, len_keep_head - len_mask_tail, len_mask_tail


GRIDS = (7, 8, 14, 16)  # N = 49, 64, 196, 256
RATIOS = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9)
PAIRS = ((0.45, 0.40), (0.5, 0.3), (0.4, 0.4), (0.3, 0.5), (0.6, 0.2), (0.45, 0.0))


def _shapes(s):
    batch = {'image': jnp.zeros((2, 1))}
    if s.name == 'famt':
        batch['famt_weight'] = jnp.ones((2, s.grid * s.grid))
    aux = s.init_aux(jax.random.PRNGKey(0)) if s.name != 'famt' else ()
    p = s(jax.random.PRNGKey(1), batch, aux)
    return p.visible.shape[1], p.thrown.shape[1], p.masked.shape[1]


@pytest.mark.parametrize('grid', GRIDS)
def test_counts_are_the_official_formulas(grid):
    n = grid * grid
    cfg = ml_collections.ConfigDict(dict(strategy='random', ratio=0.75, throw_ratio=0.0, schedule='',
                                         noise=dict(bank_size=4, side=0, sigma=1.5, sigma1=0.8, sigma2=2.0, path=''),
                                         famt=dict()))
    for r in RATIOS:
        want = mae_official(n, r)
        for name in ('random', 'green'):
            s = masking.create(cfg, grid, name, mask_ratio=r)
            assert (s.counts.visible, s.counts.thrown, s.counts.masked) == want, (name, n, r)
        assert _shapes(masking.create(cfg, grid, 'random', mask_ratio=r)) == want
    for r, t in PAIRS:
        s = masking.create(cfg, grid, 'famt', mask_ratio=r, throw_ratio=t)
        assert (s.counts.visible, s.counts.thrown, s.counts.masked) == amt_official(n, r, t), (n, r, t)
        assert _shapes(s) == amt_official(n, r, t)
    # where truncation and rounding differ: AMT's 8x8 grid at 0.45 / 0.40 keeps 10 visible (rounding gave 9)
    assert amt_official(64, 0.45, 0.40) == (10, 26, 28)


def _cfg(**kw):
    return ml_collections.ConfigDict({'strategy': 'random', 'ratio': 0.75, 'throw_ratio': 0.0, **kw})


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
    assert freq.min() > 0.25 - 0.05 and freq.max() < 0.25 + 0.05  # ~5 sigma at n=2000


def test_unknown_strategy():
    with pytest.raises(ValueError, match="valid: \\['blue', 'famt', 'green', 'purple', 'random', 'red'"):
        masking.create(_cfg(), grid=8, name='nope')


def test_schedule_phases_with_their_own_ratios():
    cfg = _cfg(schedule='random:0.75,famt:0.45/0.40@41, green@100, blue:0.6@20steps')
    phases = masking.parse_schedule(cfg)
    assert phases == [masking.Phase('random', 0.0, False, 0.75, None), masking.Phase('famt', 41.0, False, 0.45, 0.40),
                      masking.Phase('green', 100.0), masking.Phase('blue', 20.0, True, 0.6, None)]
    assert phases[1].start_step(10) == 410 and phases[3].start_step(10) == 20
    famt = masking.create(_cfg(famt=ml_collections.ConfigDict()), 8, 'famt', **phases[1].ratios())
    assert (famt.mask_ratio, famt.throw_ratio) == (0.45, 0.40)
    rnd = masking.create(_cfg(ratio=0.5, throw_ratio=0.1), 8, 'random', **phases[0].ratios())
    assert (rnd.mask_ratio, rnd.throw_ratio) == (0.75, 0.0)  # a phase with a mask ratio alone throws nothing
    green = masking.create(_cfg(ratio=0.5, throw_ratio=0.1, noise=ml_collections.ConfigDict({'side': 0})), 8,
                           'green', **phases[2].ratios())
    assert (green.mask_ratio, green.throw_ratio) == (0.5, 0.1)  # a phase without ratios takes the config's
    for bad, msg in (('random:1.2', 'mask ratio'), ('famt:0.4/1', 'throw ratio'), ('random@3', 'first entry'),
                     ('random,famt@2.5steps', 'whole number'), ('random:x', 'expected NAME'),
                     ('random,green@5,blue@4', 'increase')):
        with pytest.raises(ValueError, match=msg):
            masking.parse_schedule(_cfg(schedule=bad))

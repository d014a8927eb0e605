"""ColorMAE colour-noise masks: spectra, counts, keys, crops and flips, bank files, schedules."""
import itertools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from colormae_jax import config_lib, main, masking, parallel
from colormae_jax.masking import colour
from colormae_jax.tasks import pretrain

from helpers import make_folder, override, smoke_config

SIGMAS = dict(sigma=1.5, sigma1=0.8, sigma2=2.0)


def _cfg(strategy='green', **noise):
    n = dict(bank_size=16, side=32, sigma=1.5, sigma1=0.8, sigma2=2.0, path='')
    n.update(noise)
    return ml_collections.ConfigDict(dict(strategy=strategy, ratio=0.75, throw_ratio=0.0, schedule='',
                                          noise=ml_collections.ConfigDict(n)))


@pytest.fixture(scope='module')
def spectra():
    out = {}
    for c in colour.COLOURS:
        bank = colour.generate(jax.random.PRNGKey(0), c, 64, 64, **SIGMAS)
        f, p = colour.radial_power(bank)
        out[c] = (f[1:], p[1:] / p[1:].sum())  # drop DC (zero after standardising)
    return out


def _band(f, p, lo, hi):
    return p[(f >= lo) & (f < hi)].sum()


def test_banks_are_standardised():
    bank = colour.generate(jax.random.PRNGKey(1), 'purple', 8, 32, **SIGMAS)
    np.testing.assert_allclose(bank.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(bank.std(axis=(1, 2)), 1, atol=1e-4)


def test_spectra_red_low_blue_high(spectra):
    f, red = spectra['red']
    _, blue = spectra['blue']
    # ring-averaged power (normalised): red mostly below 0.1 cycles/cell, blue mostly above 0.2,
    # each nearly absent from the other's band (white noise would put 0.17 and 0.64 there)
    assert _band(f, red, 0, 0.1) > 0.75 and _band(f, red, 0.2, 1) < 0.02
    assert _band(f, blue, 0.2, 1) > 0.8 and _band(f, blue, 0, 0.1) < 0.05


def test_spectra_green_band_purple_notch(spectra):
    f, green = spectra['green']
    _, purple = spectra['purple']
    # the band-pass peak of G_0.8 - G_2.0: f* = sqrt(ln(s2^2/s1^2) / (2 pi^2 (s2^2 - s1^2))) ~ 0.166
    fstar = np.sqrt(np.log(2.0 ** 2 / 0.8 ** 2) / (2 * np.pi ** 2 * (2.0 ** 2 - 0.8 ** 2)))
    assert abs(f[np.argmax(green)] - fstar) < 0.04
    band = (f > fstar / 2) & (f < 2 * fstar)
    assert green[band].sum() > 0.8 and green[f < 0.04].sum() < 0.05 and green[f > 0.4].sum() < 0.03  # white: 0.06, 0.22
    # purple: a notch at the band: its power there is well below both sides of the spectrum
    at = purple[np.abs(f - fstar) < 0.02].mean()
    assert at < 0.5 * purple[f > 0.4].mean() and at < 0.7 * purple[(f > 0) & (f < 0.05)].mean()


@pytest.mark.parametrize('name', colour.COLOURS)
def test_counts_exact_and_highest_visible(name):
    s = masking.create(_cfg(name), grid=8)
    aux = s.init_aux(jax.random.PRNGKey(0))
    batch = {'image': jnp.zeros((6, 32, 32, 3))}
    rng = jax.random.PRNGKey(2)
    p = s(rng, batch, aux)
    assert p.visible.shape == (6, 16) and p.masked.shape == (6, 48) and p.thrown.shape == (6, 0)
    scores = np.asarray(s.scores(rng, batch, aux))
    for row, vis, msk in zip(scores, np.asarray(p.visible), np.asarray(p.masked)):
        assert row[vis].min() > row[msk].max()  # the highest noise values stay visible
        assert sorted(np.concatenate([vis, msk]).tolist()) == list(range(64))


@pytest.mark.parametrize('name', colour.COLOURS)
def test_highest_noise_stays_visible_from_bank_to_partition(name):
    """End to end, independent of ``scores``: a bank of one pattern as large as the grid (one
    crop, four flips), every value unique; each mask must keep visible exactly the 16 highest
    cells of one of the four flips of the pattern."""
    g = 8
    pattern = np.random.default_rng(0).permutation(g * g).astype(np.float32).reshape(g, g)
    s = colour.ColourNoiseMasking(name, g, 0.75, side=g)
    p = jax.jit(lambda k: s(k, {'image': jnp.zeros((64, 1))}, jnp.asarray(pattern[None])))(jax.random.PRNGKey(3))
    tops = {}
    for hf in (0, 1):
        for vf in (0, 1):
            w = pattern[:, ::-1] if hf else pattern
            w = w[::-1] if vf else w
            tops[(hf, vf)] = frozenset(np.argsort(-w.ravel())[:16].tolist())
    seen = set()
    for vis in np.asarray(p.visible):
        flips = [f for f, top in tops.items() if top == frozenset(vis.tolist())]
        assert len(flips) == 1, 'the visible cells are the 16 highest of one flip of the pattern'
        seen.add(flips[0])
    assert seen == set(tops)  # all four flips occur


def test_same_key_same_masks_other_key_other_masks():
    s = masking.create(_cfg('green'), grid=8)
    aux = s.init_aux(jax.random.PRNGKey(0))
    batch = {'image': jnp.zeros((8, 32, 32, 3))}
    f = jax.jit(lambda k: s(k, batch, aux))
    a, b, c = f(jax.random.PRNGKey(5)), f(jax.random.PRNGKey(5)), f(jax.random.PRNGKey(6))
    np.testing.assert_array_equal(a.visible, b.visible)
    assert not np.array_equal(np.sort(a.visible), np.sort(c.visible))
    assert len({tuple(sorted(r)) for r in np.asarray(a.visible).tolist()}) == 8  # per-sample masks


def _all_windows(bank, g):
    """Every crop (inside the borders) of every pattern, with every flip."""
    out = []
    for i, y, x in itertools.product(range(bank.shape[0]), range(bank.shape[1] - g + 1), range(bank.shape[2] - g + 1)):
        w = bank[i, y:y + g, x:x + g]
        out += [(i, y, x, hf, vf, (w[:, ::-1] if hf else w)[::-1] if vf else (w[:, ::-1] if hf else w))
                for hf in (0, 1) for vf in (0, 1)]
    return out


def test_crops_and_flips_of_a_known_bank():
    g = 3
    bank = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)  # every value unique
    s = colour.ColourNoiseMasking('green', g, 0.75)
    wins = np.asarray(jax.jit(lambda k: s.windows(k, 400, jnp.asarray(bank)))(jax.random.PRNGKey(0)))
    table = _all_windows(bank, g)
    seen = set()
    for w in wins:
        hits = [t[:5] for t in table if np.array_equal(t[5], w)]
        assert len(hits) == 1, 'every window is exactly one crop + flip of one pattern'
        seen.add(hits[0])
    i, y, x, hf, vf = map(set, zip(*seen))
    assert i == {0, 1} and y == {0, 1, 2} and x == {0, 1, 2, 3} and hf == {0, 1} and vf == {0, 1}
    # a window's top-left value pins pattern and offset: check the expected slice exactly
    w = wins[0]
    corner = [v for v in (w[0, 0], w[0, -1], w[-1, 0], w[-1, -1]) if v == w.min()][0]
    pi, rem = divmod(int(corner), 30)
    yy, xx = divmod(rem, 6)
    expect = bank[pi, yy:yy + g, xx:xx + g]
    assert sorted(w.ravel()) == sorted(expect.ravel())


def test_official_sampling_patterns_in_order_one_crop_per_batch():
    """``mask.noise.per_image=False``, the official code's: image i takes pattern i mod L, and
    the images of each block of L share one crop offset and one pair of flips."""
    g = 3
    bank = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    table = _all_windows(bank, g)
    s = colour.ColourNoiseMasking('green', g, 0.75, per_image=False)
    blocks = set()
    for seed in range(6):
        wins = np.asarray(s.windows(jax.random.PRNGKey(seed), 5, jnp.asarray(bank)))
        hits = [[t[:5] for t in table if np.array_equal(t[5], w)][0] for w in wins]
        assert [h[0] for h in hits] == [0, 1, 0, 1, 0]  # patterns in bank order
        for a, b in ((0, 1), (2, 3)):
            assert hits[a][1:] == hits[b][1:]  # one offset and flips per block of L = 2 images
        blocks.update(h[1:] for h in hits)
    assert len(blocks) > 3  # the shared crop changes between batches (and blocks)


def test_generated_bank_crops_wrap_seamlessly():
    s = masking.create(_cfg('red', bank_size=2, side=8), grid=4)
    raw = np.asarray(s.make_bank(jax.random.PRNGKey(0)))
    padded = np.asarray(s.init_aux(jax.random.PRNGKey(0)))
    assert padded.shape == (2, 11, 11)
    # a crop starting at the last row/column equals the torus crop of the raw pattern
    torus = np.roll(np.roll(raw[1], -7, axis=0), -6, axis=1)[:4, :4]
    np.testing.assert_array_equal(padded[1, 7:11, 6:10], torus)


def test_official_bank_file(tmp_path):
    path = str(tmp_path / 'green_noise_data_8.npz')
    np.savez(path, np.random.default_rng(0).normal(size=(8, 20, 24)))  # key 'arr_0', like the official files
    s = masking.create(_cfg('green', path=str(tmp_path / '{colour}_noise_data_8.npz')), grid=8)
    s.check(1)
    aux = s.init_aux(jax.random.PRNGKey(0))
    assert aux.shape == (8, 20, 24)  # loaded banks are not assumed periodic: no padding
    p = s(jax.random.PRNGKey(1), {'image': jnp.zeros((4, 32, 32, 3))}, aux)
    assert p.visible.shape == (4, 16)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    return make_folder(base / 'imgs', per_class=16), str(base / 'tfds')


def _bad(tmp_path, folder, **over):
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{'mask.strategy': 'green'})
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(override(c, **over), num_devices=1)
    return str(e.value)


def test_bad_noise_configs(tmp_path, folder):
    assert 'config.mask.noise.side: 4 is smaller than the 8x8 patch grid' in _bad(tmp_path, folder,
                                                                                 **{'mask.noise.side': 4})
    assert 'config.mask.noise.sigma1: green/purple need 0 < sigma1 < sigma2' in _bad(
        tmp_path, folder, **{'mask.noise.sigma1': 2.0, 'mask.noise.sigma2': 2.0})
    assert "config.mask.strategy: 'yellow' is unknown" in _bad(tmp_path, folder, **{'mask.strategy': 'yellow'})
    missing = str(tmp_path / 'nope.npz')
    assert 'does not exist' in _bad(tmp_path, folder, **{'mask.noise.path': missing})
    # the hint names the strategy's own colour (it said green for every colour)
    hint = _bad(tmp_path, folder, **{'mask.strategy': 'blue', 'mask.noise.path': str(tmp_path / '{colour}.npz')})
    assert f'tools.noise --colour blue --out {tmp_path / "blue.npz"}`' in hint
    np.savez(tmp_path / 'flat.npz', np.zeros((16, 16)))
    assert 'expected one array [L, H, W]' in _bad(tmp_path, folder, **{'mask.noise.path': str(tmp_path / 'flat.npz')})
    nan = np.ones((2, 16, 16))
    nan[1, 3, 3] = np.nan
    np.savez(tmp_path / 'nan.npz', nan)
    assert 'NaN' in _bad(tmp_path, folder, **{'mask.noise.path': str(tmp_path / 'nan.npz')})
    np.savez(tmp_path / 'small.npz', np.ones((2, 6, 6)))
    assert 'smaller than the 8x8 patch grid' in _bad(tmp_path, folder,
                                                     **{'mask.noise.path': str(tmp_path / 'small.npz')})
    assert 'the starts must increase' in _bad(tmp_path, folder, **{'mask.schedule': 'green,blue@2,red@1'})
    assert "'teal' is unknown" in _bad(tmp_path, folder, **{'mask.schedule': 'green,teal@2'})


def test_schedule_switches_that_round_to_one_step_are_refused(tmp_path, folder):
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{'mask.schedule': 'green,blue@1,red@1.01'})
    t = pretrain.make_trainer(c, parallel.make_mesh(c.mesh, jax.devices()[:1]), steps_per_epoch=4)
    with pytest.raises(config_lib.ConfigError, match=r"'red' at epoch 1.01 \(step 4\) leaves no step"):
        pretrain.MaskPhases(t)  # built before anything compiles


def test_parse_schedule():
    c = _cfg()
    assert masking.parse_schedule(c) == [masking.Phase('green', 0.0)]
    c.schedule = 'green,blue@200,red@250'
    assert masking.parse_schedule(c) == [masking.Phase('green', 0.0), masking.Phase('blue', 200.0),
                                         masking.Phase('red', 250.0)]


@pytest.mark.slow
def test_schedule_switches_and_compiles_once_per_strategy(folder, tmp_path, monkeypatch):
    root, data_dir = folder
    traced = []
    real = pretrain.train_step

    def counting(state, batch, aux, *, t, strategy):
        traced.append(strategy.name)
        return real(state, batch, aux, t=t, strategy=strategy)

    monkeypatch.setattr(pretrain, 'train_step', counting)
    # 32 examples / batch 8 = 4 steps per epoch: green 1-4, blue 5-8, green 9-12
    c = smoke_config(root, data_dir, **{'mask.schedule': 'green,blue@1,green@2', 'image_summary_every_epochs': 0.0})
    out = main.run(c, str(tmp_path / 'w'), devices=jax.devices()[:1])
    assert out['step'] == 12 and np.isfinite(out['losses']).all()
    assert sorted(traced) == ['blue', 'green']  # green came back without a second compile


@pytest.mark.slow
def test_noise_tool_writes_bank_and_figure(tmp_path):
    import subprocess
    import sys
    out, fig = tmp_path / 'b' / 'blue.npz', tmp_path / 'fig.png'
    r = subprocess.run([sys.executable, '-m', 'colormae_jax.tools.noise', '--colour=blue', '--size=4', '--side=16',
                        '--grid=8', f'--out={out}', f'--figure={fig}'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    bank = colour.load_bank(str(out), grid=8)
    assert bank.shape == (4, 16, 16)
    assert fig.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    r = subprocess.run([sys.executable, '-m', 'colormae_jax.tools.noise', '--sigma1=3', '--sigma2=2', f'--out={out}'],
                       capture_output=True, text=True)
    assert r.returncode != 0 and '0 < --sigma1 < --sigma2' in r.stderr

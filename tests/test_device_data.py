"""The device-resident pipeline (data.pipeline='device'): the same statistics as the grain
path, exact resume, the resident views equal to the host's, refusals."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from colormae_jax import config_lib, knn, main, parallel
from colormae_jax.data import device as device_data, pipeline as data
from colormae_jax.errors import ConfigError
from colormae_jax.models import mae as model_lib

from helpers import make_folder, smoke_config

DEV = jax.devices()[:1]


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    root = make_folder(base / 'imgs', per_class=16, splits=('train', 'test'))
    return root, str(base / 'tfds')


def _host_boxes(n, h, w, seed=1):
    g = np.random.default_rng(seed)
    return np.array([data.random_resized_crop_box(h, w, g) for _ in range(n)])


@pytest.mark.parametrize('h,w', [(32, 32), (64, 48)])
def test_crop_scale_and_aspect_match_the_host_sampler(h, w):
    n = 3000
    top, left, ch, cw = map(np.asarray, jax.jit(lambda k: device_data.sample_boxes(k, n, h, w))(
        jax.random.PRNGKey(0)))
    host = _host_boxes(n, h, w)
    assert (ch >= 1).all() and (cw >= 1).all() and (top + ch <= h).all() and (left + cw <= w).all()
    for ours, theirs in [(ch * cw / (h * w), host[:, 2] * host[:, 3] / (h * w)),  # area fraction
                         (np.log(cw / ch), np.log(host[:, 3] / host[:, 2])),  # aspect
                         (top / h, host[:, 0] / h), (left / w, host[:, 1] / w)]:
        ks = stats.ks_2samp(ours, theirs)
        assert ks.statistic < 0.05 and ks.pvalue > 1e-3, ks
    scale = ch * cw / (h * w)
    assert scale.min() > 0.17 and np.quantile(scale, 0.99) <= 1.0  # rounding leaves the (0.2, 1) band a little


def test_fallback_box_is_torchvisions():
    # 10 x 100: no try fits, so the largest centred crop of aspect 4/3 (as the host sampler)
    box = [int(np.asarray(x)[0]) for x in device_data.sample_boxes(jax.random.PRNGKey(3), 1, 10, 100)]
    assert box == [0, 43, 10, 13] == list(data.random_resized_crop_box(10, 100, np.random.default_rng(0)))


def test_resample_matches_pil_bicubic():
    from PIL import Image
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    for src, tol in ((32, 0), (64, 1)):  # up-sampling: equal; down-sampling (antialiased): PIL's fixed point
        im = np.asarray(Image.fromarray(small).resize((src, src), Image.BICUBIC))
        for t, lf, h, w in ((3, 5, src * 5 // 8, src * 17 // 32), (1, 2, 32, 20), (0, 0, src, src)):
            ref = np.asarray(Image.fromarray(im).crop((lf, t, lf + w, t + h)).resize((32, 32), Image.BICUBIC))
            ours = np.asarray(device_data.resample(jnp.asarray(im[None]), 32, t, lf, h, w))[0]
            assert np.abs(ours.astype(int) - ref).max() <= tol


def test_flips_are_fair_and_the_batch_describes_its_crop():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8))
    labels = jnp.arange(64, dtype=jnp.int32)
    f = jax.jit(lambda k, i: device_data.train_batch(images, labels, i, k, size=32))
    flips = np.concatenate([np.asarray(f(jax.random.PRNGKey(s), jnp.arange(64) % 64)['flip']) for s in range(60)])
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(flips.size)  # 3840 draws: within 4 sigma
    idx = jnp.asarray(rng.permutation(64)[:16])
    b = jax.device_get(f(jax.random.PRNGKey(7), idx))
    np.testing.assert_array_equal(b['label'], np.asarray(idx))
    for i in range(16):
        y0, x0, hh, ww = b['crop'][i] * 32
        want = np.asarray(device_data.resample(images[int(idx[i])][None], 32, y0, x0, hh, ww))[0]
        np.testing.assert_array_equal(b['image'][i], want[:, ::-1] if b['flip'][i] else want)


def test_epoch_order_is_a_permutation_that_changes_by_epoch():
    p = [np.asarray(device_data.epoch_permutation(0, e, 1000)) for e in (0, 1, 0)]
    np.testing.assert_array_equal(np.sort(p[0]), np.arange(1000))
    np.testing.assert_array_equal(p[0], p[2])
    assert (p[0] != p[1]).mean() > 0.9
    assert (np.asarray(device_data.epoch_permutation(1, 0, 1000)) != p[0]).mean() > 0.9


def test_iterator_state_resumes_exactly_and_visits_every_epoch_once(folder):
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{'data.pipeline': 'device'})
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:2])
    make = lambda: device_data.make_train_iterator(c.data, global_batch_size=8, seed=3, mesh=mesh)  # noqa: E731
    it = make()
    seen = [jax.device_get(next(it)) for _ in range(4)]  # 32 examples, 4 batches per epoch
    assert sorted(np.concatenate([s['index'] for s in seen])) == list(range(32))
    state = it.get_state()
    assert state['epoch'] == 0 and state['position'] == 4
    later = [jax.device_get(next(it)) for _ in range(3)]
    it2 = make()
    it2.set_state(state)
    again = [jax.device_get(next(it2)) for _ in range(3)]
    for a, b in zip(later, again):
        jax.tree.map(np.testing.assert_array_equal, a, b)
    assert it2.get_state()['epoch'] == 1
    with pytest.raises(Exception, match='seed: saved 4, now 3'):
        it2.set_state(dict(state, seed=4))


def test_eval_views_equal_the_host_pipeline(folder, tmp_path):
    root, data_dir = folder
    for r, size in ((root, 32), (make_folder(tmp_path / 'big', per_class=4, size=(40, 48)), 32)):
        c = smoke_config(r, data_dir, **{'data.pipeline': 'device', 'data.image_size': size})
        mesh = parallel.make_mesh(c.mesh, jax.devices()[:2])
        for view in ('center_crop', 'resize'):
            host = next(data.make_eval_iterator(c.data, split='train', global_batch_size=8, view=view))
            dev = next(device_data.eval_batches(c.data, split='train', global_batch_size=8, mesh=mesh, view=view))
            np.testing.assert_array_equal(dev['label'], host['label'])
            diff = np.abs(np.asarray(dev['image']).astype(int) - host['image'])
            assert diff.max() <= (0 if r == root else 1), (view, diff.max())


def test_knn_features_come_from_the_resident_split(folder):
    root, data_dir = folder
    c = smoke_config(root, data_dir)
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:2])
    mae = model_lib.mae_config(c.model, 32)
    params = model_lib.init_mae_params(mae, 0)['encoder']
    fn = knn.make_feature_fn(mae, c.data, mesh)
    host = knn.extract(fn, params, c.data, split='test', batch_size=8, mesh=mesh, limit=20)
    c.data.pipeline = 'device'
    dev = knn.extract(fn, params, c.data, split='test', batch_size=8, mesh=mesh, limit=20)
    np.testing.assert_array_equal(dev['index'], host['index'])
    np.testing.assert_allclose(dev['cls'], host['cls'], atol=1e-5)


def test_several_processes_are_refused_in_one_line(folder, monkeypatch):
    root, data_dir = folder
    monkeypatch.setattr(jax, 'process_count', lambda: 2)
    with pytest.raises(ConfigError, match="config.data.pipeline: 'device' runs in one process, this run has 2; "
                                          "use data.pipeline='grain'"):
        config_lib.validate(smoke_config(root, data_dir, **{'data.pipeline': 'device'}), num_devices=1)
    config_lib.validate(smoke_config(root, data_dir), num_devices=1)  # the grain path is not concerned


def test_a_split_too_large_is_refused_before_anything_is_placed(folder):
    root, data_dir = folder
    device_data.clear()
    c = smoke_config(root, data_dir, **{'data.pipeline': 'device', 'data.device_max_gb': 1e-5})
    mesh = parallel.make_mesh(c.mesh, DEV)
    with pytest.raises(ConfigError, match=r"data.pipeline: split 'train' \(32 images of 32x32x3 uint8\) needs "
                                          r'0.00 GB on each device, more than the 0.00 GB allowed '
                                          r'\(data.device_max_gb=1e-05\)'):
        device_data.make_train_iterator(c.data, global_batch_size=8, seed=0, mesh=mesh)
    assert not device_data._RESIDENT
    assert device_data.split_bytes(50000, (32, 32, 3)) == 50000 * (32 * 32 * 3 + 4)  # CIFAR-10: 0.15 GB
    with pytest.raises(ConfigError, match="data.pipeline: 'cuda'; valid"):
        config_lib.validate(smoke_config(root, data_dir, **{'data.pipeline': 'cuda'}), num_devices=1)


@pytest.mark.slow
def test_pretrain_on_the_device_path_resumes_exactly(folder, tmp_path, monkeypatch):
    """FAMT (its weight store on the device, its pass over the resident split) and the kNN
    monitor, killed after step 6: resumed from the step-4 checkpoint, whose device weight table
    (updated before step 3) the steps 5 and 6 read, then across the update before step 7."""
    from colormae_jax.masking import famt

    def no_host_lookup(*a):
        raise AssertionError('the host weight store was looked up')

    monkeypatch.setattr(famt.WeightStore, 'lookup', no_host_lookup)  # the step gathers on the device
    root, data_dir = folder
    c = smoke_config(root, data_dir, **{
        'data.pipeline': 'device', 'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.40,
        'mask.famt.warmup_steps': 2, 'mask.famt.update_every_steps': 4, 'mask.famt.update_batch_size': 8,
        'image_summary_every_epochs': 0.0, 'knn.every_epochs': 3.0, 'knn.max_train': 0, 'knn.max_test': 0})
    full = main.run(c, str(tmp_path / 'a'), devices=DEV)
    assert full['step'] == 12 and np.isfinite(full['losses']).all()
    first = main.run(c, str(tmp_path / 'b'), devices=DEV, stop_after=6)
    assert first['losses'] == full['losses'][:6]
    second = main.run(c, str(tmp_path / 'b'), devices=DEV)
    assert second['losses'] == full['losses'][4:]  # bitwise: the restored table, then the update before step 7
    jax.tree.map(np.testing.assert_array_equal, second['state']['params'], full['state']['params'])


def test_study_full_preset_is_sized_to_the_window():
    import importlib
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'benchmarks'))
    study = importlib.import_module('cifar10_study')
    # (900 s - 120 s start - 2 runs x 45 s) x 20000 img/s / (2 runs x 50000 images) = 138 epochs per run
    p = study.plan('full', 2, 20000.0, 900.0)
    assert (p['epochs'], p['images'], round(p['pretrain_s']), round(p['total_s'])) == (138, 6_900_000, 345, 900)
    assert study.plan('full', 7, 20000.0, 900.0)['epochs'] == 26
    s = study._full_schedule(26)  # the 200-epoch recipe's proportions: FAMT updates before epoch 5.33, every 5.2
    assert (s['mask.famt.warmup_epochs'], s['mask.famt.update_every_epochs']) == (41 * 0.13, 40 * 0.13)

"""FAMT: weighted sampling, counts, alignment with crops and flips, weight maps, throwing
saves compute, the weight store, resume across an update, and bad input."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from colormae_jax import config_lib, loop, main, masking, parallel
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.data import pipeline as data
from colormae_jax.masking import famt
from colormae_jax.models import mae as model
from colormae_jax.tasks import pretrain

from helpers import make_folder, override, smoke_config


def _cfg(**kw):
    f = dict(warmup_epochs=40.0, update_every_epochs=40.0, freq_weight=0.5, freq_sigma=0.5, min_weight=1e-3,
             update_batch_size=0, warmup_steps=None, update_every_steps=None)
    f.update(kw)
    return ml_collections.ConfigDict(dict(strategy='famt', ratio=0.45, throw_ratio=0.40, schedule='',
                                          famt=ml_collections.ConfigDict(f)))


def test_first_pick_frequency_is_proportional_to_weight():
    n, draws = 8, 40000
    w = jnp.asarray([8., 4., 2., 1., 1., 0.5, 0.25, 0.25])
    keys = famt.gumbel_keys(jax.random.PRNGKey(0), jnp.broadcast_to(w, (draws, n)), floor=1e-6)
    freq = np.bincount(np.asarray(keys.argmax(-1)), minlength=n) / draws
    p = np.asarray(w / w.sum())
    np.testing.assert_array_less(np.abs(freq - p), 5 * np.sqrt(p * (1 - p) / draws))  # 5 sigma per cell


def test_strategy_draw_order_mask_then_throw_then_visible():
    """The first patch drawn is masked: through the strategy and the shared partition, the
    last masked index (lowest score) is distributed like the weights."""
    s = masking.create(_cfg(), grid=4)
    w = np.ones((16,), np.float32)
    w[5] = 15.0  # p(first pick = 5) = 15 / 30
    batch = {'image': jnp.zeros((20000, 1)), famt.WEIGHT_KEY: jnp.broadcast_to(jnp.asarray(w), (20000, 16))}
    p = jax.jit(lambda k: s(k, batch, ()))(jax.random.PRNGKey(1))
    c = s.counts
    assert (c.masked, c.thrown, c.visible) == (7, 6, 3)  # AMT: int(16*.45) masked, 16 - int(16*.85) visible
    first = np.asarray(p.masked[:, -1])
    assert abs((first == 5).mean() - 0.5) < 5 * np.sqrt(0.25 / 20000)
    # a heavy patch is masked far more often than visible
    assert (np.asarray(p.masked) == 5).any(1).mean() > 0.9 and (np.asarray(p.visible) == 5).any(1).mean() < 0.02


@pytest.mark.parametrize('n,ratio,throw', [(64, 0.45, 0.40), (196, 0.45, 0.40), (49, 0.3, 0.5)])
def test_counts_exact(n, ratio, throw):
    g = int(np.sqrt(n))
    s = famt.FAMTMasking('famt', g, ratio, throw)
    rng = np.random.default_rng(0)
    batch = {'image': jnp.zeros((6, 1)), famt.WEIGHT_KEY: jnp.asarray(rng.random((6, n)), jnp.float32)}
    p = s(jax.random.PRNGKey(0), batch, ())
    assert p.masked.shape[1] == int(n * ratio)  # AMT: len_mask_tail
    assert p.visible.shape[1] == n - int(n * (ratio + throw))  # AMT: L - len_keep_head
    for row in np.concatenate([p.visible, p.thrown, p.masked], 1):
        assert sorted(row.tolist()) == list(range(n))


def test_align_follows_crop_and_flip_exactly_for_linear_maps():
    g, out = 8, 4
    xs = np.arange(g, dtype=np.float32)
    wmap = jnp.asarray(np.broadcast_to(xs[None, :], (g, g)))[None]  # value = column of the cell centre
    crop = jnp.asarray([[0.25, 0.25, 0.5, 0.5]])  # the centre half of the image
    a = np.asarray(famt.align(wmap, crop, jnp.asarray([False]), out))[0]
    expect = (0.25 + (np.arange(out) + 0.5) / out * 0.5) * g - 0.5  # bilinear is exact on a linear map
    np.testing.assert_allclose(a, np.broadcast_to(expect, (out, out)), atol=1e-5)
    flipped = np.asarray(famt.align(wmap, crop, jnp.asarray([True]), out))[0]
    np.testing.assert_allclose(flipped, a[:, ::-1], atol=1e-5)
    # rows follow the vertical position of the box
    wmap_t = jnp.swapaxes(wmap, 1, 2)
    low = np.asarray(famt.align(wmap_t, jnp.asarray([[0.5, 0.0, 0.5, 1.0]]), jnp.asarray([False]), out))[0]
    np.testing.assert_allclose(low[:, 0], (0.5 + (np.arange(out) + 0.5) / out * 0.5) * g - 0.5, atol=1e-5)


def test_align_matches_the_pipeline_crops(tmp_path):
    """The map of the whole image, aligned with the pipeline's crop box and flip, matches the
    same statistic computed on the training crop itself (AMT's code slices the top-left corner)."""
    size, g = 32, 8
    yy, xx = np.mgrid[0:96, 0:128]
    img = (255 * np.exp(-(((yy - 30) / 25.0) ** 2 + ((xx - 85) / 30.0) ** 2))).astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, -1)
    path = tmp_path / 'x.png'
    Image.fromarray(rgb).save(path)
    enc = path.read_bytes()

    def patch_means(a):
        return a[..., 0].astype(np.float32).reshape(g, size // g, g, size // g).mean((1, 3))

    whole = data.ResizeWhole(size).map({'image': enc, 'label': 0, 'index': 0})['image']
    wmap = jnp.asarray(patch_means(whole))[None]
    t = data.RandomResizedCropFlip(size)
    rng = np.random.default_rng(0)
    errs, naive = [], []
    for _ in range(40):
        ex = t.random_map({'image': enc, 'label': 0, 'index': 0}, rng)
        truth = patch_means(ex['image'])
        a = np.asarray(famt.align(wmap, jnp.asarray(ex['crop'])[None], jnp.asarray(ex['flip'])[None], g))[0]
        errs.append(np.abs(a - truth).mean())
        naive.append(np.abs(np.asarray(wmap[0]) - truth).mean())  # no alignment at all
    assert np.mean(errs) < 6.0 and np.mean(errs) < 0.3 * np.mean(naive)


def test_weight_maps_attention_and_frequency_settings():
    attn = jnp.asarray([[[0.1, 0.2, 0.7, 0.0], [2.0, 4.0, 3.0, 2.0]]])  # [B=1, heads=2, N=4]
    np.testing.assert_allclose(famt.attention_map(attn)[0], [(1 / 7 + 0) / 2, (2 / 7 + 1) / 2, (1 + .5) / 2, 0],
                               rtol=1e-5)
    img = np.zeros((1, 16, 16, 3), np.float32)
    img[0, 8:12, 4:8] = 5.0  # a bright block in patch (2, 1) of a 4x4 grid
    f = np.asarray(famt.frequency_map(jnp.asarray(img), patch=4, sigma=1.0))[0]
    assert f.argmax() == 2 * 4 + 1 and f.max() == 1.0 and f.min() == 0.0
    a, fr = jnp.asarray([[0.0, 1.0]]), jnp.asarray([[1.0, 0.0]])
    np.testing.assert_allclose(famt.fuse(a, fr, 0.0), a)
    np.testing.assert_allclose(famt.fuse(a, fr, 1.0), fr)
    np.testing.assert_allclose(famt.fuse(a, fr, 0.3), [[0.3, 0.7]], rtol=1e-6)


def test_weight_maps_fuse_attention_and_frequency_at_an_intermediate_weight():
    c = model.MAEConfig(image_size=16, patch=4, width=32, depth=2, mlp_dim=64, heads=2, dec_width=16, dec_depth=1,
                        dec_heads=2)
    from flax import nnx
    enc = model.MAE(c, rngs=nnx.Rngs(0)).encoder
    x = jax.random.normal(jax.random.PRNGKey(1), (3, 16, 16, 3))
    attn = famt.attention_map(enc.cls_attention(x))
    freq = famt.frequency_map(x, 4, 0.5 * 4)
    assert float(jnp.abs(attn - freq).max()) > 0.1  # the two maps differ, so the weight matters
    for w in (0.0, 0.25, 0.5, 1.0):
        got = famt.weight_maps(enc, x, patch=4, freq_weight=w, freq_sigma=0.5)
        np.testing.assert_allclose(got, (1 - w) * attn + w * freq, rtol=1e-5, atol=1e-6)


def test_masks_follow_each_examples_own_map():
    """After an update, example i's weights come back for example i (through the store's rows,
    on each process's share): a heavy patch at a position that depends on the index is drawn
    first (masked) for its own example. An index shift in the store fails this."""
    g, n_ex, procs = 4, 37, 3
    s = famt.FAMTMasking('famt', g, 0.45, 0.40)
    for p in range(procs):
        store = famt.WeightStore(n_ex, g, process_index=p, process_count=procs, pad_to=2)
        mine = np.arange(p, n_ex, procs)
        maps = np.full((len(mine), g * g), 1e-3, np.float32)
        maps[np.arange(len(mine)), (mine * 7) % (g * g)] = 1.0  # the heavy patch of example i: 7 i mod 16
        store.write(mine, maps)
        batch_idx = np.random.default_rng(p).permutation(mine)
        batch = {'image': jnp.zeros((len(batch_idx), 1)),
                 famt.WEIGHT_KEY: jnp.asarray(store.lookup(batch_idx))}  # what FAMTState.batch_fields adds
        part = s(jax.random.PRNGKey(p), batch, ())
        first = np.asarray(part.masked)[:, -1]  # the first patch drawn (lowest score)
        assert ((first == (batch_idx * 7) % (g * g)).mean()) > 0.9


def _step_flops(config):
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    t = pretrain.make_trainer(config, mesh, steps_per_epoch=10)
    s = masking.create(config.mask, t.mae.grid)
    step = pretrain.compile_step(t, s, ())
    batch = {'image': jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.uint8), 'index': jax.ShapeDtypeStruct((8,), jnp.int32)}
    return step.lower(t.abstract_state, batch, ()).compile().cost_analysis()['flops']


@pytest.mark.slow
def test_throwing_cuts_the_step_flops(tmp_path):
    c = smoke_config(tmp_path, tmp_path, **{'model.variant': 'Ti/4', 'model.decoder.depth': 2, 'batch_size': 8})
    keep = _step_flops(override(c, **{'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.0}))
    throw = _step_flops(override(c, **{'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.40}))
    # 8x8 grid: the encoder sees 35 -> 9 patches (+cls), the decoder 64 -> 38 tokens (+cls)
    assert throw < 0.55 * keep


def test_weight_store_rows_per_process():
    st = famt.WeightStore(num_examples=11, grid=2, process_index=1, process_count=2, pad_to=4)
    assert st.table.shape == (8, 4)  # ceil(11 / 2) = 6 rows, padded to 8
    st.write(np.asarray([1, 5, 9]), np.asarray([[1., 2, 3, 4]] * 3) * np.asarray([[1], [2], [3]]),
             valid=np.asarray([True, True, False]))
    np.testing.assert_array_equal(st.lookup(np.asarray([5, 1, 9])), [[2, 4, 6, 8], [1, 2, 3, 4], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match='another process'):
        st.lookup(np.asarray([4]))


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('data')
    return make_folder(base / 'imgs', per_class=16), str(base / 'tfds')


def _famt_config(root, data_dir, **over):
    return smoke_config(root, data_dir, **{'mask.strategy': 'famt', 'mask.ratio': 0.45, 'mask.throw_ratio': 0.40,
                                           'mask.famt.warmup_steps': 4, 'mask.famt.update_every_steps': 4,
                                           'mask.famt.update_batch_size': 8, 'image_summary_every_epochs': 0.0,
                                           **over})


@pytest.mark.slow
def test_resume_across_weight_updates_is_bitwise(folder, tmp_path):
    root, data_dir = folder
    c = _famt_config(root, data_dir)
    full = main.run(c, str(tmp_path / 'a'), devices=jax.devices()[:1])
    assert full['step'] == 12 and np.isfinite(full['losses']).all()
    first = main.run(c, str(tmp_path / 'b'), devices=jax.devices()[:1], stop_after=6)
    assert first['losses'] == full['losses'][:6]
    second = main.run(c, str(tmp_path / 'b'), devices=jax.devices()[:1])
    assert second['losses'] == full['losses'][4:]  # the step-4 checkpoint holds the store of the update at 4
    jax.tree.map(np.testing.assert_array_equal, second['state']['params'], full['state']['params'])


@pytest.mark.slow
def test_store_that_does_not_match_the_dataset_is_refused(folder, tmp_path):
    root, data_dir = folder
    c = _famt_config(root, data_dir)
    main.run(c, str(tmp_path / 'w'), devices=jax.devices()[:1], stop_after=4)
    other = make_folder(tmp_path / 'more', per_class=20)
    c2 = _famt_config(other, data_dir)
    with pytest.raises(checkpoint.CheckpointMismatch, match='famt/table: checkpoint has \\(32, 64\\), config needs '
                                                            '\\(40, 64\\) \\(this run\'s \'famt\' item: another '
                                                            'dataset size'):
        main.run(c2, str(tmp_path / 'w'), devices=jax.devices()[:1])


def test_bad_famt_configs(folder, tmp_path):
    root, data_dir = folder

    def err(**over):
        with pytest.raises(config_lib.ConfigError) as e:
            c = _famt_config(root, data_dir, **over)
            config_lib.validate(c, num_devices=1)
            main.run(c, str(tmp_path / 'x'), devices=jax.devices()[:1])
        return str(e.value)

    assert 'config.mask.ratio' in err(**{'mask.throw_ratio': 0.55})  # 0.45 + 0.55 >= 1: nothing visible
    assert 'and 0 masked' in err(**{'mask.ratio': 0.01, 'mask.throw_ratio': 0.4})  # 8x8: int(0.64) = 0 masked
    assert 'config.mask.famt.update_every_steps: must be >= 1' in err(**{'mask.famt.update_every_steps': 0})
    assert 'config.mask.famt.warmup_steps: must be >= 0' in err(**{'mask.famt.warmup_steps': -1})
    assert 'after training ends' in err(**{'mask.famt.warmup_steps': 12})
    assert 'config.mask.famt.freq_weight: must be in [0, 1]' in err(**{'mask.famt.freq_weight': 1.5})


def test_weight_passes_run_only_where_a_famt_phase_uses_them(folder):
    root, data_dir = folder

    def updates(schedule, total=40):
        c = _famt_config(root, data_dir, **{'mask.schedule': schedule, 'total_steps': total})
        t = pretrain.make_trainer(c, parallel.make_mesh(c.mesh, jax.devices()[:1]), steps_per_epoch=4)
        return sorted(pretrain.MaskPhases(t).states['famt'].update_steps)

    assert updates('famt') == [4, 8, 12, 16, 20, 24, 28, 32, 36]
    assert updates('famt,green@4') == [4, 8, 12]  # FAMT runs steps 0-15: the update at 12 serves 12-15
    assert updates('famt,green@3.5') == [4, 8, 12]  # ... steps 0-13
    assert updates('random,famt@5') == [20, 24, 28, 32, 36]  # FAMT from step 20: the updates before are unused
    assert updates('random,famt@5.5') == [20, 24, 28, 32, 36]  # from step 22: the update at 20 serves it
    assert updates('green,famt@2,green@6') == [8, 12, 16, 20]  # FAMT runs steps 8-23


def test_interval_longer_than_training_still_updates_once(folder):
    root, data_dir = folder
    c = _famt_config(root, data_dir, **{'mask.famt.update_every_steps': 100})
    t = pretrain.make_trainer(c, parallel.make_mesh(c.mesh, jax.devices()[:1]), steps_per_epoch=4)
    assert sorted(pretrain.MaskPhases(t).states['famt'].update_steps) == [4]


@pytest.mark.slow
def test_reconstruction_picture_leaves_thrown_patches_blank(folder):
    root, data_dir = folder
    c = _famt_config(root, data_dir)
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:1])
    t = pretrain.make_trainer(c, mesh, steps_per_epoch=4)
    strategy = masking.create(c.mask, t.mae.grid)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
             famt.WEIGHT_KEY: rng.random((2, 64)).astype(np.float32)}
    step = jnp.asarray(3)
    pics = np.asarray(pretrain.reconstruct(pretrain.init_state(t)['params'], batch, (), step, t=t, strategy=strategy))
    inp, hidden, recon = (model.patchify(jnp.asarray(p, jnp.float32), 4) for p in np.split(pics, 3, axis=2))
    part = strategy(jax.random.fold_in(loop.step_rng(c.seed, step), 0), batch, ())
    for i in range(2):
        vis, thr, msk = (np.asarray(a[i]) for a in (part.visible, part.thrown, part.masked))
        np.testing.assert_array_equal(recon[i, vis], inp[i, vis])  # visible: pasted
        np.testing.assert_array_equal(recon[i, thr], hidden[i, thr])  # thrown: blank, as in the visible panel
        assert np.abs(recon[i, thr] - inp[i, thr]).max() > 50
        assert not np.array_equal(recon[i, msk], hidden[i, msk])  # masked: predicted


def test_famt_config_runs_amts_phases_and_logs_them(folder, tmp_path, caplog):
    """``mask=famt``: random masking at 0.75 (nothing thrown) until the first weight update, then
    FAMT 0.45 / 0.40 (AMT's counts on 8x8: 28 masked, 26 thrown, 10 visible)."""
    import logging

    import cifar10
    root, data_dir = folder
    c = cifar10.get_config('mask=famt,smoke')
    assert c.mask.schedule == 'random:0.75,famt:0.45/0.40@10steps' and c.mask.famt.warmup_steps == 10
    c = override(c, **{'data.root': root, 'data.data_dir': data_dir, 'batch_size': 8, 'total_steps': 12,
                       'knn.every_epochs': 0.0, 'image_summary_every_epochs': 0.0, 'mask.famt.update_batch_size': 8,
                       'ckpt.every_steps': 100})
    with caplog.at_level(logging.INFO):
        out = main.run(c, str(tmp_path / 'w'), devices=jax.devices()[:1])
    assert out['step'] == 12 and np.isfinite(out['losses']).all()
    text = caplog.text
    assert "Masking with 'random' (mask 0.75, throw 0: 16 visible, 48 masked, 0 thrown of 64) from step 1" in text
    assert "Masking with 'famt' (mask 0.45, throw 0.4: 10 visible, 28 masked, 26 thrown of 64) from step 11" in text
    assert 'FAMT weights of 32 examples updated before step 11' in text
    assert 'uniform weights' not in text  # FAMT never masks before its first update here


class _Writer:
    def write_scalars(self, step, scalars):
        pass


@pytest.mark.slow  # 13 s on the 2-core VM: two weight passes compiled
def test_device_store_holds_the_host_stores_weights_and_the_step_gathers_them(folder):
    """data.pipeline='device': the update pass writes the same maps as the host store's (to float
    tolerance: other batches through the encoder), on the device; nothing is looked up on the
    host per step (no batch field): the step gets the table as its aux and gathers the batch's
    rows, drawing the masks the host path draws from the same weights."""
    root, data_dir = folder
    mesh = parallel.make_mesh(_famt_config(root, data_dir).mesh, jax.devices()[:1])
    phases = {}
    for pipe in ('grain', 'device'):
        t = pretrain.make_trainer(_famt_config(root, data_dir, **{'data.pipeline': pipe}), mesh, steps_per_epoch=4)
        phases[pipe] = pretrain.MaskPhases(t)
        phases[pipe].states['famt'].refresh(4, model.init_mae_params(t.mae, 0), _Writer())
    host, dev = phases['grain'].states['famt'], phases['device'].states['famt']
    table = dev.store.table
    assert isinstance(table, jax.Array) and table.shape == (32, 64) and table.sharding == parallel.replicated(mesh)
    assert int(dev.store.updated_at) == int(host.store.updated_at) == 4
    assert np.asarray(table).std() > 0.05  # not the uniform table
    np.testing.assert_allclose(np.asarray(table), host.store.table[:32], rtol=1e-5, atol=1e-5)

    idx = np.random.default_rng(0).permutation(32)[:8].astype(np.int32)
    batch = {'image': np.zeros((8, 32, 32, 3), np.uint8), 'index': idx,
             'crop': np.tile(np.asarray([[0.1, 0.2, 0.7, 0.6]], np.float32), (8, 1)), 'flip': np.arange(8) % 2 == 0}
    assert dev.batch_fields(batch) == {} and famt.WEIGHT_KEY in host.batch_fields(batch)
    strategy, aux, _, _ = phases['device'].get(0)
    assert aux['table'] is table  # the step's aux: the device table
    key = jax.random.PRNGKey(5)
    on_device = jax.jit(strategy)(key, batch, aux)
    on_host = strategy(key, dict(batch, **{famt.WEIGHT_KEY: np.asarray(table)[idx]}), ())
    for a, b in zip(on_device, on_host):
        np.testing.assert_array_equal(a, b)

    dev.refresh(8, model.init_mae_params(t.mae, 1), _Writer())  # the next pass: a new table ...
    assert phases['device'].get(0)[1]['table'] is dev.store.table is not table
    assert np.asarray(table).shape == (32, 64)  # ... the one a step or a checkpoint may hold is not donated

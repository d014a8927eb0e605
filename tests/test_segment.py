"""Segmentation transfer (task=segment): ops against torch, metrics against numpy, the data
pipeline's mmseg details, bad input, and the task end to end on a synthetic folder (mIoU far
above chance, exact resume)."""
import functools
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from colormae_jax import cli, main
from colormae_jax.data import segmentation as seg_data
from colormae_jax.errors import DataError
from colormae_jax.interop import weights
from colormae_jax.models import mae as model_lib, upernet as seg
from colormae_jax.tasks import segment
from colormae_jax.tools.seg_folder import make_seg_folder

from helpers import override

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import ade20k_seg  # noqa: E402

DEV = jax.devices()[:1]
K = 4  # background + square, disk, cross


def tiny_encoder(path):
    c = model_lib.MAEConfig(image_size=32, patch=4, width=32, depth=4, mlp_dim=64, heads=2, dec_width=32,
                            dec_depth=1, dec_heads=2)
    return weights.save_params(str(path), model_lib.init_mae_params(c, 0), c)


def smoke(root, data_dir, init_from, **over):
    c = ade20k_seg.get_config('smoke')
    c.data.root, c.data.data_dir, c.init_from = str(root), str(data_dir), str(init_from)
    c.seg.out_indices = (0, 1, 2, 3)
    c.ckpt.async_save = False
    return override(c, **over)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    base = tmp_path_factory.mktemp('seg')
    return make_seg_folder(base / 'data'), str(base / 'tfds'), tiny_encoder(base / 'enc')


# ------------------------------------------------------------------------------ ops and metrics

def test_ops_equal_torch():
    torch = pytest.importorskip('torch')
    F = torch.nn.functional
    x = np.random.default_rng(0).normal(size=(1, 5, 7, 3)).astype(np.float32)
    for hw in [(16, 20), (3, 4), (1, 1)]:
        want = F.interpolate(torch.tensor(x).permute(0, 3, 1, 2), size=hw, mode='bilinear',
                             align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(seg.resize_bilinear(x, hw)), want, atol=2e-6)
        np.testing.assert_allclose(seg.resize_logits(x[0], hw), want[0], atol=2e-6)
    z = np.random.default_rng(1).normal(size=(1, 3, 16, 16)).astype(np.float32)
    for s in (1, 2, 3, 6):  # PPM's scales on the 16x16 top level: bins overlap for 3 and 6
        want = F.adaptive_avg_pool2d(torch.tensor(z), s).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(np.asarray(seg.adaptive_avg_pool(z.transpose(0, 2, 3, 1), s)), want, atol=1e-6)


def test_batchnorm_running_stats_equal_torch():
    """The running variance moves with the unbiased batch variance (x n/(n-1)), as torch's BatchNorm2d
    and SyncBN: checked where n is small (a PPM 1x1 pool: n = batch), jitted, the batch sharded over 4
    devices (SyncBN: n is the global batch); the outputs in train and eval mode equal torch's too."""
    torch = pytest.importorskip('torch')
    C = 3
    s = seg.SegConfig()
    for shape in [(4, 1, 1, C), (4, 2, 3, C)]:  # n = 4 (biased and unbiased differ by 33%), n = 24
        ours = seg.BN(C, s, nnx.Rngs(0))
        ref = torch.nn.BatchNorm2d(C, momentum=1 - s.bn_momentum, eps=s.bn_eps)
        graphdef, params, stats = nnx.split(ours, nnx.Param, nnx.BatchStat)
        mesh = jax.make_mesh((4,), ('data',), devices=jax.devices()[:4])
        sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

        @functools.partial(jax.jit, static_argnums=2)
        def step(stats, x, train):
            m = nnx.merge(graphdef, params, stats)
            return m(x, use_running_average=not train), nnx.state(m, nnx.BatchStat)

        rng = np.random.default_rng(len(shape))
        for i in range(3):
            x = (rng.normal(size=shape) * (1 + i) + i).astype(np.float32)
            y, stats = step(stats, jax.device_put(x, sharding), True)
            want = ref.train()(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
            np.testing.assert_allclose(np.asarray(y), want, atol=1e-5)
        np.testing.assert_allclose(np.asarray(stats['mean'][...]), ref.running_mean.numpy(), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(stats['var'][...]), ref.running_var.numpy(), rtol=1e-6)
        y, _ = step(stats, x, False)
        want = ref.eval()(torch.tensor(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)


def test_metrics_equal_numpy_with_ignore():
    rng = np.random.default_rng(0)
    k = 5
    areas = np.zeros((4, k))
    preds, labels = [], []
    for _ in range(3):
        p = rng.integers(0, k - 1, (20, 30))  # class 4 never predicted; class 3 never labelled below
        t = rng.integers(0, k, (20, 30))
        t[t == 3] = 2
        t[rng.random(t.shape) < 0.2] = 255
        preds.append(p), labels.append(t)
        areas += seg.intersect_and_union(p, t, k)
    p, t = np.concatenate([x.ravel() for x in preds]), np.concatenate([x.ravel() for x in labels])
    keep = t != 255
    p, t = p[keep], t[keep]
    iou, acc = [], []
    for c in range(k):
        inter, union = np.sum((p == c) & (t == c)), np.sum((p == c) | (t == c))
        if union:
            iou.append(inter / union)
        if np.sum(t == c):
            acc.append(inter / np.sum(t == c))
    m = seg.seg_metrics(areas)
    assert m['aAcc'] == pytest.approx(100 * np.mean(p == t))
    assert m['mIoU'] == pytest.approx(100 * np.mean(iou))  # class 3: IoU 0 (predicted, never labelled), counted
    assert m['mAcc'] == pytest.approx(100 * np.mean(acc))  # ... but no accuracy (nanmean), as mmseg
    assert len(iou) == k and len(acc) == k - 1


def test_slide_inference():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(40, 57, 3)).astype(np.float32)
    w = rng.normal(size=(3, 6)).astype(np.float32)
    pixelwise = lambda x: x @ w  # noqa: E731 - no context: any tiling must give the whole-image logits
    whole = img @ w
    out = seg.slide_logits(pixelwise, img, crop=16, stride=11, num_classes=6, batch=3)
    np.testing.assert_allclose(out, whole, rtol=1e-6, atol=1e-6)
    assert seg.slide_windows(512, 683, 512, 341) == [(0, 512, 0, 512), (0, 512, 171, 683)]
    assert len(seg.slide_windows(1000, 512, 512, 341)) == 3



def test_lr_schedule_is_mmengines():
    base, w, t, s = 1e-4, 15, 100, 1e-6
    lrs, lr = [], base * s  # mmengine: LinearLR(start_factor=s, end=w), PolyLR(eta_min=0, power=1, begin=w, end=t)
    for g in range(t):
        lrs.append(lr)
        g += 1
        if g < w:
            lr = lr * (1 + (1 - s) / ((w - 1) * s + (g - 1) * (1 - s)))
        elif w < g < t:
            lr = lr * (1 - 1 / ((t - w - 1) - (g - w) + 1))
    sched = seg.lr_schedule(base, t, w, start_factor=s)
    np.testing.assert_allclose([float(sched(k)) for k in range(t)], lrs, rtol=1e-5, atol=1e-12)
    assert float(sched(0)) == pytest.approx(1e-10) and float(sched(t - 1)) == 0.0


def test_param_groups_are_mmsegs():
    from colormae_jax import optim
    z = np.zeros
    p = {'encoder': {'pos_embed': z((1, 5, 4)), 'cls_token': z((1, 1, 4)), 'patch_embed': {'kernel': z((48, 4))},
                     'blocks': {0: {'gamma_1': z(4), 'rel_pos_bias': z((12, 2)), 'attn': {'qkv': {'bias': z(12)}}}}},
         'decode_head': {'conv_seg': {'kernel': z((1, 1, 4, 3)), 'bias': z(3)}, 'bn': {'scale': z(4)}}}
    m = seg.decay_mask(p)  # mmseg decays every parameter of 2+ dimensions, the tokens included
    assert m['encoder']['pos_embed'] and m['encoder']['cls_token'] and m['encoder']['blocks'][0]['rel_pos_bias']
    assert not (m['encoder']['blocks'][0]['gamma_1'] or m['decode_head']['conv_seg']['bias']
                or m['decode_head']['bn']['scale'])
    assert not seg.decay_mask(p, decay_tokens=False)['encoder']['pos_embed']
    sc = optim.lr_scales(p, 12, 0.65)  # mmseg: 0.65 ** (14 - layer_id - 1), id 0 embed, i + 1 block i, 13 heads
    assert sc['encoder']['pos_embed'] == pytest.approx(0.65 ** 13)
    assert sc['encoder']['blocks'][0]['rel_pos_bias'] == pytest.approx(0.65 ** 12)
    assert sc['decode_head']['conv_seg']['kernel'] == 1.0


# ------------------------------------------------------------------------------ data

def test_reduce_zero_label_and_crop_retry():
    lab = np.array([[0, 1, 2, 150, 255]], np.uint8)
    np.testing.assert_array_equal(seg_data.reduce_zero_label(lab), [[255, 0, 1, 149, 255]])
    # a 100x100 map: class 1 everywhere except a 10x10 corner of class 2 -> most 20x20 crops hold one class
    lab = np.ones((100, 100), np.uint8)
    lab[:10, :10] = 2

    class Draws:  # a generator that records the boxes it gives
        def __init__(self):
            self.rng, self.n = np.random.default_rng(0), 0

        def integers(self, lo, hi):
            self.n += 1
            return self.rng.integers(lo, hi)
    d = Draws()
    y1, y2, x1, x2 = seg_data.crop_box(lab, 20, d, cat_max_ratio=0.75)
    crop = lab[y1:y2, x1:x2]
    _, cnt = np.unique(crop, return_counts=True)
    ok = len(cnt) > 1 and cnt.max() / cnt.sum() < 0.75
    assert ok or d.n == 22  # accepted, or gave up after the first draw and 10 retries (2 numbers each)
    d2 = Draws()
    seg_data.crop_box(np.ones((100, 100), np.uint8), 20, d2, cat_max_ratio=0.75)
    assert d2.n == 22  # one class only: every retry is used
    d3 = Draws()
    seg_data.crop_box(np.ones((100, 100), np.uint8), 20, d3, cat_max_ratio=1.0)
    assert d3.n == 2  # no retry without cat_max_ratio
    ign = np.full((100, 100), 255, np.uint8)
    ign[:50] = 1
    ign[50:, :3] = 2  # ignored pixels do not count: class 1 fills the labelled part of most crops
    assert seg_data.crop_box(ign, 100, np.random.default_rng(0)) == (0, 100, 0, 100)


def test_resize_and_hsv_match_opencv_rules():
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    assert seg_data.rescale_size(683, 512, (2048, 512)) == (683, 512)
    assert seg_data.rescale_size(600, 300, (1024, 256)) == (512, 256)
    up = seg_data.resize_bilinear_u8(img, 18, 14)
    assert up.shape == (14, 18, 3) and abs(int(up[0, 0, 0]) - int(img[0, 0, 0])) <= 1
    np.testing.assert_array_equal(seg_data.resize_nearest(img[..., 0], 18, 14)[::2, ::2], img[..., 0])
    back = seg_data.hsv_to_rgb_u8(seg_data.rgb_to_hsv_u8(img))
    assert np.abs(back.astype(int) - img).max() <= 4  # 8-bit HSV (H in [0, 180)) loses a little


def test_bad_input(tmp_path):
    root = make_seg_folder(tmp_path / 'a', n_train=2, n_val=1)
    lab = os.path.join(root, 'annotations', 'train', '001.png')
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(lab)
    with pytest.raises(DataError, match=f'{lab}: label map is 10x10 but its image .* is 48x40'):
        seg_data.check_pair(os.path.join(root, 'images', 'train', '001.jpg'), lab, K, False)
    Image.fromarray(np.full((40, 48), 7, np.uint8)).save(lab)
    with pytest.raises(DataError, match=f'{lab}: label value 7 is above the 4 classes'):
        seg_data.check_pair(os.path.join(root, 'images', 'train', '001.jpg'), lab, K, False)
    seg_data.check_pair(os.path.join(root, 'images', 'train', '001.jpg'), lab, 7, True)  # 0..7 with reduce_zero
    Image.fromarray(np.full((40, 48), 255, np.uint8)).save(lab)
    seg_data.check_pair(os.path.join(root, 'images', 'train', '001.jpg'), lab, K, False)  # 255 = ignore
    os.rename(os.path.join(root, 'annotations'), os.path.join(root, 'gone'))
    with pytest.raises(DataError, match='annotations: missing annotations folder'):
        seg_data.list_pairs(root, 'train')
    # through main: one line, exit code 2
    Image.fromarray(np.full((40, 48), 9, np.uint8)).save(os.path.join(root, 'gone', 'train', '000.png'))
    os.rename(os.path.join(root, 'gone'), os.path.join(root, 'annotations'))
    c = smoke(root, tmp_path / 'tfds', tiny_encoder(tmp_path / 'enc'))
    with pytest.raises(DataError) as e:
        main.run(c, str(tmp_path / 'w'), devices=DEV)
    line = cli.error_line(e.value)
    assert line.startswith(f'error: {os.path.join(root, "annotations", "train", "000.png")}: label value 9')
    assert '\n' not in line


# ------------------------------------------------------------------------------ the task

@pytest.mark.slow
def test_segment_learns_the_shapes_and_resumes_exactly(folder, tmp_path):
    root, data_dir, enc = folder
    steps = 120
    c = smoke(root, data_dir, enc, total_steps=steps, warmup_steps=10, eval_every_steps=steps, base_lr=2e-3,
              **{'ckpt.every_steps': steps - 4})
    w = tmp_path / 'w'
    full = main.run(c, str(w), devices=DEV)
    miou = full['results']['seg/mIoU']
    print(f'synthetic mIoU after {steps} steps: {miou:.2f} (aAcc {full["results"]["seg/aAcc"]:.2f}, mAcc '
          f'{full["results"]["seg/mAcc"]:.2f})')
    # chance: a uniformly random map scores about 100 / K x the class's share, far below 50
    assert miou > 50, full['results']
    lines = [json.loads(x) for x in open(w / 'seg_eval.jsonl')]
    assert lines[-1]['step'] == steps and lines[-1]['mIoU'] == pytest.approx(miou)
    assert json.load(open(w / 'results.json'))['seg/mIoU'] == pytest.approx(miou)

    # resume: drop the last checkpoint, relaunch: it resumes from step - 4 and ends where the full run did
    shutil.rmtree(w / 'checkpoints' / str(steps))
    again = main.run(c, str(w), devices=DEV)
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), full['state'], again['state'])
    assert all(jax.tree.leaves(same))
    assert again['results'] == full['results'] and len(again['losses']) == 4

    # one window that covers the image = the whole-image forward, with the trained model
    mc = weights.load_pretrained(enc)[1]
    cs = segment.dataclasses.replace(mc, image_size=c.seg.crop_size)
    g = seg.split_model(nnx.eval_shape(lambda: seg.SegModel(cs, segment._seg_config(c, K), rngs=nnx.Rngs(0))))[0]
    fwd = jax.jit(lambda x: seg.resize_bilinear(seg.apply(g, full['state']['params'], full['state']['stats'], x,
                                                          train=False)[0][0], x.shape[1:3]))
    x = np.random.default_rng(0).normal(size=(32, 32, 3)).astype(np.float32)
    whole = np.asarray(fwd(x[None]))[0]
    np.testing.assert_array_equal(seg.slide_logits(lambda b: np.asarray(fwd(b)), x, crop=32, stride=21,
                                                   num_classes=K), whole)

    # the visualisation tool's predictions are the evaluation's: over the whole split they score the run's mIoU
    from colormae_jax.api import segmentation as seg_api
    sm = seg_api.load(str(w))
    _, _, maps = seg_api.panels(sm, seg_api.examples(sm, num=100))
    areas = sum(seg.intersect_and_union(m['pred'], m['label'], K) for m in maps)
    assert len(maps) == 6 and seg.seg_metrics(areas)['mIoU'] == pytest.approx(miou)


# ------------------------------------------------------------------------------ the visualisation tool

def test_visualize_draws_the_label_maps_of_a_segment_run(folder, tmp_path, capsys):
    """tools.visualize on a task=segment workdir (a checkpoint of the smoke model, untrained): the
    grid's geometry, the image and the true map panels against the files through the palette, the
    predicted panel against the predictions, own images, one-line errors."""
    import jax.numpy as jnp

    from colormae_jax import viz
    from colormae_jax.api import segmentation as seg_api
    from colormae_jax.checkpoints import checkpointer as checkpoint
    from colormae_jax.tools import visualize
    root, data_dir, enc = folder
    c = smoke(root, data_dir, enc)
    cs = segment.dataclasses.replace(weights.load_pretrained(enc)[1], image_size=c.seg.crop_size)
    _, params, stats = seg.split_model(nnx.eval_shape(lambda: seg.SegModel(cs, segment._seg_config(c, K),
                                                                            rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)  # random weights (initialising for real compiles for 20 s)
    params = jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype), params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full(x.shape, 'var' in jax.tree_util.keystr(p), x.dtype), stats)  # mean 0, var 1
    wd = tmp_path / 'w'
    ck = checkpoint.Checkpointer(str(wd / 'checkpoints'), async_save=False)
    ck.save(3, {'step': jnp.asarray(3, jnp.int32), 'params': params, 'stats': stats, 'opt_state': {}}, None, c,
            force=True)
    ck.close()

    out = str(tmp_path / 'seg.png')
    assert visualize.main([str(wd), '--split', 'val', '--num', '2', '--out', out]) == 0
    assert 'segmentation run' in capsys.readouterr().out
    picture = np.asarray(Image.open(out).convert('RGB'))
    h, w = seg_data.rescale_size(48, 40, tuple(c.seg.scale))[::-1]  # the evaluation's resize: 32x38
    s = viz.auto_scale(max(h, w))
    lay = viz.layout(2, 3, h * s, w * s, footer=True)
    assert picture.shape == (*lay.size, 3)
    pal = seg.palette(K)
    sm = seg_api.load(str(wd / 'checkpoints' / '3'))
    _, _, maps = seg_api.panels(sm, seg_api.examples(sm, split='val', num=2))
    for r in range(2):
        tile = [picture[y:y + lay.tile_h:s, x:x + lay.tile_w:s] for y, x in (lay.origin(r, i) for i in range(3))]
        name = maps[r]['name']  # the split's order (the prepared source's), as the TensorBoard pictures
        im = np.asarray(Image.open(os.path.join(root, 'images', 'val', name)).convert('RGB'))
        im = seg_data.resize_bilinear_u8(im, w, h)
        lab = np.asarray(Image.open(os.path.join(root, 'annotations', 'val', name.replace('.jpg', '.png'))))
        lab = seg_data.resize_nearest(lab, w, h)
        np.testing.assert_array_equal(tile[0], im)
        np.testing.assert_array_equal(tile[1], (0.5 * pal[lab] + 0.5 * im).astype(np.uint8))  # true map via palette
        pred = seg_data.resize_nearest(maps[r]['pred'], w, h)
        assert maps[r]['pred'].shape == (40, 48) and pred.max() < K  # predicted at the label's (original) size
        np.testing.assert_array_equal(tile[2], (0.5 * pal[pred] + 0.5 * im).astype(np.uint8))

    # own images: the image and the predicted map
    assert visualize.main([str(wd), os.path.join(root, 'images', 'val'), '--num', '3', '--out', out]) == 0
    capsys.readouterr()
    assert np.asarray(Image.open(out)).shape[:2] == viz.layout(3, 2, h * s, w * s, footer=True).size

    # bad input: one line each, exit code 2
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not a jpeg')
    for argv, start in [([str(wd), '--step', '9'], f'error: {wd / "checkpoints"}: no step 9; it has [3]'),
                        ([str(wd), str(bad)], f'error: {bad}: not an image PIL can read'),
                        ([str(tmp_path / 'nowhere'), str(bad)], f'error: {tmp_path / "nowhere"}: no such file'),
                        ([str(wd), '--split', 'validation'],  # the README's split, the folder's are train and val
                         f'error: --split validation: not a split of {root} (the data.split and data.eval_split of '
                         f"the run's config, or of --config); its splits are train, val; give one of them")]:
        assert visualize.main([*argv, '--out', str(tmp_path / 'x.png')]) == 2
        err = capsys.readouterr().err
        assert err.startswith(start) and err.count('\n') == 1, err
    with pytest.raises(DataError, match='not a task=segment run'):
        seg_api.load(enc)
    assert not (tmp_path / 'x.png').exists()

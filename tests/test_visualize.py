"""The visualisation tool (tools/visualize.py), its pictures (viz.py) and the Python API (api/mae.py)."""
import dataclasses
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from colormae_jax import parallel, viz
from colormae_jax.api import mae as api
from colormae_jax.checkpoints import checkpointer as checkpoint
from colormae_jax.interop import weights
from colormae_jax.models import mae as M
from colormae_jax.tasks import pretrain
from colormae_jax.tools import visualize

from helpers import cifar10, make_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCALE = 4  # the default for 32x32 panels: 128 pixels


def example_code(path: str, heading: str) -> str:
    """The first ```python block under the Markdown heading ``heading`` (any level) of ``path``."""
    text = open(path).read()
    m = re.search(rf'^#+ {re.escape(heading)}\s*$(.*?)(?=^#+ |\Z)', text, re.M | re.S)
    assert m, f'{path} has no heading {heading!r}'
    code = re.search(r'^```python\n(.*?)^```', m.group(1), re.M | re.S)
    assert code, f'{path}: no python block under {heading!r}'
    return code.group(1)


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """The same params as a training workdir (step 7) and as an import folder; a folder of 3 images."""
    base = tmp_path_factory.mktemp('viz')
    config = cifar10.get_config('smoke')  # mu/4 on 32x32
    c = M.mae_config(config.model, config.data.image_size)
    params = jax.jit(lambda: M.init_mae_params(c, 5))()
    ckpt = checkpoint.Checkpointer(str(base / 'wd' / 'checkpoints'), async_save=False)
    ckpt.save(7, {'step': jnp.asarray(7, jnp.int32), 'params': params, 'opt_state': {}}, None, config, force=True)
    ckpt.close()
    weights.save_params(str(base / 'imported'), params, c)
    photos = make_folder(base / 'photos', classes=('a',), per_class=3, splits=('x',), size=(40, 50))
    return {'wd': str(base / 'wd'), 'imported': str(base / 'imported'), 'photos': os.path.join(photos, 'x', 'a'),
            'config': c, 'base': base}


def _read(path):
    return np.asarray(Image.open(path).convert('RGB'))


def _tile(picture, lay, row, col, scale=SCALE):
    y, x = lay.origin(row, col)
    return picture[y:y + lay.tile_h:scale, x:x + lay.tile_w:scale]  # nearest upscaling undone exactly


@pytest.mark.slow
def test_cli_writes_the_grid_from_a_workdir_and_an_import_folder(sources, capsys):
    out_wd, out_imp, out_step = (str(sources['base'] / f'{n}.png') for n in ('wd', 'imp', 'step'))
    common = [sources['photos'], '--strategies', 'random,famt']
    assert visualize.main([sources['wd'], *common, '--out', out_wd]) == 0
    assert 'training checkpoint' in capsys.readouterr().out
    assert visualize.main([sources['imported'], *common, '--out', out_imp]) == 0
    assert 'imported params' in capsys.readouterr().out
    assert visualize.main([os.path.join(sources['wd'], 'checkpoints', '7'), *common, '--out', out_step]) == 0
    a, b, s = _read(out_wd), _read(out_imp), _read(out_step)
    # 3 images; input + random (mask, recon) + famt (mask, recon, attention, frequency, fused, crop, aligned)
    lay = viz.layout(3, 10, 32 * SCALE, 32 * SCALE, title_lines=2, footer=True)
    assert a.shape == (*lay.size, 3) and lay.size[1] == 10 * 128 + 11 * 4
    np.testing.assert_array_equal(a, b)  # the same params read from both sources give the same picture
    np.testing.assert_array_equal(a, s)
    images, _ = api.load_images(sources['photos'], 32)
    for r in range(3):
        np.testing.assert_array_equal(_tile(a, lay, r, 0), images[r])


@pytest.mark.slow
def test_cli_reads_a_hugging_face_folder(sources, capsys):
    """A ``save_pretrained`` folder (config.json + model.safetensors), written from the import
    folder by ``tools.convert export --layout hf``, gives the import folder's picture."""
    pytest.importorskip('safetensors')
    from colormae_jax.tools import convert
    hf = str(sources['base'] / 'hf')
    if not os.path.isdir(hf):
        assert convert.main(['export', sources['imported'], hf, '--layout', 'hf', '--with_decoder']) == 0
    outs = [str(sources['base'] / f'{n}_hf.png') for n in ('hf', 'imported')]
    for src, out in zip((hf, sources['imported']), outs):
        assert visualize.main([src, sources['photos'], '--strategies', 'random', '--num', '2', '--out', out]) == 0
    assert 'Hugging Face' in capsys.readouterr().out
    a, b = _read(outs[0]), _read(outs[1])
    assert a.shape == (*viz.layout(2, 3, 128, 128, title_lines=2, footer=True).size, 3)
    np.testing.assert_array_equal(a, b)



@pytest.mark.slow
def test_cli_reads_a_pth_file(sources, tmp_path, capsys):
    """A ``.pth`` in the official MAE layout (exported by ``tools.convert``) is read directly and gives
    the picture of the same params read from an import folder. Its model must follow from the shapes:
    the mu encoder (heads from the variant table) and MAE's 512 x 8 decoder (16 heads)."""
    pytest.importorskip('torch')
    from colormae_jax.tools import convert
    c = dataclasses.replace(sources['config'], dec_width=512, dec_depth=8, dec_heads=16)
    params = jax.jit(lambda: M.init_mae_params(c, 3))()
    weights.save_params(str(tmp_path / 'imported'), params, c)
    pth = str(tmp_path / 'mae.pth')
    assert convert.main(['export', str(tmp_path / 'imported'), pth, '--layout', 'mae', '--with_decoder']) == 0
    outs = [str(tmp_path / f'{n}.png') for n in ('pth', 'imported')]
    for src, out in zip((pth, str(tmp_path / 'imported')), outs):
        assert visualize.main([src, sources['photos'], '--strategies', 'random,green', '--num', '2',
                               '--out', out]) == 0
    assert 'weights ' + pth in capsys.readouterr().out
    np.testing.assert_array_equal(_read(outs[0]), _read(outs[1]))

def test_visible_patches_are_the_input_pixels_and_mask_colours_count_right(sources):
    pre = api.load(sources['imported'])
    images, _ = api.load_images(sources['photos'], 32)
    rec = api.reconstruct(pre, images, 'famt:0.45/0.40', seed=3)
    counts = {v: (rec.mask == v).sum(1) for v in (0, 1, -1)}
    # AMT's counts on 8x8: int(64 * .45) = 28 masked, 64 - int(64 * .85) = 10 visible, 26 thrown
    assert (counts[1] == 28).all() and (counts[0] == 10).all() and (counts[-1] == 26).all()
    p_in, p_rec = viz.patchify(images, 4), viz.patchify(rec.images, 4)
    for i in range(len(images)):
        vis, thr, msk = (rec.mask[i] == v for v in (0, -1, 1))
        np.testing.assert_array_equal(p_rec[i, vis], p_in[i, vis])  # pasted back exactly
        assert (p_rec[i, thr] == np.tile(viz.THROWN, 16)).all()
        assert not np.array_equal(p_rec[i, msk], p_in[i, msk])  # predicted
        panel = viz.mask_image(rec.mask[i], 4)
        for colour, n in ((viz.VISIBLE, 10), (viz.MASKED, 28), (viz.THROWN, 26)):
            assert (panel == colour).all(-1).sum() == n * 16
    # the same through the saved grid: the mask and reconstruction tiles, read back from the PNG
    picture = api.grid(pre, images, ['famt:0.45/0.40'], seed=3)
    lay = viz.layout(3, 8, 128, 128, title_lines=2, footer=True)
    assert picture.shape == (*lay.size, 3)
    for i in range(3):
        np.testing.assert_array_equal(_tile(picture, lay, i, 1), viz.mask_image(rec.mask[i], 4))
        np.testing.assert_array_equal(_tile(picture, lay, i, 2), rec.images[i])
    # masks are functions of the seed and the strategy, and the maps are FAMT's weights
    assert np.array_equal(api.reconstruct(pre, images, 'famt:0.45/0.40', seed=3).mask, rec.mask)
    assert np.allclose(rec.maps['fused'], 0.5 * rec.maps['attention'] + 0.5 * rec.maps['frequency'], atol=1e-6)
    assert rec.maps['aligned'].shape == (3, 64) and rec.maps['crop'].shape == (3, 32, 32, 3)


def test_norm_pix_undo_gives_back_the_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
    normalised = (image.astype(np.float32) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    target = M.normalize_patches(jnp.asarray(viz.patchify(normalised, 4)))  # what the loss compares with
    mask = np.ones(64, np.int8)  # everything masked: every patch comes from the prediction
    out = viz.compose(image, normalised, np.asarray(target), mask, 4, mean=mean, std=std, norm_pix=True)
    np.testing.assert_array_equal(out, image)
    raw = viz.compose(image, normalised, viz.patchify(normalised, 4), mask, 4, mean=mean, std=std, norm_pix=False)
    np.testing.assert_array_equal(raw, image)
    wrong = viz.compose(image, normalised, np.asarray(target), mask, 4, mean=mean, std=std, norm_pix=False)
    assert np.abs(wrong.astype(int) - image).max() > 50


def test_mask_panel_colours_and_grid_geometry():
    mask = np.asarray([0, 1, -1, 1] * 4)  # a 4x4 grid: 4 visible, 8 masked, 4 thrown
    panel = viz.mask_image(mask, 2)
    assert panel.shape == (8, 8, 3)
    assert [(panel == c).all(-1).sum() for c in (viz.VISIBLE, viz.MASKED, viz.THROWN)] == [16, 32, 16]
    with pytest.raises(ValueError, match='0 .visible., 1 .masked. and -1'):
        viz.mask_image(np.asarray([0, 2, 1, 1]), 2)
    rows = [[np.full((8, 8, 3), 10 * (r + c), np.uint8) for c in range(3)] for r in range(2)]
    picture = viz.grid(rows, ['a', 'b', 'c'], scale=3, gap=5)
    lay = viz.layout(2, 3, 24, 24, gap=5)
    assert picture.shape == (*lay.size, 3) == (lay.title_h + 2 * 24 + 3 * 5, 3 * 24 + 4 * 5, 3)
    for r in range(2):
        for c in range(3):
            y, x = lay.origin(r, c)
            assert (picture[y:y + 24, x:x + 24] == 10 * (r + c)).all()
            assert (picture[y + 24:y + 24 + 5, x:x + 24] == viz.BACKGROUND).all()  # the gap below
    assert (picture[:lay.title_h] != viz.BACKGROUND).any()  # titles are drawn


def test_bad_image_and_bad_source_are_one_line_errors(sources, tmp_path, capsys):
    bad = tmp_path / 'broken.jpg'
    bad.write_bytes(b'not a jpeg')
    assert visualize.main([sources['imported'], str(bad), '--out', str(tmp_path / 'x.png')]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {bad}: not an image PIL can read') and err.count('\n') == 1, err
    assert 'give JPEG or PNG files' in err and '0x' not in err
    assert visualize.main([str(tmp_path / 'nowhere'), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'error: {tmp_path / "nowhere"}: no such file or directory') and err.count('\n') == 1
    assert visualize.main([sources['photos'], str(bad)]) == 2  # a folder that holds no params
    assert capsys.readouterr().err.startswith(f'error: {sources["photos"]}: cannot read pre-trained params')
    assert visualize.main([sources['imported'], sources['photos'], '--strategies', 'random,rnd']) == 2
    assert capsys.readouterr().err.startswith("error: --strategies: strategy 'rnd': 'rnd' is unknown")
    assert not (tmp_path / 'x.png').exists()


def test_docs_example_runs(sources, tmp_path, monkeypatch):
    """The example of docs/api.md's "Python API" section, on the tiny run."""
    code = example_code(os.path.join(ROOT, 'docs', 'api.md'), 'Python API')
    assert "api.load('/tmp/colormae_smoke')" in code
    os.symlink(sources['photos'], tmp_path / 'photos')
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(code.replace('/tmp/colormae_smoke', sources['wd']), 'docs/api.md', 'exec'), scope)
    assert scope['features'].shape == (3, 32) and np.isfinite(scope['features']).all()
    assert scope['rec'].images.shape == (3, 32, 32, 3) and (scope['rec'].mask == 1).sum() == 3 * 48
    assert _read(tmp_path / 'grid.png').shape == scope['picture'].shape
    # the [CLS] features are what the kNN monitor extracts (the encoder on whole images, after its norm)
    both = api.encode(scope['mae'], scope['images'], None)
    np.testing.assert_array_equal(both['cls'], scope['features'])


@pytest.mark.slow
def test_pretraining_writes_the_grid_to_tensorboard():
    c = cifar10.get_config('smoke')
    c.batch_size, c.image_summary_count, c.total_steps = 8, 3, 4
    t = pretrain.make_trainer(c, parallel.make_mesh(c.mesh, jax.devices()[:1]), steps_per_epoch=2)
    task = pretrain.PretrainTask(t)
    state = pretrain.init_state(t)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)}

    class Writer:
        images = {}

        def write_images(self, step, images):
            self.images[step] = images

    writer = Writer()
    strategy, aux, _, recon_fn = task.phases.get(0)  # the picture only: no train step to compile
    task.phases._built[strategy] = (strategy, aux, lambda s, b, a: (s, {}), recon_fn)
    state, _ = task.step(0, state, batch)
    task.after_step(1, state, writer)
    picture = writer.images[0]['masks/input_mask_reconstruction']
    lay = viz.layout(3, 3, 128, 128, footer=True)
    assert picture.shape == (*lay.size, 3) and picture.dtype == np.uint8
    for r in range(3):
        np.testing.assert_array_equal(_tile(picture, lay, r, 0), batch['image'][r])
        mask = _tile(picture, lay, r, 1)
        assert (mask == viz.MASKED).all(-1).sum() == 48 * 16 and (mask == viz.VISIBLE).all(-1).sum() == 16 * 16

"""Linear probe and fine-tuning at an image size other than pre-training's: the encoder's position table
interpolated bicubically (MAE's interpolate_pos_embed) or recomputed (``config.model.pos_embed_resize``)."""
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from colormae_jax import config_lib, knn, main, parallel
from colormae_jax.interop import weights
from colormae_jax.models import classifier, mae as M, posembed
from colormae_jax.tasks import evaluation

from helpers import make_folder, override

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'configs'))
import cifar10_eval  # noqa: E402

C = M.MAEConfig(image_size=32, patch=4, width=32, depth=1, mlp_dim=128, heads=2, dec_width=32, dec_depth=1,
                dec_heads=2)  # 'mu/4'


@pytest.fixture(scope='module')
def params():
    return M.init_mae_params(C, 0)


@functools.lru_cache(maxsize=2)
def _classifier(c):
    return classifier.split_classifier(classifier.Classifier(c, 10, learn_pos_embed=True, rngs=nnx.Rngs(1)))


def logits(c, enc_params, images):
    graphdef, p, stats = _classifier(c)
    p = classifier.load_encoder(p, enc_params)
    return classifier.classifier_apply(graphdef, p, stats, jnp.asarray(images), train=False)[0], p


def test_shapes_at_twice_the_size(params):
    big, c = evaluation.resize_encoder(params, C, 64, 'interpolate')
    assert c.image_size == 64 and c.grid == 16 and c.width == C.width
    table = big['encoder']['pos_embed']
    assert table.shape == (1, 1 + 16 * 16, 32)
    np.testing.assert_array_equal(table, posembed.resize_pos_embed(M.sincos_table_with_cls(8, 32), 16))
    assert float(jnp.abs(table - M.sincos_table_with_cls(16, 32)).max()) > 1e-2  # not the recomputed one
    again, c2 = evaluation.resize_encoder(params, C, 64, 'recompute')
    assert c2 == c and 'pos_embed' not in again['encoder']
    x = np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)
    for p in (big, again):
        out, loaded = logits(c, p['encoder'], x)
        assert out.shape == (2, 10) and loaded['encoder']['pos_embed'].shape == (1, 257, 32)
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, big['encoder']['blocks'], params['encoder']['blocks']))


def test_same_size_changes_nothing(params):
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype(np.float32)
    want, _ = logits(C, params['encoder'], x)
    mesh = parallel.make_mesh((('data', 1),), jax.devices()[:1])
    cfg = cifar10_eval.get_config('task=linear_probe').data
    feats = knn.make_feature_fn(C, cfg, mesh)(params['encoder'], x)
    for method in ('interpolate', 'recompute'):
        same, c = evaluation.resize_encoder(params, C, 32, method)
        assert c == C
        got, _ = logits(c, same['encoder'], x)
        np.testing.assert_array_equal(got, want)
        f = evaluation.make_feature_fn(c, same['encoder'], cfg, mesh)(same['encoder'], x)
        jax.tree.map(np.testing.assert_array_equal, f, feats)


@pytest.mark.slow
def test_finetune_and_probe_at_twice_the_size(params, tmp_path):
    src = weights.save_params(str(tmp_path / 'mu32'), params, C)
    root = make_folder(tmp_path / 'imgs', per_class=4, splits=('train', 'test'))
    c = cifar10_eval.get_config('task=finetune,smoke')
    override(c, **{'data.root': root, 'data.data_dir': str(tmp_path / 'tfds'), 'init_from': src, 'batch_size': 8,
                   'total_steps': 2, 'warmup_steps': 1, 'data.image_size': 64, 'finetune.max_test': 8,
                   'grad_accum_steps': 2})  # the accumulating fine-tuning step, mixup and all
    dev = jax.devices()[:1]
    out = main.run(c, str(tmp_path / 'ft'), devices=dev)
    assert out['step'] == 2 and np.isfinite(out['losses']).all()
    assert out['state']['params']['encoder']['pos_embed'].shape == (1, 257, 32)
    assert 0 <= out['results']['finetune/top1'] <= 100
    probe = override(cifar10_eval.get_config('task=linear_probe,smoke'), **{
        'data.root': root, 'data.data_dir': str(tmp_path / 'tfds'), 'init_from': src, 'batch_size': 8,
        'total_steps': 2, 'warmup_steps': 1, 'data.image_size': 64, 'probe.max_train': 8, 'probe.max_test': 8})
    out = main.run(probe, str(tmp_path / 'probe'), devices=dev)  # features of the encoder with the 16x16 table
    assert out['step'] == 2 and 0 <= out['results']['linear/top1'] <= 100
    with pytest.raises(config_lib.ConfigError, match="model.pos_embed_resize: 'interpolate' at another image size"):
        main.run(override(cifar10_eval.get_config('task=knn,smoke'), **{
            'data.root': root, 'data.data_dir': str(tmp_path / 'tfds'), 'init_from': src, 'batch_size': 8,
            'data.image_size': 64}), str(tmp_path / 'knn'), devices=dev)
    with pytest.raises(config_lib.ConfigError, match='data.image_size: 62 is not a multiple of the patch size 4'):
        main.run(override(c, **{'data.image_size': 62}), str(tmp_path / 'x'), devices=dev)

"""Gradient accumulation (``config.grad_accum_steps``): one optimizer step over k micro-batches equals one
step over the whole batch; the config is checked before compiling; resume stays exact."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from colormae_jax import config_lib, main, masking, parallel
from colormae_jax.errors import ConfigError
from colormae_jax.models import classifier, mae as M
from colormae_jax.tasks import evaluation, pretrain

from helpers import make_folder, smoke_config


@dataclasses.dataclass(frozen=True)
class ByIndex(masking.Strategy):
    """Fixed masks: each example's scores come from its dataset index alone, whatever batch it is in."""

    def scores(self, rng, batch, aux):
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(7), i))(batch['index'])
        return jax.vmap(lambda k: jax.random.uniform(k, (self.grid * self.grid,)))(keys)


def one_step(k, devices, batch):
    c = smoke_config('', '', grad_accum_steps=k, batch_size=len(batch['index']))
    c.total_steps, c.warmup_steps = 10, 0  # lr > 0 at step 0
    mesh = parallel.make_mesh(c.mesh, devices)
    t = pretrain.make_trainer(c, mesh, steps_per_epoch=10)
    strategy = ByIndex('by_index', t.mae.grid, 0.75)
    state = pretrain.init_state(t)
    gb = {key: jax.device_put(v, parallel.batch_sharding(mesh)) for key, v in batch.items()}
    state, m = pretrain.compile_step(t, strategy, ())(state, gb, ())
    return jax.device_get(state), jax.device_get(m)


def test_micro_batches_interleave_rows():
    x = jnp.arange(8)
    np.testing.assert_array_equal(pretrain.micro_batches({'x': x}, 4)['x'], [[0, 4], [1, 5], [2, 6], [3, 7]])


def batch8():
    rng = np.random.default_rng(0)
    return {'image': rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
            'index': np.arange(8, dtype=np.int32), 'label': np.zeros(8, np.int32)}


@functools.lru_cache(maxsize=1)
def full_batch_step():
    return one_step(1, jax.devices()[:1], batch8())


@pytest.mark.slow
@pytest.mark.parametrize('k,ndev', [(4, 1), (2, 4)])
def test_accumulated_step_equals_full_batch(k, ndev):
    full, m_full = full_batch_step()
    acc, m_acc = one_step(k, jax.devices()[:ndev], batch8())
    np.testing.assert_allclose(m_acc['loss'], m_full['loss'], rtol=1e-6)
    np.testing.assert_allclose(m_acc['grad_norm'], m_full['grad_norm'], rtol=1e-5)
    # Adam's moments after one step are (1 - b1) g and (1 - b2) g^2: the gradients themselves.
    close = functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=1e-9)
    jax.tree.map(close, acc['opt_state'], full['opt_state'])
    assert int(acc['step']) == 1  # one optimizer step, whatever k


def test_bad_accumulation_is_refused_before_compiling():
    c = smoke_config('', '', batch_size=8, grad_accum_steps=3)
    with pytest.raises(ConfigError, match=r'grad_accum_steps: 3 micro-batches do not split batch_size=8 evenly'):
        config_lib.validate(c, num_devices=1, check_data=False)
    c.grad_accum_steps = 4
    with pytest.raises(ConfigError, match='use a k that divides 2'):  # 8 examples on 4 devices: 2 each
        config_lib.validate(c, num_devices=4, check_data=False)
    c.grad_accum_steps = 0
    with pytest.raises(ConfigError, match='must be an int >= 1'):
        config_lib.validate(c, num_devices=1, check_data=False)


@pytest.mark.slow
def test_resume_with_accumulation_is_exact(tmp_path):
    root = make_folder(tmp_path / 'imgs', per_class=16)
    c = smoke_config(root, str(tmp_path / 'tfds'), grad_accum_steps=2,
                     **{'ckpt.every_steps': 2, 'image_summary_every_epochs': 0.0})
    c.total_steps = 4
    dev = jax.devices()[:1]
    full = main.run(c, str(tmp_path / 'a'), devices=dev)
    assert full['step'] == 4 and len(full['losses']) == 4  # optimizer steps
    first = main.run(c, str(tmp_path / 'b'), devices=dev, stop_after=3)
    assert first['losses'] == full['losses'][:3]
    second = main.run(c, str(tmp_path / 'b'), devices=dev)  # from the checkpoint of step 2
    assert second['losses'] == full['losses'][2:]
    jax.tree.map(np.testing.assert_array_equal, second['state']['params'], full['state']['params'])


def classifier_step(k, batch):
    """One fine-tuning step (no mixup, drop path or BatchNorm: deterministic) with k micro-batches."""
    c = M.MAEConfig(image_size=32, patch=4, width=32, depth=1, mlp_dim=64, heads=2, dec_width=32, dec_depth=1,
                    dec_heads=2)
    graphdef, params, stats = classifier.split_classifier(classifier.Classifier(c, 10, rngs=nnx.Rngs(0)))
    mesh = parallel.make_mesh((('data', -1),), jax.devices()[:1])
    task = evaluation.ClassifierTask(
        ml_collections.ConfigDict({'seed': 0, 'grad_accum_steps': k}), mesh, name='t', aux=(),
        forward=lambda p, s, aux, b, rng, train: classifier.classifier_apply(graphdef, p, s, b['image'], train=train),
        init_vars=lambda: (params, stats), tx=optax.sgd(1.0), schedule=lambda step: 1.0, total_steps=1,
        steps_per_epoch=1, eval_batches=None, eval_every=1)
    return jax.device_get(task.step(0, task.init_state(), batch))


@pytest.mark.slow
def test_classifier_step_accumulates_too():
    rng = np.random.default_rng(0)
    batch = {'image': rng.normal(size=(8, 32, 32, 3)).astype(np.float32), 'label': np.arange(8, dtype=np.int32)}
    (full, m_full), (acc, m_acc) = classifier_step(1, batch), classifier_step(4, batch)
    np.testing.assert_allclose(m_acc['loss'], m_full['loss'], rtol=1e-6)
    assert m_acc['train_top1'] == m_full['train_top1']
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7), acc['params'], full['params'])

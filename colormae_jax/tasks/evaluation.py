"""What the evaluation tasks share: the pre-trained encoder they start from, the results
they write, and :class:`ClassifierTask`, a classifier trained by the shared loop (linear
probe, fine-tuning).

Each evaluation starts from a pre-training run (``config.init_from``: a workdir, one of its
``checkpoints/STEP`` folders, or a folder written by ``tools.convert import``), runs on the
config's mesh with the same data pipeline, and writes its results to TensorBoard and to
``workdir/results.json``.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from colormae_jax import config_lib, data, loop, metrics, parallel, weights
from colormae_jax.errors import ConfigError


def validate(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad evaluation config (kNN, linear probe, fine-tuning) before compiling."""
    config_lib.validate_eval(config, num_devices, check_data)


def run_evaluation(config, workdir: str, body: Callable, *, devices=None, stop_after: int | None = None,
                   deadline: float | None = None) -> dict:
    """Loads the encoder of ``config.init_from``, runs ``body(config, mesh, params, mae_config,
    workdir, stop_after, deadline) -> {'results': {...}, ...}`` and writes the results
    (process 0)."""
    validate(config, num_devices=len(devices) if devices is not None else None)
    params, c, desc = weights.load_pretrained(config.init_from)
    if c.image_size != config.data.image_size:
        raise ConfigError('data.image_size', f'{config.data.image_size}, but the encoder of {desc} was built for '
                                             f'{c.image_size}')
    logging.info('Evaluating (%s) the encoder of %s.', config.task, desc)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    out = body(config, mesh, params, c, workdir, stop_after, deadline)
    out['results'] = {k: v for k, v in out['results'].items() if v is not None}
    logging.info('Results: %s', out['results'])
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'results.json'), 'w') as f:
            json.dump({'task': config.task, 'init_from': config.init_from, 'source': desc, **out['results']}, f,
                      indent=1)
        w = metrics.create_writer(os.path.join(workdir, 'tb'))
        w.write_scalars(out.get('step', 0), out['results'])
        w.flush()
    return out


class ClassifierTask:
    """A classifier trained by :func:`loop.run_loop` (linear probe; fine-tuning).

    ``forward(params, stats, aux, batch, rng, train) -> (logits, new_stats)``; the state is
    ``{'step', 'params', 'stats', 'opt_state'}``; ``aux`` (e.g. the frozen encoder) is a
    replicated argument of the jitted step. Evaluates top-1 on ``eval_batches()`` every
    ``eval_every`` steps and at the end, and logs the best and the last value.
    """

    def __init__(self, config, mesh, *, name: str, forward, init_vars, tx, schedule, aux, total_steps: int,
                 steps_per_epoch: int, eval_batches: Callable, eval_every: int, loss_fn=None, batch_transform=None):
        self.config, self.mesh, self.name = config, mesh, name
        self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
        self.forward, self.tx, self.schedule = forward, tx, schedule
        self.eval_batches, self.eval_every = eval_batches, eval_every
        self.loss_fn = loss_fn or (lambda logits, batch: optax.softmax_cross_entropy_with_integer_labels(
            logits, batch['label']).mean())
        self.batch_transform = batch_transform
        rep = parallel.replicated(mesh)
        self.aux = jax.device_put(aux, rep)
        self.init_vars = init_vars  # () -> (params, stats), concrete (passed to the jitted init, not baked in)
        abstract = jax.eval_shape(self._new_state, *init_vars())
        self.state_sharding = jax.tree.map(lambda _: rep, abstract)
        self.abstract_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                           abstract, self.state_sharding)
        bs = parallel.batch_sharding(mesh)
        self._step = jax.jit(self._train_step, in_shardings=(self.state_sharding, bs, rep),
                             out_shardings=(self.state_sharding, rep), donate_argnums=(0,))
        self._eval = jax.jit(self._eval_step, in_shardings=(self.state_sharding, bs, rep), out_shardings=rep)
        self.best, self.last = {'top1': 0.0}, {}

    def _new_state(self, params, stats):
        return {'step': jnp.zeros((), jnp.int32), 'params': params, 'stats': stats,
                'opt_state': self.tx.init(params)}

    def init_state(self):
        return jax.jit(self._new_state, out_shardings=self.state_sharding)(*self.init_vars())

    def _train_step(self, state, batch, aux):
        rng = loop.step_rng(self.config.seed, state['step'])
        if self.batch_transform is not None:
            batch = self.batch_transform(jax.random.fold_in(rng, 1), batch)

        def loss(params):
            logits, stats = self.forward(params, state['stats'], aux, batch, jax.random.fold_in(rng, 2), True)
            return self.loss_fn(logits, batch), (stats, logits)

        (loss_value, (stats, logits)), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
        updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        m = {'loss': loss_value, 'lr': self.schedule(state['step']), 'grad_norm': optax.tree.norm(grads)}
        if 'label' in batch and batch['label'].ndim == 1:
            m['train_top1'] = 100.0 * jnp.mean(logits.argmax(-1) == batch['label'])
        return {'step': state['step'] + 1, 'params': params, 'stats': stats, 'opt_state': opt_state}, m

    def _eval_step(self, state, batch, aux):
        logits, _ = self.forward(state['params'], state['stats'], aux, batch, None, False)
        ok = (logits.argmax(-1) == batch['label']) & batch['valid']
        return {'correct': ok.sum(), 'count': batch['valid'].sum()}

    def evaluate(self, state) -> float:
        correct = count = 0
        sharding = parallel.batch_sharding(self.mesh)
        for b in self.eval_batches():
            r = self._eval(state, data.to_global(b, lambda name, x: sharding), self.aux)
            correct, count = correct + int(r['correct']), count + int(r['count'])
        return 100.0 * correct / max(count, 1)

    def run(self, workdir: str, it, stop_after=None, deadline=None) -> dict:
        """Trains with :func:`loop.run` (resuming from ``workdir``); a run resumed after its
        last step evaluates the final state, so that it reports the last top-1 too."""
        res = loop.run(self, self.config, workdir, it, self.abstract_state, self.init_state, stop_after=stop_after,
                        deadline=deadline)
        if not self.last and res['step'] >= self.total_steps:
            self.after_step(self.total_steps, res['state'], metrics.create_writer(os.path.join(workdir, 'tb')))
        return res

    # -- the run_loop protocol
    def describe(self) -> str:
        return f'{self.name}, batch {self.config.batch_size}'

    def before_step(self, step0, state, writer, progress) -> None:
        pass

    def host_batch(self, step0, batch):
        return batch

    def step(self, step0, state, batch):
        return self._step(state, batch, self.aux)

    def after_step(self, step, state, writer) -> None:
        if step % self.eval_every and step != self.total_steps:
            return
        top1 = self.evaluate(state)
        self.best['top1'] = max(self.best['top1'], top1)
        self.last = {'top1': top1}
        writer.write_scalars(step, {'eval/top1': top1, 'eval/best_top1': self.best['top1']})
        logging.info('%s: step %d, eval top-1 %.2f%% (best %.2f%%).', self.name, step, top1, self.best['top1'])

    def abstract_extra(self):
        return {'eval': {'best_top1': np.zeros((), np.float64)}}

    def load_extra(self, restored) -> None:
        self.best['top1'] = float(restored['eval']['best_top1'])

    def extra(self):
        return {'eval': {'best_top1': np.asarray(self.best['top1'], np.float64)}}

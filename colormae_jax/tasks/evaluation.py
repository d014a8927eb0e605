"""What the evaluation tasks share: the pre-trained encoder they start from, the results
they write, and :class:`ClassifierTask`, a classifier trained by the shared loop (linear
probe, fine-tuning).

Each evaluation starts from a pre-trained encoder (``config.init_from``: a workdir, one of its
``checkpoints/STEP`` folders, a ``tools.convert import`` folder, a Hugging Face folder, a ``.pth`` /
``.safetensors`` file), at the source's image size or another one (:func:`resize_encoder`, by
``config.model.pos_embed_resize``), runs on the config's mesh with the same data pipeline, and writes
its results to TensorBoard and to ``workdir/results.json``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from colormae_jax import config_lib, knn, loop, metrics, parallel
from colormae_jax.data import pipeline as data
from colormae_jax.errors import ConfigError
from colormae_jax.interop import weights
from colormae_jax.models import mae as model_lib, posembed


def validate(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad evaluation config (kNN, linear probe, fine-tuning) before compiling."""
    config_lib.validate_eval(config, num_devices, check_data)


POS_EMBED_RESIZE = ('interpolate', 'recompute')


def pos_embed_resize(config) -> str:
    """``config.model.pos_embed_resize`` ('interpolate', the default, as MAE's fine-tuning and linear probe)."""
    model_cfg = config.get('model')
    return model_cfg.get('pos_embed_resize', 'interpolate') if model_cfg is not None else 'interpolate'


def resize_encoder(params: dict, c: model_lib.MAEConfig, image_size: int,
                   method: str) -> tuple[dict, model_lib.MAEConfig]:
    """Pre-trained MAE params and their MAEConfig -> the same encoder at ``image_size``.

    'interpolate': ``params['encoder']['pos_embed']`` becomes MAE's ``interpolate_pos_embed`` (bicubic) of the
    source grid's table: the encoder's own learned table if it has one, else the fixed sin-cos table of the
    source grid. 'recompute': no table is given, so the encoder uses the sin-cos table of the new grid (a
    fine-tuning classifier learns from it). The other parameters do not depend on the image size.
    """
    if method not in POS_EMBED_RESIZE:
        raise ConfigError('model.pos_embed_resize', f'{method!r}; valid: {POS_EMBED_RESIZE}')
    new = dataclasses.replace(c, image_size=image_size)
    enc = dict(params['encoder'])
    source = enc.pop('pos_embed', None)
    if source is None:
        source = model_lib.sincos_table_with_cls(c.grid, c.width)
    if method == 'interpolate':
        enc['pos_embed'] = jnp.asarray(posembed.pos_table(new.grid, c.width, np.asarray(source), method))
    return {**params, 'encoder': enc}, new


def encoder_graph(c: model_lib.MAEConfig, enc_params: dict) -> nnx.GraphDef:
    """The graph of a :class:`model.ViTEncoder` for ``enc_params`` (with a position table parameter if they
    hold one: an encoder resized by interpolation)."""
    learn = 'pos_embed' in enc_params
    return nnx.split(nnx.eval_shape(lambda: model_lib.ViTEncoder(c, learn_pos_embed=learn, rngs=nnx.Rngs(0))))[0]


def make_feature_fn(c: model_lib.MAEConfig, enc_params: dict, data_cfg, mesh) -> Callable:
    """``knn.make_feature_fn`` for ``enc_params`` that may hold a position table (:func:`encoder_graph`)."""
    if 'pos_embed' not in enc_params:
        return knn.make_feature_fn(c, data_cfg, mesh)
    graphdef = encoder_graph(c, enc_params)

    def features(p, images):
        x = data.model_input(images, data_cfg)
        return model_lib.pooled_features(nnx.merge(graphdef, p)(x.astype(c.dtype)))

    return jax.jit(features, out_shardings=parallel.batch_sharding(mesh))


def run_evaluation(config, workdir: str, body: Callable, *, devices=None, stop_after: int | None = None,
                   deadline: float | None = None) -> dict:
    """Loads the encoder of ``config.init_from``, runs ``body(config, mesh, params, mae_config,
    workdir, stop_after, deadline) -> {'results': {...}, ...}`` and writes the results
    (process 0)."""
    validate(config, num_devices=len(devices) if devices is not None else None)
    params, c, desc = weights.load_pretrained(config.init_from)
    size, method = config.data.image_size, pos_embed_resize(config)
    if size != c.image_size:
        if size % c.patch:
            raise ConfigError('data.image_size', f'{size} is not a multiple of the patch size {c.patch} of the '
                                                 f'encoder of {desc}; use e.g. {size - size % c.patch or c.patch}')
        if config.task == 'knn' and method == 'interpolate':
            raise ConfigError('model.pos_embed_resize', f"'interpolate' at another image size ({c.image_size} -> "
                                                        f"{size}) is for linear_probe and finetune; kNN runs the "
                                                        f"fixed sin-cos table: set it to 'recompute'")
        logging.info('Image size %d -> %d (patch grid %d -> %d): position table by %s.', c.image_size, size,
                     c.grid, size // c.patch, method)
        params, c = resize_encoder(params, c, size, method)
    logging.info('Evaluating (%s) the encoder of %s.', config.task, desc)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    try:
        with loop.sigterm_stops_passes():  # SIGTERM stops a pass outside the training loop too (kNN, features)
            out = body(config, mesh, params, c, workdir, stop_after, deadline)
    except loop.EvaluationInterrupted as e:
        logging.warning('%s; relaunch the same command to run it again.', e)
        return {'results': {}, 'preempted': True}
    out['results'] = {k: v for k, v in out['results'].items() if v is not None}
    if out.get('preempted'):  # stopped early (SIGTERM, deadline): no results.json until it finishes
        return out
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

    best_key = 'top1'  # the metric whose best value is logged and kept in the checkpoint (eval/best_<key>)
    report_keys = ('top1',)  # the metrics of the last evaluation the run reports

    def __init__(self, config, mesh, *, name: str, forward, init_vars, tx, schedule, aux, total_steps: int,
                 steps_per_epoch: int, eval_batches: Callable, eval_every: int, loss_fn=None, batch_transform=None,
                 eval_size: int = 0, eval_hint: str = ''):
        self.config, self.mesh, self.name = config, mesh, name
        self.eval_size, self.eval_hint = eval_size, eval_hint  # examples per evaluation; how to bound it
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
        self.best, self.last = {self.best_key: 0.0}, {}
        self._note_eval_cost()

    def _note_eval_cost(self) -> None:
        """A log line when the evaluations read more examples than the run trains on (a run cut
        short with total_steps), with ``eval_hint``."""
        if not self.eval_hint:
            return
        runs = len([s for s in range(1, self.total_steps + 1) if self.evaluates(s)])
        trained = self.total_steps * self.config.batch_size
        if runs * self.eval_size > trained:
            logging.info('%s evaluates %d time(s) on %s examples each, more than the %s examples it trains on '
                         '(%d steps of %d); %s.', self.name, runs, f'{self.eval_size:,}', f'{trained:,}',
                         self.total_steps, self.config.batch_size, self.eval_hint)

    def _new_state(self, params, stats):
        return {'step': jnp.zeros((), jnp.int32), 'params': params, 'stats': stats,
                'opt_state': self.tx.init(params)}

    def init_state(self):
        return jax.jit(self._new_state, out_shardings=self.state_sharding)(*self.init_vars())

    def _micro_step(self, params, stats, aux, batch, rng):
        """(loss, grads, stats, correct predictions) of one (micro-)batch."""
        if self.batch_transform is not None:
            batch = self.batch_transform(jax.random.fold_in(rng, 1), batch)

        def loss(p):
            logits, new_stats = self.forward(p, stats, aux, batch, jax.random.fold_in(rng, 2), True)
            return self.loss_fn(logits, batch), (new_stats, logits)

        (loss_value, (new_stats, logits)), grads = jax.value_and_grad(loss, has_aux=True)(params)
        hits = jnp.sum(logits.argmax(-1) == batch['label']) if 'label' in batch and batch['label'].ndim == 1 else 0
        return loss_value, grads, new_stats, hits

    def _train_step(self, state, batch, aux):
        rng = loop.step_rng(self.config.seed, state['step'])
        k = self.config.get('grad_accum_steps', 1)
        if k == 1:
            loss_value, grads, stats, hits = self._micro_step(state['params'], state['stats'], aux, batch, rng)
        else:  # k micro-batches in a scan, micro-batch i with the keys of fold_in(rng, i); BatchNorm statistics
            # move once per micro-batch, as PyTorch's accumulation (MAE's --accum_iter) moves them
            bs = parallel.batch_sharding(self.mesh)

            def body(carry, xs):
                loss_sum, grad_sum, stats, hits = carry
                i, micro = xs
                micro = jax.lax.with_sharding_constraint(micro, bs)
                lv, g, stats, h = self._micro_step(state['params'], stats, aux, micro, jax.random.fold_in(rng, i))
                return (loss_sum + lv, jax.tree.map(jnp.add, grad_sum, g), stats, hits + h), None

            zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']), state['stats'],
                     jnp.zeros((), jnp.int32))
            micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)
            (loss_value, grads, stats, hits), _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro))
            loss_value, grads = jax.tree.map(lambda x: x / k, (loss_value, grads))
        updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        m = {'loss': loss_value, 'lr': self.schedule(state['step']), 'grad_norm': optax.tree.norm(grads)}
        if 'label' in batch and batch['label'].ndim == 1:
            m['train_top1'] = 100.0 * hits / batch['label'].shape[0]
        return {'step': state['step'] + 1, 'params': params, 'stats': stats, 'opt_state': opt_state}, m

    def _eval_step(self, state, batch, aux):
        logits, _ = self.forward(state['params'], state['stats'], aux, batch, None, False)
        ok = (logits.argmax(-1) == batch['label']) & batch['valid']
        return {'correct': ok.sum(), 'count': batch['valid'].sum()}

    def evaluate(self, state, progress: loop.PassProgress | None = None) -> dict:
        correct = count = 0
        sharding = parallel.batch_sharding(self.mesh)
        batches = self.eval_batches()
        try:
            for b in batches:
                r = self._eval(state, data.to_global(b, lambda name, x: sharding), self.aux)
                correct, count = correct + int(r['correct']), count + int(r['count'])
                if progress is not None:
                    progress.update(int(np.sum(b['valid'])) * jax.process_count())
        finally:
            close = getattr(batches, 'close', None)
            if close is not None:
                close()
        return {'top1': 100.0 * correct / max(count, 1)}

    def run(self, workdir: str, it, stop_after=None, deadline=None) -> dict:
        """Trains with :func:`loop.run` (resuming from ``workdir``). A run resumed after its last
        step reports the last evaluation from the workdir's record, or runs it again if it did
        not finish."""
        return loop.run(self, self.config, workdir, it, self.abstract_state, self.init_state, stop_after=stop_after,
                        deadline=deadline)

    # -- the run_loop protocol
    def describe(self) -> str:
        return f'{self.name}, batch {self.config.batch_size}'

    def before_step(self, step0, state, writer, progress) -> None:
        pass

    def host_batch(self, step0, batch):
        return batch

    def step(self, step0, state, batch):
        return self._step(state, batch, self.aux)

    def evaluates(self, step: int) -> bool:
        return step % self.eval_every == 0 or step == self.total_steps

    def eval_record(self) -> dict:
        return {'best': self.best[self.best_key], 'last': self.last}

    def load_eval_record(self, record: dict) -> None:
        self.best[self.best_key] = max(self.best[self.best_key], float(record['best']))
        self.last = dict(record['last'])

    def after_step(self, step, state, writer) -> None:
        if not self.evaluates(step):
            return
        m = self.evaluate(state, loop.PassProgress(f'{self.name}: evaluation after step {step}', self.eval_size,
                                                   unit='examples', hint=self.eval_hint))
        key = self.best_key
        self.best[key] = max(self.best[key], m[key])
        self.last = {k: m[k] for k in self.report_keys}
        scalars = {f'eval/{k}': v for k, v in self.last.items()}
        writer.write_scalars(step, scalars | {f'eval/best_{key}': self.best[key]})
        self.report(step, m, writer)

    def report(self, step: int, m: dict, writer) -> None:
        """Logs (and, in subclasses, writes more of) the evaluation ``m`` of ``step``."""
        logging.info('%s: step %d, eval top-1 %.2f%% (best %.2f%%).', self.name, step, m['top1'], self.best['top1'])

    def abstract_extra(self):
        return {'eval': {f'best_{self.best_key}': np.zeros((), np.float64)}}

    def load_extra(self, restored) -> None:
        self.best[self.best_key] = float(restored['eval'][f'best_{self.best_key}'])

    def extra(self):
        return {'eval': {f'best_{self.best_key}': np.asarray(self.best[self.best_key], np.float64)}}

"""Evaluations of a pre-trained encoder: weighted kNN, the MAE linear probe, fine-tuning.

Each starts from a pre-training run (``config.init_from``: a workdir, one of its
``checkpoints/STEP`` folders, or a folder written by ``tools.convert import``), runs on the
config's mesh with the same data pipeline, and trains, where it trains, with the one loop of
:mod:`colormae_jax.train` (orbax checkpoints and resume included).

* ``task='knn'``: features of the train and eval splits, extracted once (sharded), then a
  weighted kNN (cosine, k=20, temperature 0.07, as DINO's) on [CLS] and mean-pooled tokens.
* ``task='linear_probe'``: frozen encoder, BatchNorm without affine (eps 1e-6), then a linear
  layer, trained with LARS (base lr 0.1 x batch / 256, no weight decay, warm-up then cosine).
  ``probe.mode='fast'`` trains on features extracted once from centre crops (no
  augmentation); ``'faithful'`` runs the frozen encoder every step on RandomResizedCrop +
  flip, as MAE's ``main_linprobe.py``.
* ``task='finetune'``: see :func:`finetune_task` (layer-wise lr decay, drop path,
  mixup / cutmix, label smoothing, RandAugment, random erasing).
"""
from __future__ import annotations

import functools
import os
import re
import time
from typing import Callable

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from colormae_jax import config_lib, data, metrics, model as model_lib, optim, parallel, train

TASKS = ('knn', 'linear_probe', 'finetune')


# ------------------------------------------------------------------------------ the encoder

def load_pretrained(init_from: str) -> tuple[dict, model_lib.MAEConfig, str]:
    """(MAE params as a pure dict, its MAEConfig, a description) from a pre-training workdir,
    ``WORKDIR/checkpoints/STEP``, or a ``tools.convert import`` folder."""
    from colormae_jax.tools import convert
    if not init_from:
        raise config_lib.ConfigError('init_from', 'set the pre-training run to evaluate, e.g. '
                                                  '--config.init_from=/tmp/mae_green (a workdir or its checkpoints/STEP)')
    step = None
    m = re.match(r'^(.*?)/checkpoints/(\d+)/?$', init_from)
    if m:
        init_from, step = m.group(1), int(m.group(2))
    if not os.path.isdir(init_from):
        raise config_lib.ConfigError('init_from', f'{init_from!r} is not a directory')
    try:
        return convert.load_any_params(init_from, step)
    except (convert.ConversionError, FileNotFoundError, ValueError) as e:
        raise config_lib.ConfigError('init_from', f'cannot read pre-trained params from {init_from!r}: {e}') from None


def encoder_graph(c: model_lib.MAEConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: model_lib.ViTEncoder(c, rngs=nnx.Rngs(0))))[0]


def make_feature_fn(c: model_lib.MAEConfig, data_cfg, mesh) -> Callable:
    """jit(encoder params, uint8 or float images) -> pooled features, sharded like the batch."""
    graphdef = encoder_graph(c)

    def features(enc_params, images):
        x = data.model_input(images, data_cfg)
        return model_lib.pooled_features(nnx.merge(graphdef, enc_params)(x.astype(c.dtype)))

    return jax.jit(features, out_shardings=parallel.batch_sharding(mesh))


def extract(feature_fn, enc_params, data_cfg, *, split: str, batch_size: int, mesh, limit: int = 0) -> dict:
    """Features of every example of ``split`` (centre crops), gathered from all processes:
    {'cls', 'mean': [n, D], 'label': [n], 'index': [n]} as numpy, in index order."""
    t0 = time.perf_counter()
    out = {'cls': [], 'mean': [], 'label': [], 'index': []}
    sharding = parallel.batch_sharding(mesh)
    for b in data.make_eval_iterator(data_cfg, split=split, global_batch_size=batch_size,
                                     process_index=jax.process_index(), process_count=jax.process_count(),
                                     limit=limit):
        f = feature_fn(enc_params, jax.make_array_from_process_local_data(sharding, b['image']))
        valid = b['valid']
        for k in ('cls', 'mean'):
            out[k].append(parallel.local_rows(f[k], mesh)[valid])
        out['label'].append(b['label'][valid])
        out['index'].append(b['index'][valid])
    local = {k: np.concatenate(v) for k, v in out.items()}
    if jax.process_count() > 1:  # every process gets every example (padded gathers, then trimmed)
        cnt = multihost_utils.process_allgather(np.asarray(len(local['label'])))
        n = int(cnt.max())
        pad = {k: np.concatenate([v, np.zeros((n - len(v),) + v.shape[1:], v.dtype)]) for k, v in local.items()}
        allv = {k: multihost_utils.process_allgather(v) for k, v in pad.items()}
        local = {k: np.concatenate([allv[k][p][:cnt[p]] for p in range(len(cnt))]) for k in pad}
    order = np.argsort(local['index'], kind='stable')
    logging.info('Extracted %s features of %d examples in %.1f s.', split, len(order), time.perf_counter() - t0)
    return {k: v[order] for k, v in local.items()}


# ------------------------------------------------------------------------------ kNN

@functools.partial(jax.jit, static_argnames=('num_classes', 'k'))
def _knn_votes(train_f, train_y, test_f, *, num_classes: int, k: int, temperature: float):
    sims = test_f @ train_f.T  # cosine: both sides are L2-normalised
    top, idx = jax.lax.top_k(sims, k)
    w = jnp.exp(top / temperature)
    onehot = jax.nn.one_hot(train_y[idx], num_classes)
    return (w[..., None] * onehot).sum(1)


def knn_accuracy(train_f, train_y, test_f, test_y, *, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk: int = 1024) -> float:
    """Weighted kNN top-1 (%): cosine similarity, the k nearest vote with exp(sim / T)."""
    def unit(x):
        x = jnp.asarray(x, jnp.float32)
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)

    train_f, test_f = unit(train_f), unit(test_f)
    k = min(k, train_f.shape[0])
    train_y = jnp.asarray(train_y, jnp.int32)
    correct = 0
    for i in range(0, test_f.shape[0], chunk):
        votes = _knn_votes(train_f, train_y, test_f[i:i + chunk], num_classes=num_classes, k=k,
                           temperature=temperature)
        correct += int((np.asarray(votes.argmax(-1)) == np.asarray(test_y[i:i + chunk])).sum())
    return 100.0 * correct / max(len(test_y), 1)


def knn_eval(enc_params, c: model_lib.MAEConfig, data_cfg, knn_cfg, *, num_classes: int, batch_size: int, mesh,
             feature_fn=None) -> dict:
    """{'knn/cls_top1', 'knn/mean_top1'} (%) for the encoder ``enc_params``: features of
    ``data_cfg.split`` (the memory bank) and ``data_cfg.eval_split`` (the queries)."""
    feature_fn = feature_fn or make_feature_fn(c, data_cfg, mesh)
    bs = knn_cfg.get('batch_size', 0) or batch_size
    tr = extract(feature_fn, enc_params, data_cfg, split=data_cfg.split, batch_size=bs, mesh=mesh,
                 limit=knn_cfg.get('max_train', 0))
    te = extract(feature_fn, enc_params, data_cfg, split=data_cfg.eval_split, batch_size=bs, mesh=mesh,
                 limit=knn_cfg.get('max_test', 0))
    return {f'knn/{p}_top1': knn_accuracy(tr[p], tr['label'], te[p], te['label'], num_classes=num_classes,
                                          k=knn_cfg.k, temperature=knn_cfg.temperature) for p in ('cls', 'mean')}


# ------------------------------------------------------------------------------ linear probe

class ArraySource:
    """A random-access source over in-memory features, for grain."""

    def __init__(self, feats: np.ndarray, labels: np.ndarray):
        self.feats, self.labels = feats, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {'feat': self.feats[i], 'label': np.int32(self.labels[i]), 'valid': np.True_}


def feature_iterator(feats: np.ndarray, labels: np.ndarray, *, batch_size: int, seed: int) -> grain.DatasetIterator:
    """Batches of this process's rows, in a new random order every epoch, endless and
    checkpointable: grain iterates over batch numbers and each batch is one numpy gather
    through its epoch's permutation. (grain's own per-row shuffle and batch cost 50-120 ms per
    batch of 1024 features on the 2-core CPU, more than the probe's step.)"""
    p, n = jax.process_index(), jax.process_count()
    rows, per = np.arange(p, len(labels), n), batch_size // n
    per_epoch = len(rows) // per

    @functools.lru_cache(maxsize=2)
    def order(epoch: int) -> np.ndarray:
        return rows[np.random.default_rng([seed, epoch]).permutation(len(rows))]

    def batch(k: int, _) -> dict:
        idx = order(k // per_epoch)[(k % per_epoch) * per:(k % per_epoch + 1) * per]
        return {'feat': feats[idx], 'label': labels[idx].astype(np.int32)}
    return iter(grain.MapDataset.range(per_epoch).repeat(None).map_with_index(batch).to_iter_dataset())


class ClassifierTask:
    """A classifier trained by :func:`train.run_loop` (linear probe; fine-tuning).

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
        rng = train.step_rng(self.config.seed, state['step'])
        if self.batch_transform is not None:
            batch = self.batch_transform(jax.random.fold_in(rng, 1), batch)

        def loss(params):
            logits, stats = self.forward(params, state['stats'], aux, batch, jax.random.fold_in(rng, 2), True)
            return self.loss_fn(logits, batch), (stats, logits)

        (l, (stats, logits)), grads = jax.value_and_grad(loss, has_aux=True)(state['params'])
        updates, opt_state = self.tx.update(grads, state['opt_state'], state['params'])
        params = optax.apply_updates(state['params'], updates)
        m = {'loss': l, 'lr': self.schedule(state['step']), 'grad_norm': optax.tree.norm(grads)}
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
        """Trains with :func:`train.run` (resuming from ``workdir``); a run resumed after its
        last step evaluates the final state, so that it reports the last top-1 too."""
        res = train.run(self, self.config, workdir, it, self.abstract_state, self.init_state, stop_after=stop_after,
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


def _probe_vars(dim: int, num_classes: int, seed: int):
    g, p, s = nnx.split(model_lib.LinearProbeHead(dim, num_classes, rngs=nnx.Rngs(seed)), nnx.Param, nnx.BatchStat)
    return g, nnx.to_pure_dict(p), nnx.to_pure_dict(s)


def _probe_apply(graphdef, params, stats, x, train: bool):
    head = nnx.merge(graphdef, params, stats)
    return head(x, train=train), nnx.to_pure_dict(nnx.state(head, nnx.BatchStat))


def _schedule(config, total: int, warmup: int) -> optax.Schedule:
    return train.make_schedule(config, total, warmup)


def linear_probe(config, mesh, params, c: model_lib.MAEConfig, workdir: str, stop_after=None,
                 deadline=None) -> dict:
    pool, mode = config.probe.pool, config.probe.mode
    enc_params = params['encoder']
    dim = c.width
    bs = config.batch_size
    graphdef, _, _ = _probe_vars(dim, config.num_classes, config.seed)
    init_vars = lambda: _probe_vars(dim, config.num_classes, config.seed)[1:]  # noqa: E731
    out = {}
    if mode == 'fast':
        feature_fn = make_feature_fn(c, config.data, mesh)
        tr = extract(feature_fn, enc_params, config.data, split=config.data.split, batch_size=bs, mesh=mesh,
                     limit=config.probe.get('max_train', 0))
        te = extract(feature_fn, enc_params, config.data, split=config.data.eval_split, batch_size=bs, mesh=mesh,
                     limit=config.probe.get('max_test', 0))
        if config.probe.get('also_knn', True):
            for p in ('cls', 'mean'):
                out[f'knn/{p}_top1'] = knn_accuracy(tr[p], tr['label'], te[p], te['label'],
                                                    num_classes=config.num_classes, k=config.knn.k,
                                                    temperature=config.knn.temperature)
        spe = len(tr['label']) // bs
        make_iterator = functools.partial(feature_iterator, tr[pool], tr['label'], batch_size=bs, seed=config.seed)

        def eval_batches():
            return data.padded_pass(grain.MapDataset.source(ArraySource(te[pool], te['label'])), global_batch_size=bs,
                                    process_index=jax.process_index(), process_count=jax.process_count(),
                                    template={'feat': ((dim,), np.float32), 'label': ((), np.int32),
                                              'valid': ((), np.bool_)})

        def forward(params, stats, aux, batch, rng, train_mode):
            return _probe_apply(graphdef, params, stats, batch['feat'], train_mode)
        aux = ()
    elif mode == 'faithful':
        spe = data.steps_per_epoch(config.data, bs)
        make_iterator = functools.partial(data.make_train_iterator, config.data, global_batch_size=bs,
                                          seed=config.seed, process_index=jax.process_index(),
                                          process_count=jax.process_count())
        enc_graph = encoder_graph(c)

        def eval_batches():
            return data.make_eval_iterator(config.data, split=config.data.eval_split, global_batch_size=bs,
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           limit=config.probe.get('max_test', 0))

        def forward(params, stats, aux, batch, rng, train_mode):
            x = data.model_input(batch['image'], config.data).astype(c.dtype)
            feats = jax.lax.stop_gradient(model_lib.pooled_features(nnx.merge(enc_graph, aux)(x))[pool])
            return _probe_apply(graphdef, params, stats, feats, train_mode)
        aux = enc_params
    else:
        raise config_lib.ConfigError('probe.mode', f"{mode!r}; valid: 'fast', 'faithful'")
    if spe < 1:
        raise config_lib.ConfigError('batch_size', f'{bs} is larger than the training examples')
    it = make_iterator()
    total = config_lib.resolve_steps(config, 'total', spe)
    warmup = config_lib.resolve_steps(config, 'warmup', spe)
    schedule = _schedule(config, total, warmup)
    eval_every = max(1, int(round(config.eval_every_epochs * spe)))
    task = ClassifierTask(config, mesh, name=f'linear probe ({mode}, {pool})', forward=forward, init_vars=init_vars,
                          tx=optim.make_lars(schedule, weight_decay=config.wd), schedule=schedule, aux=aux, total_steps=total,
                          steps_per_epoch=spe, eval_batches=eval_batches, eval_every=eval_every)
    res = task.run(workdir, it, stop_after, deadline)
    out.update({'linear/top1': task.last.get('top1'), 'linear/best_top1': task.best['top1']})
    return dict(res, results=out)


# ------------------------------------------------------------------------------ entry point

def evaluate(config, workdir: str, *, devices=None, stop_after: int | None = None,
             deadline: float | None = None) -> dict:
    """Runs ``config.task`` on the pre-trained encoder of ``config.init_from``; writes the
    results to TensorBoard and to ``workdir/results.json`` (process 0)."""
    if config.task not in TASKS:
        raise config_lib.ConfigError('task', f'{config.task!r}; valid: {TASKS}')
    config_lib.validate_eval(config, num_devices=len(devices) if devices is not None else None)
    params, c, desc = load_pretrained(config.init_from)
    if c.image_size != config.data.image_size:
        raise config_lib.ConfigError('data.image_size', f'{config.data.image_size}, but the encoder of {desc} '
                                                        f'was built for {c.image_size}')
    logging.info('Evaluating (%s) the encoder of %s.', config.task, desc)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    if config.task == 'knn':
        out = {'results': knn_eval(params['encoder'], c, config.data, config.knn, num_classes=config.num_classes,
                                   batch_size=config.batch_size, mesh=mesh)}
    elif config.task == 'linear_probe':
        out = linear_probe(config, mesh, params, c, workdir, stop_after, deadline)
    else:
        from colormae_jax import finetune
        out = finetune.run(config, mesh, params, c, workdir, stop_after, deadline)
    out['results'] = {k: v for k, v in out['results'].items() if v is not None}
    logging.info('Results: %s', out['results'])
    if jax.process_index() == 0:
        import json
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'results.json'), 'w') as f:
            json.dump({'task': config.task, 'init_from': config.init_from, 'source': desc, **out['results']}, f,
                      indent=1)
        w = metrics.create_writer(os.path.join(workdir, 'tb'))
        w.write_scalars(out.get('step', 0), out['results'])
        w.flush()
    return out

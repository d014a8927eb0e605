"""The MAE linear probe (``main_linprobe.py``) as a task of the shared loop.

Frozen encoder, BatchNorm without affine (eps 1e-6), then a linear layer, trained with LARS
(base lr 0.1 x batch / 256, no weight decay, warm-up then cosine). ``probe.mode='fast'``
trains on features extracted once from centre crops (no augmentation); ``'faithful'`` runs
the frozen encoder every step on RandomResizedCrop + flip, as MAE does.
"""
from __future__ import annotations

import functools

import grain
import jax
import numpy as np
from flax import nnx

from colormae_jax import config_lib, knn, loop, optim
from colormae_jax.data import pipeline as data
from colormae_jax.errors import ConfigError
from colormae_jax.models import classifier, mae as model_lib
from colormae_jax.tasks import evaluation

validate = evaluation.validate


def train_and_evaluate(config, workdir: str, **kw) -> dict:
    return evaluation.run_evaluation(config, workdir, linear_probe, **kw)


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


def _probe_vars(dim: int, num_classes: int, seed: int):
    g, p, s = nnx.split(classifier.LinearProbeHead(dim, num_classes, rngs=nnx.Rngs(seed)), nnx.Param, nnx.BatchStat)
    return g, nnx.to_pure_dict(p), nnx.to_pure_dict(s)


def _probe_apply(graphdef, params, stats, x, train: bool):
    head = nnx.merge(graphdef, params, stats)
    return head(x, train=train), nnx.to_pure_dict(nnx.state(head, nnx.BatchStat))


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
        feature_fn = evaluation.make_feature_fn(c, enc_params, config.data, mesh)
        d, p = config.data, config.probe
        progress = loop.PassProgress(f'linear probe: features of {d.split} and {d.eval_split}',
                                     knn.count(d, d.split, p.max_train) + knn.count(d, d.eval_split, p.max_test),
                                     hint='--config.probe.max_train / max_test bound it')
        tr = knn.extract(feature_fn, enc_params, d, split=d.split, batch_size=bs, mesh=mesh, limit=p.max_train,
                         progress=progress)
        te = knn.extract(feature_fn, enc_params, d, split=d.eval_split, batch_size=bs, mesh=mesh, limit=p.max_test,
                         progress=progress)
        if config.probe.also_knn:
            for p in ('cls', 'mean'):
                out[f'knn/{p}_top1'] = knn.knn_accuracy(tr[p], tr['label'], te[p], te['label'],
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
        aux, eval_size, eval_hint = (), len(te['label']), ''  # evaluations on features: a linear layer, cheap
    elif mode == 'faithful':
        spe = data.steps_per_epoch(config.data, bs)
        make_iterator = functools.partial(data.make_train_iterator, config.data, global_batch_size=bs,
                                          seed=config.seed, process_index=jax.process_index(),
                                          process_count=jax.process_count())
        enc_graph = evaluation.encoder_graph(c, enc_params)

        def eval_batches():
            return data.make_eval_iterator(config.data, split=config.data.eval_split, global_batch_size=bs,
                                           process_index=jax.process_index(), process_count=jax.process_count(),
                                           limit=config.probe.max_test)

        def forward(params, stats, aux, batch, rng, train_mode):
            x = data.model_input(batch['image'], config.data).astype(c.dtype)
            feats = jax.lax.stop_gradient(model_lib.pooled_features(nnx.merge(enc_graph, aux)(x))[pool])
            return _probe_apply(graphdef, params, stats, feats, train_mode)
        aux = enc_params
        eval_size = knn.count(config.data, config.data.eval_split, config.probe.max_test)
        eval_hint = '--config.probe.max_test=N evaluates on the first N'
    else:
        raise ConfigError('probe.mode', f"{mode!r}; valid: 'fast', 'faithful'")
    if spe < 1:
        raise ConfigError('batch_size', f'{bs} is larger than the training examples')
    it = make_iterator()
    total = config_lib.resolve_steps(config, 'total', spe)
    warmup = config_lib.resolve_steps(config, 'warmup', spe)
    schedule = optim.make_schedule(config, total, warmup)
    eval_every = max(1, int(round(config.eval_every_epochs * spe)))
    task = evaluation.ClassifierTask(
        config, mesh, name=f'linear probe ({mode}, {pool})', forward=forward, init_vars=init_vars,
        tx=optim.make_lars(schedule, weight_decay=config.wd), schedule=schedule, aux=aux, total_steps=total,
        steps_per_epoch=spe, eval_batches=eval_batches, eval_every=eval_every, eval_size=eval_size,
        eval_hint=eval_hint)
    res = task.run(workdir, it, stop_after, deadline)
    out.update({'linear/top1': task.last.get('top1'), 'linear/best_top1': task.best['top1']})
    return dict(res, results=out)

"""Features of a frozen encoder, and the weighted kNN classifier on them.

:func:`extract` runs the encoder (sharded) over one pass of a split (centre crops) and
gathers [CLS] and mean-pooled features from every process (with ``data.pipeline='device'``
from the resident split, :func:`colormae_jax.data.device.eval_batches`); :func:`knn_accuracy` is DINO's
weighted kNN (cosine, the k nearest vote with ``exp(sim / T)``). Used by the kNN monitor of
pre-training, the kNN task and the fast linear probe.
"""
from __future__ import annotations

import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from colormae_jax import loop, parallel
from colormae_jax.data import device as device_data, pipeline as data, sources as datasets
from colormae_jax.models import mae as model_lib


def encoder_graph(c: model_lib.MAEConfig) -> nnx.GraphDef:
    return nnx.split(nnx.eval_shape(lambda: model_lib.ViTEncoder(c, rngs=nnx.Rngs(0))))[0]


def make_feature_fn(c: model_lib.MAEConfig, data_cfg, mesh) -> Callable:
    """jit(encoder params, uint8 or float images) -> pooled features, sharded like the batch."""
    graphdef = encoder_graph(c)

    def features(enc_params, images):
        x = data.model_input(images, data_cfg)
        return model_lib.pooled_features(nnx.merge(graphdef, enc_params)(x.astype(c.dtype)))

    return jax.jit(features, out_shardings=parallel.batch_sharding(mesh))


def count(data_cfg, split: str, limit: int = 0) -> int:
    """The examples :func:`extract` reads from ``split`` (the first ``limit`` when set)."""
    n = datasets.num_examples(data_cfg, split)
    return min(n, limit) if limit else n


def extract(feature_fn, enc_params, data_cfg, *, split: str, batch_size: int, mesh, limit: int = 0,
            progress: loop.PassProgress | None = None) -> dict:
    """Features of every example of ``split`` (centre crops), gathered from all processes:
    {'cls', 'mean': [n, D], 'label': [n], 'index': [n]} as numpy, in index order. Progress goes to
    ``progress`` (by default one of its own); SIGTERM stops the pass between two batches
    (:class:`loop.EvaluationInterrupted`)."""
    t0 = time.perf_counter()
    if progress is None:
        progress = loop.PassProgress(f'{split} features', count(data_cfg, split, limit))
    out = {'cls': [], 'mean': [], 'label': [], 'index': []}
    sharding = parallel.batch_sharding(mesh)
    if data_cfg.get('pipeline', 'grain') == 'device':  # centre crops of the resident split, made on the device
        batches = device_data.eval_batches(data_cfg, split=split, global_batch_size=batch_size, mesh=mesh,
                                           limit=limit)
    else:
        batches = data.make_eval_iterator(data_cfg, split=split, global_batch_size=batch_size,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          limit=limit)
    try:
        for b in batches:
            images = b['image']
            per_process = not isinstance(images, jax.Array)  # grain's numpy rows of this process
            if per_process:
                images = jax.make_array_from_process_local_data(sharding, images)
            f = feature_fn(enc_params, images)
            valid = b['valid']
            for k in ('cls', 'mean'):
                out[k].append(parallel.local_rows(f[k], mesh)[valid])
            out['label'].append(b['label'][valid])
            out['index'].append(b['index'][valid])
            progress.update(int(np.sum(valid)) * (jax.process_count() if per_process else 1))
    finally:
        close = getattr(batches, 'close', None)
        if close is not None:
            close()
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
             feature_fn=None, what: str = 'kNN', hint: str = '') -> dict:
    """{'knn/cls_top1', 'knn/mean_top1'} (%) for the encoder ``enc_params``: features of
    ``data_cfg.split`` (the memory bank) and ``data_cfg.eval_split`` (the queries), one pass
    with progress in the log as ``what`` (``hint``: how to bound or turn it off)."""
    feature_fn = feature_fn or make_feature_fn(c, data_cfg, mesh)
    bs = knn_cfg.batch_size or batch_size
    progress = loop.PassProgress(what, count(data_cfg, data_cfg.split, knn_cfg.max_train)
                                 + count(data_cfg, data_cfg.eval_split, knn_cfg.max_test), hint=hint)
    tr = extract(feature_fn, enc_params, data_cfg, split=data_cfg.split, batch_size=bs, mesh=mesh,
                 limit=knn_cfg.max_train, progress=progress)
    te = extract(feature_fn, enc_params, data_cfg, split=data_cfg.eval_split, batch_size=bs, mesh=mesh,
                 limit=knn_cfg.max_test, progress=progress)
    return {f'knn/{p}_top1': knn_accuracy(tr[p], tr['label'], te[p], te['label'], num_classes=num_classes,
                                          k=knn_cfg.k, temperature=knn_cfg.temperature) for p in ('cls', 'mean')}

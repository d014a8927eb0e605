"""The kNN evaluation of a pre-trained encoder: weighted kNN (cosine, k=20, T=0.07) on
[CLS] and mean-pooled features of the train (memory bank) and eval splits (:mod:`colormae_jax.knn`)."""
from __future__ import annotations

from colormae_jax import knn
from colormae_jax.tasks import evaluation

validate = evaluation.validate


def train_and_evaluate(config, workdir: str, **kw) -> dict:
    return evaluation.run_evaluation(config, workdir, _knn, **kw)


def _knn(config, mesh, params, c, workdir, stop_after, deadline) -> dict:
    del workdir, stop_after, deadline  # nothing is trained
    return {'results': knn.knn_eval(params['encoder'], c, config.data, config.knn, num_classes=config.num_classes,
                                    batch_size=config.batch_size, mesh=mesh, what='kNN evaluation',
                                    hint='--config.knn.max_train / max_test bound it')}

"""Fine-tuning, MAE's recipe (``main_finetune.py``), as a task of the shared training loop.

The pre-trained encoder goes into a :class:`classifier.Classifier` (mean-pooled tokens, then
``fc_norm`` and the head), trained end to end with AdamW and layer-wise lr decay
(:func:`optim.make_finetune_optimizer`), drop path, RandAugment on the host
(:class:`augment.RandAugmentCropFlip`), and on the device mixup / cutmix with label
smoothing and random erasing (:mod:`colormae_jax.data.augment`). Top-1 on the eval split every
``eval_every_epochs``; the best and last values are logged and saved.
"""
from __future__ import annotations

import jax
from flax import nnx

from colormae_jax import config_lib, knn, optim
from colormae_jax.data import augment, pipeline as data
from colormae_jax.errors import ConfigError
from colormae_jax.models import classifier, mae as model_lib
from colormae_jax.tasks import evaluation

validate = evaluation.validate


def train_and_evaluate(config, workdir: str, **kw) -> dict:
    return evaluation.run_evaluation(config, workdir, finetune, **kw)


def finetune(config, mesh, params: dict, c: model_lib.MAEConfig, workdir: str, stop_after=None,
             deadline=None) -> dict:
    f = config.finetune
    bs = config.batch_size
    if 'pos_embed' in params['encoder'] and not f.learn_pos_embed:
        raise ConfigError('finetune.learn_pos_embed', "False keeps the fixed sin-cos table, which cannot hold the "
                                                      "table interpolated for this image size; set it True, or "
                                                      "model.pos_embed_resize='recompute'")
    graphdef, init_params, stats = classifier.split_classifier(
        classifier.Classifier(c, config.num_classes, pool=f.pool, drop_path_rate=f.drop_path,
                             learn_pos_embed=f.learn_pos_embed, rngs=nnx.Rngs(config.seed)))
    try:
        init_params = classifier.load_encoder(init_params, params['encoder'])
    except ValueError as e:
        raise ConfigError('init_from', str(e)) from None
    spe = data.steps_per_epoch(config.data, bs)
    if spe < 1:
        raise ConfigError('batch_size', f'{bs} is larger than the training split')
    total = config_lib.resolve_steps(config, 'total', spe)
    warmup = config_lib.resolve_steps(config, 'warmup', spe)
    schedule = optim.make_schedule(config, total, warmup)
    tx = optim.make_finetune_optimizer(schedule, init_params, depth=c.depth, layer_decay=f.layer_decay,
                                       weight_decay=config.wd, b1=config.b1, b2=config.b2)
    transform = augment.RandAugmentCropFlip(config.data.image_size, f.randaug_ops, f.randaug_magnitude,
                                            scale=tuple(config.data.crop_scale))
    it = data.make_train_iterator(config.data, global_batch_size=bs, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  transform=transform)

    def batch_transform(rng, batch):
        k_mix, k_erase = jax.random.split(rng)
        x = data.model_input(batch['image'], config.data)
        if f.reprob > 0:  # per image, before mixing (timm: RandomErasing in the transform, Mixup after)
            x = augment.random_erasing(k_erase, x, prob=f.reprob)
        if f.mixup > 0 or f.cutmix > 0:
            x, target = augment.mixup_cutmix(k_mix, x, batch['label'], mixup_alpha=f.mixup, cutmix_alpha=f.cutmix,
                                             label_smoothing=f.label_smoothing, num_classes=config.num_classes)
        else:
            target = augment.smooth_labels(batch['label'], config.num_classes, f.label_smoothing)
        return dict(batch, image=x, target=target)

    def forward(p, s, aux, batch, rng, train_mode):
        x = data.model_input(batch['image'], config.data)  # eval batches come as centre crops
        return classifier.classifier_apply(graphdef, p, s, x, train=train_mode, drop_key=rng)

    def eval_batches():
        return data.make_eval_iterator(config.data, split=config.data.eval_split, global_batch_size=bs,
                                       process_index=jax.process_index(), process_count=jax.process_count(),
                                       limit=f.max_test)

    task = evaluation.ClassifierTask(
        config, mesh, name=f'fine-tuning ({c.width}x{c.depth}, layer decay {f.layer_decay})', forward=forward,
        init_vars=lambda: (init_params, stats), tx=tx, schedule=schedule, aux=(), total_steps=total,
        steps_per_epoch=spe, eval_batches=eval_batches, eval_every=max(1, int(round(config.eval_every_epochs * spe))),
        loss_fn=lambda logits, batch: augment.soft_cross_entropy(logits, batch['target']),
        batch_transform=batch_transform, eval_size=knn.count(config.data, config.data.eval_split, f.max_test),
        eval_hint='--config.finetune.max_test=N evaluates on the first N')
    res = task.run(workdir, it, stop_after, deadline)
    return dict(res, results={'finetune/top1': task.last.get('top1'), 'finetune/best_top1': task.best['top1']})

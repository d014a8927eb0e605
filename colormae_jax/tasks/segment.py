"""Semantic segmentation transfer (``task=segment``): ColorMAE's ADE20K UperNet recipe on the shared loop.

The pre-trained encoder (``config.init_from``: a workdir, a checkpoint step, an import folder)
becomes the backbone of :class:`segmentation.SegModel` (position table resized to the crop's
grid), trained with AdamW and layer-wise lr decay (:func:`optim.make_finetune_optimizer`),
mmseg's warm-up + poly schedule (:func:`segmentation.lr_schedule`), on
:mod:`colormae_jax.data.segmentation`'s pipeline, by :func:`loop.run` (checkpoints, resume, preemption,
multi-host) through :class:`evaluation.ClassifierTask`. Every ``eval_every_steps`` and at the end:
sliding-window inference over the eval split, aAcc / mIoU / mAcc from areas summed over the
whole split, written to TensorBoard and ``workdir/seg_eval.jsonl``, with pictures of predicted
and true label maps over the image. docs/segmentation.md.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from colormae_jax import config_lib, optim, parallel
from colormae_jax.data import pipeline as data, segmentation as seg_data
from colormae_jax.errors import ConfigError
from colormae_jax.interop import weights
from colormae_jax.models import mae as model_lib, posembed, upernet as seg
from colormae_jax.tasks import evaluation


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(key, msg)


def validate(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad segmentation config (and a folder without its splits or annotations) before compiling."""
    num_devices = num_devices or jax.device_count()
    _check(bool(config.init_from), 'init_from', 'set the pre-trained encoder, e.g. --config.init_from=/tmp/mae (a '
                                                'workdir or its checkpoints/STEP, or a tools.convert import folder)')
    config_lib._validate_run(config, num_devices)
    s, d = config.seg, config.data
    _check(d.source == seg_data.SOURCE, 'data.source', f"{d.source!r}; task=segment reads '{seg_data.SOURCE}'")
    _check(isinstance(d.num_classes, int) and 2 <= d.num_classes <= 255, 'data.num_classes',
           f'must be an int in [2, 255] (255 is the ignore label), got {d.num_classes!r}')
    _check(isinstance(s.crop_size, int) and s.crop_size > 0, 'seg.crop_size', f'must be a positive int, got '
                                                                             f'{s.crop_size!r}')
    _check(0 < s.stride <= s.crop_size, 'seg.stride', f'must be in (0, seg.crop_size={s.crop_size}], got {s.stride}')
    _check(0 < s.ratio_range[0] <= s.ratio_range[1], 'seg.ratio_range', f'must be 0 < lo <= hi, got {s.ratio_range}')
    _check(0 < s.cat_max_ratio <= 1, 'seg.cat_max_ratio', f'must be in (0, 1], got {s.cat_max_ratio}')
    _check(0 < s.layer_decay <= 1, 'seg.layer_decay', f'must be in (0, 1], got {s.layer_decay}')
    _check(0 < s.warmup_start_factor <= 1, 'seg.warmup_start_factor', f'must be in (0, 1], got '
                                                                      f'{s.warmup_start_factor}')
    _check(s.pos_embed in ('interpolate', 'recompute'), 'seg.pos_embed', f"{s.pos_embed!r}; valid: 'interpolate', "
                                                                         "'recompute'")
    _check(len(s.out_indices) == len(s.rescales), 'seg.rescales', f'{len(s.rescales)} rescales for '
                                                                  f'{len(s.out_indices)} out_indices')
    _check(set(s.rescales) <= {4, 2, 1, 0.5, 0.25}, 'seg.rescales', f'{tuple(s.rescales)}; each of 4, 2, 1, 0.5, '
                                                                    f'0.25')
    _check(config.eval_every_steps > 0, 'eval_every_steps', f'must be positive, got {config.eval_every_steps}')
    if check_data:
        if not d.root or not os.path.isdir(d.root):
            seg_data.prepare(d)  # refuses with the folder named
        for split in (d.split, d.eval_split):
            seg_data.list_pairs(d.root, split)


def _seg_config(config, num_classes: int) -> seg.SegConfig:
    s = config.seg
    return seg.SegConfig(num_classes=num_classes, out_indices=tuple(s.out_indices), rescales=tuple(s.rescales),
                         channels=s.channels, pool_scales=tuple(s.pool_scales), aux_channels=s.aux_channels,
                         aux_in_index=s.aux_in_index, dropout=s.dropout, drop_path=s.drop_path,
                         layer_scale=s.layer_scale, rel_pos_bias=s.rel_pos_bias)


def build(config, c: model_lib.MAEConfig, encoder: dict | None):
    """(graphdef, params with the pre-trained encoder put in, stats, backbone MAEConfig)."""
    s = config.seg
    _check(s.crop_size % c.patch == 0, 'seg.crop_size', f'{s.crop_size} is not a multiple of the patch {c.patch}')
    _check(all(0 <= i < c.depth for i in s.out_indices), 'seg.out_indices',
           f'{tuple(s.out_indices)}: the encoder has blocks 0..{c.depth - 1} (an index may repeat)')
    cs = dataclasses.replace(c, image_size=int(s.crop_size), dtype=jnp.dtype(config.model.compute_dtype),
                             attn_impl=config.model.attn_impl, remat=bool(config.model.remat))
    graphdef, params, stats = seg.init_model(cs, _seg_config(config, config.data.num_classes), config.seed)
    if encoder is not None:
        src = encoder.get('pos_embed')
        src = np.asarray(src) if src is not None else model_lib.sincos_table_with_cls(c.grid, c.width)
        table = posembed.pos_table(cs.grid, c.width, src, s.pos_embed)
        try:
            params = seg.load_encoder(params, {k: v for k, v in encoder.items() if k != 'pos_embed'}, table)
        except ValueError as e:
            raise ConfigError('init_from', str(e)) from None
    return graphdef, params, stats, cs


def eval_forward(graphdef, data_cfg):
    """The evaluation's forward, to jit: (params, stats, windows uint8 [n, S, S, 3]) -> logits [n, S, S, K]."""
    def fwd(params, stats, x):
        (logits, _), _ = seg.apply(graphdef, params, stats, data.model_input(x, data_cfg), train=False)
        return seg.resize_bilinear(logits, x.shape[1:3])
    return fwd


def predict(fwd, image: np.ndarray, label_hw, seg_cfg, num_classes: int, windows: int) -> np.ndarray:
    """uint8 [h, w] classes of an image resized as the evaluation's: sliding-window logits
    (``fwd``: windows -> logits), resized (bilinear) to ``label_hw`` (the original size), argmax."""
    logits = seg.slide_logits(fwd, image, crop=seg_cfg.crop_size, stride=seg_cfg.stride, num_classes=num_classes,
                              batch=windows)
    return seg.resize_logits(logits, tuple(label_hw)).argmax(-1).astype(np.uint8)


def picture(image: np.ndarray, label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """The TensorBoard picture [H, 3W, 3]: the image, the true and the predicted labels over it
    (nearest-resized to it); the visualisation tool draws the same."""
    h, w = image.shape[:2]
    return seg.label_picture(image, seg_data.resize_nearest(label, w, h), seg_data.resize_nearest(pred, w, h),
                             num_classes)


class SegTask(evaluation.ClassifierTask):
    """:class:`evaluation.ClassifierTask` with the segmentation evaluation (best mIoU saved)."""
    best_key = 'mIoU'
    report_keys = ('mIoU', 'aAcc', 'mAcc')

    def __init__(self, config, mesh, workdir: str, graphdef, **kw):
        self.workdir, self.graphdef = workdir, graphdef
        super().__init__(config, mesh, **kw)
        c = config
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        self._local_mesh = jax.sharding.Mesh(np.asarray(local), ('data',))
        n = len(local)
        self._windows = max(n, -(-int(c.seg.eval_windows) // n) * n)

        fwd = eval_forward(graphdef, c.data)
        rep = jax.sharding.NamedSharding(self._local_mesh, jax.sharding.PartitionSpec())
        bsh = jax.sharding.NamedSharding(self._local_mesh, jax.sharding.PartitionSpec('data'))
        self._fwd = jax.jit(fwd, in_shardings=(rep, rep, bsh), out_shardings=rep)
        self._rep = rep

    def evaluate(self, state, progress=None) -> dict:
        c = self.config
        k = c.data.num_classes
        if jax.process_count() > 1:  # every process evaluates its own images on its own devices
            local = jax.tree.map(lambda a: np.asarray(a.addressable_data(0)), (state['params'], state['stats']))
        else:
            local = (state['params'], state['stats'])
        params, stats = jax.device_put(local, self._rep)
        areas = np.zeros((4, k), np.float64)
        pictures = []
        for name, img, lab in seg_data.eval_examples(c.data, c.seg, split=c.data.eval_split,
                                                     process_index=jax.process_index(),
                                                     process_count=jax.process_count(), limit=c.seg.eval_max):
            pred = predict(lambda x: self._fwd(params, stats, x), img, lab.shape, c.seg, k, self._windows)
            areas += seg.intersect_and_union(pred, lab, k)
            if len(pictures) < c.seg.pictures:
                pictures.append((name, picture(img, lab, pred, k)))
            if progress is not None:
                progress.update(jax.process_count())
        if jax.process_count() > 1:
            areas = np.asarray(multihost_utils.process_allgather(areas)).sum(0)
        self._pictures = pictures
        return seg.seg_metrics(areas)

    def report(self, step: int, m: dict, writer) -> None:
        if self._pictures:
            writer.write_images(step, {f'eval/labels_{i}': p[None] for i, (_, p) in enumerate(self._pictures)})
        if jax.process_index() == 0 and '://' not in self.workdir:
            os.makedirs(self.workdir, exist_ok=True)
            with open(os.path.join(self.workdir, 'seg_eval.jsonl'), 'a') as f:
                f.write(json.dumps({'step': step, **self.last, 'best_mIoU': self.best['mIoU'],
                                    'IoU': [None if np.isnan(x) else round(float(x), 4) for x in m['IoU']]}) + '\n')
        logging.info('segmentation: step %d, mIoU %.2f, aAcc %.2f, mAcc %.2f (best mIoU %.2f).', step,
                     m['mIoU'], m['aAcc'], m['mAcc'], self.best['mIoU'])


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after: int | None = None,
                       deadline: float | None = None) -> dict:
    validate(config, num_devices=len(devices) if devices is not None else None)
    seg_data.prepare(config.data)  # every pair checked (sizes, label values) before anything is built
    pretrained, c, desc = weights.load_pretrained(config.init_from)
    logging.info('Segmentation (%s classes) on the encoder of %s.', config.data.num_classes, desc)
    graphdef, init_params, stats, cs = build(config, c, pretrained['encoder'])
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    s = config.seg
    total, warmup = config_lib.resolve_steps(config, 'total', 1), config_lib.resolve_steps(config, 'warmup', 1)
    schedule = seg.lr_schedule(config.base_lr, total, warmup, start_factor=s.warmup_start_factor, power=s.poly_power)
    tx = optim.make_finetune_optimizer(schedule, init_params, depth=c.depth, layer_decay=s.layer_decay,
                                       weight_decay=config.wd, b1=config.b1, b2=config.b2,
                                       decay_mask_fn=lambda p: seg.decay_mask(p, s.decay_tokens))
    it = seg_data.make_train_iterator(config.data, s, global_batch_size=config.batch_size, seed=config.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count())

    def forward(params, stats, aux, batch, rng, train_mode):
        x = data.model_input(batch['image'], config.data)
        hw = batch['hw']  # SegDataPreProcessor pads the normalised image with 0
        rows, cols = jnp.arange(x.shape[1]), jnp.arange(x.shape[2])
        inside = (rows[None, :, None] < hw[:, :1, None]) & (cols[None, None, :] < hw[:, 1:, None])
        x = jnp.where(inside[..., None], x, 0.0)
        return seg.apply(graphdef, params, stats, x, train=train_mode, key=rng)

    def loss_fn(logits, batch):
        return seg.seg_loss(*logits, batch['label'], aux_weight=s.aux_weight, avg_non_ignore=s.avg_non_ignore)[0]

    spe = max(1, seg_data.data_source(config.data, config.data.split).__len__() // config.batch_size)
    n_eval = len(seg_data.data_source(config.data, config.data.eval_split))
    task = SegTask(config, mesh, workdir, graphdef,
                   name=f'segmentation (UperNet on {c.width}x{c.depth} at {s.crop_size}, layer decay {s.layer_decay})',
                   forward=forward, init_vars=lambda: (init_params, stats), tx=tx, schedule=schedule, aux=(),
                   total_steps=total, steps_per_epoch=spe, eval_batches=lambda: iter(()),
                   eval_every=int(config.eval_every_steps), loss_fn=loss_fn,
                   eval_size=min(n_eval, s.eval_max) if s.eval_max else n_eval,
                   eval_hint='--config.seg.eval_max=N evaluates on the first N images')
    res = task.run(workdir, it, stop_after, deadline)
    results = {f'seg/{k}': v for k, v in task.last.items()}
    results['seg/best_mIoU'] = task.best['mIoU']
    if jax.process_index() == 0 and '://' not in workdir and not res['preempted']:
        with open(os.path.join(workdir, 'results.json'), 'w') as f:
            json.dump({'task': config.task, 'init_from': config.init_from, 'source': desc, 'step': res['step'],
                       **results}, f, indent=1)
    return dict(res, results=results)

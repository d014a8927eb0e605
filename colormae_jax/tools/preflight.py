r"""Pre-flight check: compile a config's real jitted programs for TPU slices and GPU nodes that are not
attached, and report per device whether they fit, their FLOPs, and bounds on the run's time.

  python -m colormae_jax.tools.preflight --config configs/imagenet.py:mask=famt --topology v5e-16,h100:8
  python -m colormae_jax.tools.preflight --config configs/imagenet_eval.py:task=finetune --topology v5p-64 \
      --json /tmp/ft.json

For each topology the programs of the config's task are built with the config's mesh, shardings,
donation and dtype (pre-training: the step of every masking phase, FAMT's weight pass, the kNN
feature pass; linear probe: the feature pass and the probe's step; fine-tuning: the train and eval
steps; segmentation: the train step and the sliding-window evaluation step), compiled without the
hardware, and reported: memory per device (params + optimizer state, batch, temporaries, peak
against the chip's memory), FLOPs per step (XLA's count and the count of the traced program's
matrix products and convolutions), bytes accessed, compile time, and lower / roofline bounds on
img/s and on the hours of the config's whole schedule. A program that does not fit gets the
smallest change of the config that does (``--config.`` lines to paste), checked by compiling it.

Needs libtpu for TPU (``pip install -e ".[tpu]"``) and the CUDA plugin for NVIDIA GPUs
(``pip install -e ".[cuda]"``). Bad input: one ``error:`` line, exit code 2. SIGTERM: the
results so far stay in ``--json`` and the run exits with 75; the same command resumes (finished
programs are not compiled again). docs/preflight.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
from typing import Any, Callable

# Before JAX starts a backend: the CPU is the host, libtpu may be loaded by several processes, the GPU
# compiler skips Triton GEMMs (whose tiling search needs a GPU: "Couldn't find output tile sizes").
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # compile only: no chip to guard with libtpu's lockfile
if '--xla_gpu_enable_triton_gemm' not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_gpu_enable_triton_gemm=false').strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags, logging  # noqa: E402
from flax import nnx  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from colormae_jax import config_lib, knn, masking, optim, parallel, topologies  # noqa: E402
from colormae_jax.data import augment, pipeline as data  # noqa: E402
from colormae_jax.errors import ConfigError, DataError  # noqa: E402
from colormae_jax.masking import famt  # noqa: E402
from colormae_jax.models import classifier, mae as model_lib, upernet as seg  # noqa: E402
from colormae_jax.tasks import evaluation, linear_probe, pretrain, segment  # noqa: E402

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 75

# Examples per split of the datasets the configs name, for the schedule's step counts without the data.
KNOWN_SPLITS = {
    'imagenet2012': {'train': 1281167, 'validation': 50000},
    'cifar10': {'train': 50000, 'test': 10000},
    'ade20k': {'training': 20210, 'validation': 2000},
}
CPU_FORM_FUNCTIONS = ('_attention_core', '_layer_norm', '_dense')  # models/mae.py's XLA:CPU forms
OOM_MARKERS = ('RESOURCE_EXHAUSTED', 'Ran out of memory', 'out of memory')


@dataclasses.dataclass
class Program:
    """One jitted program of a task, with abstract arguments, and how often the schedule runs it."""
    name: str
    fn: Any                   # a jax.jit object
    args: tuple               # ShapeDtypeStructs with shardings
    examples: int             # global examples per call
    calls: float              # calls over the whole schedule
    train: bool = True        # a training step (the suggestions are about these)
    state_args: int = 1       # the leading args that are params / optimizer state (the rest: batch)


# ------------------------------------------------------------------------------ the programs

def _sds(shape, dtype, sharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def _with(tree, sharding_of: Callable[[Any], Any]):
    return jax.tree.map(lambda x: _sds(x.shape, x.dtype, sharding_of(x)), tree)


def image_batch(n: int, size: int, data_cfg, mesh, extra: dict | None = None) -> dict:
    """A training batch as the grain pipeline hands it over (data/pipeline.py's ``TrainIterator``)."""
    bs = parallel.batch_sharding(mesh)
    dtype = np.uint8 if data_cfg.get('normalize_on', 'device') == 'device' else np.float32
    out = {'image': _sds((n, size, size, 3), dtype, bs), 'label': _sds((n,), np.int32, bs),
           'index': _sds((n,), np.int32, bs), 'crop': _sds((n, 4), np.float32, bs), 'flip': _sds((n,), np.bool_, bs)}
    out.update({k: _sds(v[0], v[1], bs) for k, v in (extra or {}).items()})
    return out


def num_examples(data_cfg, split: str, given: int, required: bool = True) -> int:
    """Examples in ``split``: ``--num_examples``, else the known size of the dataset, else the files of a folder;
    else an error (``required``), or 0 (an evaluation split: its passes are left out of the schedule)."""
    if given:
        return given
    name = (data_cfg.get('name') or '').split(':')[0].split('/')[0]
    if name in KNOWN_SPLITS and split in KNOWN_SPLITS[name]:
        return KNOWN_SPLITS[name][split]
    root = data_cfg.get('root') or ''
    for folder in (os.path.join(root, split), os.path.join(root, 'images', split)):
        if root and os.path.isdir(folder):
            n = sum(1 for _, _, files in os.walk(folder) for f in files
                    if f.lower().endswith(('.jpg', '.jpeg', '.png', '.bmp', '.webp')))
            if n:
                return n
    if data_cfg.get('source') == 'seg_folder' and split in KNOWN_SPLITS['ade20k']:
        return KNOWN_SPLITS['ade20k'][split]
    if not required:
        return 0
    raise ConfigError('data.split', f'the size of split {split!r} ({data_cfg.get("source")} '
                                    f'{data_cfg.get("name") or data_cfg.get("root") or ""!r}) is unknown without '
                                    f'the data; give it with --num_examples=N')


def pretrain_programs(config, mesh, n_train: int, n_eval: int) -> list[Program]:
    """The step of every masking phase, FAMT's weight pass, the kNN feature pass (tasks/pretrain.py)."""
    spe = n_train // config.batch_size
    if spe < 1:
        raise ConfigError('batch_size', f'{config.batch_size} is larger than the dataset ({n_train} examples)')
    t = pretrain.make_trainer(config, mesh, spe)
    rep, bs = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    phases = masking.parse_schedule(config.mask)
    starts = [p.start_step(spe) for p in phases] + [t.total_steps]
    strategies = [masking.create(config.mask, t.mae.grid, p.name, **p.ratios()) for p in phases]
    size, n = config.data.image_size, config.batch_size
    device_data = config.data.get('pipeline', 'grain') == 'device'
    out, seen = [], {}
    for i, s in enumerate(strategies):
        steps = max(0, starts[i + 1] - starts[i])
        if s in seen:
            seen[s].calls += steps
            continue
        key = jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), strategies.index(s))
        aux = jax.eval_shape(s.init_aux, key)
        extra = {}
        if isinstance(s, famt.FAMTMasking):
            if device_data:  # the weight table on the mesh, gathered in the step
                aux = {'table': jax.ShapeDtypeStruct((n_train, t.mae.num_patches), jnp.float32)}
            else:
                extra[famt.WEIGHT_KEY] = ((n, t.mae.num_patches), np.float32)
        aux = _with(aux, lambda _: rep)
        step = pretrain.compile_step(t, s, jax.tree.map(lambda _: rep, aux))
        ratios = f'{s.mask_ratio:g}' + (f'/{s.throw_ratio:g}' if s.throw_ratio else '')
        seen[s] = Program(f'step {s.name} {ratios}', step,
                          (t.abstract_state, image_batch(n, size, config.data, mesh, extra), aux), n, steps)
        out.append(seen[s])
    params = t.abstract_state['params']
    for s in strategies:
        if isinstance(s, famt.FAMTMasking):  # FAMTState.refresh's jitted weight pass, over the training split
            ub = s.update_batch_size or n
            active = [(a, b) for a, b, x in zip(starts, starts[1:], strategies) if x.name == s.name]
            updates = s.update_steps(spe, t.total_steps)
            nexts = updates[1:] + [t.total_steps]
            passes = sum(1 for u, v in zip(updates, nexts) if any(a < v and u < b for a, b in active))

            def weights(p, images, f=s):
                encoder = nnx.merge(t.graphdef, p).encoder
                x = data.model_input(images, config.data)
                return famt.weight_maps(encoder, x.astype(t.mae.dtype), patch=t.mae.patch,
                                        freq_weight=f.freq_weight, freq_sigma=f.freq_sigma)
            fn = jax.jit(weights, out_shardings=bs)
            images = _sds((ub, size, size, 3), np.uint8, bs)
            out.append(Program('FAMT weight pass', fn, (params, images), ub, passes * math.ceil(n_train / ub),
                               train=False))
            break
    kb = config.knn.batch_size or n
    every = int(round(config.knn.every_epochs * spe)) if config.knn.every_epochs else 0
    monitors = (t.total_steps // every + (t.total_steps % every != 0)) if every else 0
    out.append(Program('kNN feature pass', knn.make_feature_fn(t.mae, config.data, mesh),
                       (params['encoder'], _sds((kb, size, size, 3), np.uint8, bs)), kb,
                       monitors * (math.ceil(n_train / kb) + math.ceil(n_eval / kb)), train=False))
    return out


def encoder_config(config, variant: str, dtype: str, image_size: int) -> model_lib.MAEConfig:
    """The pre-trained encoder's MAEConfig (``--encoder``), at ``image_size``."""
    cfg = ml_collections.ConfigDict(dict(
        variant=variant, decoder=dict(width=512, depth=8, heads=16), norm_pix_loss=True, compute_dtype=dtype,
        attn_impl=config.get('model', {}).get('attn_impl', 'auto'), remat=config.get('model', {}).get('remat', False)))
    try:
        return model_lib.mae_config(cfg, image_size)
    except ValueError as e:
        raise ConfigError('--encoder', str(e).split(': ', 1)[-1]) from None


def _steps(config, spe: int) -> tuple[int, int, Any]:
    total = config_lib.resolve_steps(config, 'total', spe)
    warmup = config_lib.resolve_steps(config, 'warmup', spe)
    return total, warmup, optim.make_schedule(config, total, warmup)


def _classifier_programs(task, config, batch: dict, eval_batch: dict, aux, total: int,
                         n_eval: int) -> list[Program]:
    n = config.batch_size
    calls = (total // max(task.eval_every, 1) + 1) * math.ceil(n_eval / n)
    return [Program('train step', task._step, (task.abstract_state, batch, aux), n, total),
            Program('eval step', task._eval, (task.abstract_state, eval_batch, aux), n, calls, train=False)]


def finetune_programs(config, mesh, c: model_lib.MAEConfig, n_train: int, n_eval: int) -> list[Program]:
    """tasks/finetune.py's train and eval steps (AdamW with layer decay, drop path, mixup / cutmix, erasing)."""
    f, n = config.finetune, config.batch_size
    spe = n_train // n
    model = nnx.eval_shape(lambda: classifier.Classifier(c, config.num_classes, pool=f.pool,
                                                         drop_path_rate=f.drop_path,
                                                         learn_pos_embed=f.learn_pos_embed, rngs=nnx.Rngs(0)))
    graphdef, params, stats = classifier.split_classifier(model)
    total, _, schedule = _steps(config, spe)
    tx = optim.make_finetune_optimizer(schedule, params, depth=c.depth, layer_decay=f.layer_decay,
                                       weight_decay=config.wd, b1=config.b1, b2=config.b2)

    def batch_transform(rng, batch):  # as tasks/finetune.py
        k_mix, k_erase = jax.random.split(rng)
        x = data.model_input(batch['image'], config.data)
        if f.reprob > 0:
            x = augment.random_erasing(k_erase, x, prob=f.reprob)
        if f.mixup > 0 or f.cutmix > 0:
            x, target = augment.mixup_cutmix(k_mix, x, batch['label'], mixup_alpha=f.mixup, cutmix_alpha=f.cutmix,
                                             label_smoothing=f.label_smoothing, num_classes=config.num_classes)
        else:
            target = augment.smooth_labels(batch['label'], config.num_classes, f.label_smoothing)
        return dict(batch, image=x, target=target)

    def forward(p, s, aux, batch, rng, train_mode):
        x = data.model_input(batch['image'], config.data)
        return classifier.classifier_apply(graphdef, p, s, x, train=train_mode, drop_key=rng)

    task = evaluation.ClassifierTask(
        config, mesh, name='fine-tuning', forward=forward, init_vars=lambda: (params, stats), tx=tx,
        schedule=schedule, aux=(), total_steps=total, steps_per_epoch=spe, eval_batches=lambda: iter(()),
        eval_every=max(1, int(round(config.eval_every_epochs * spe))),
        loss_fn=lambda logits, batch: augment.soft_cross_entropy(logits, batch['target']),
        batch_transform=batch_transform)
    size, bs = config.data.image_size, parallel.batch_sharding(mesh)
    batch = {k: v for k, v in image_batch(n, size, config.data, mesh).items() if k in ('image', 'label')}
    eval_batch = dict(batch, valid=_sds((n,), np.bool_, bs))
    return _classifier_programs(task, config, batch, eval_batch, (), total, n_eval)


def abstract_encoder(c: model_lib.MAEConfig, mesh) -> dict:
    """The params of a :class:`model.ViTEncoder`, abstract, replicated on ``mesh`` (as the evaluations hold them)."""
    enc = nnx.eval_shape(lambda: model_lib.ViTEncoder(c, rngs=nnx.Rngs(0)))
    return _with(nnx.to_pure_dict(nnx.state(enc, nnx.Param)), lambda _: parallel.replicated(mesh))


def linear_probe_programs(config, mesh, c: model_lib.MAEConfig, n_train: int, n_eval: int) -> list[Program]:
    """tasks/linear_probe.py: the feature pass of the frozen encoder and the probe's steps ('fast': on
    features extracted once; 'faithful': the encoder in every step)."""
    n, dim = config.batch_size, c.width
    bs = parallel.batch_sharding(mesh)
    graphdef, params, stats = linear_probe._probe_vars(dim, config.num_classes, config.seed)
    enc = abstract_encoder(c, mesh)
    spe = n_train // n
    total, _, schedule = _steps(config, spe)
    size = config.data.image_size
    images = _sds((n, size, size, 3), np.uint8, bs)
    out = []
    if config.probe.mode == 'fast':
        out.append(Program('feature pass', knn.make_feature_fn(c, config.data, mesh), (enc, images), n,
                           math.ceil(n_train / n) + math.ceil(n_eval / n), train=False))

        def forward(p, s, aux, batch, rng, train_mode):
            return linear_probe._probe_apply(graphdef, p, s, batch['feat'], train_mode)
        batch = {'feat': _sds((n, dim), np.float32, bs), 'label': _sds((n,), np.int32, bs)}
        aux = ()
    else:
        enc_graph = evaluation.encoder_graph(c, enc)
        pool = config.probe.pool

        def forward(p, s, aux, batch, rng, train_mode):
            x = data.model_input(batch['image'], config.data).astype(c.dtype)
            feats = jax.lax.stop_gradient(model_lib.pooled_features(nnx.merge(enc_graph, aux)(x))[pool])
            return linear_probe._probe_apply(graphdef, p, s, feats, train_mode)
        batch = {'image': images, 'label': _sds((n,), np.int32, bs)}
        aux = enc
    task = evaluation.ClassifierTask(
        config, mesh, name='linear probe', forward=forward, init_vars=lambda: (params, stats),
        tx=optim.make_lars(schedule, weight_decay=config.wd), schedule=schedule, aux=(), total_steps=total,
        steps_per_epoch=spe, eval_batches=lambda: iter(()),
        eval_every=max(1, int(round(config.eval_every_epochs * spe))))
    return out + _classifier_programs(task, config, batch, dict(batch, valid=_sds((n,), np.bool_, bs)), aux,
                                      total, n_eval)


def segment_programs(config, mesh, c: model_lib.MAEConfig, n_train: int, n_eval: int) -> list[Program]:
    """tasks/segment.py: the UperNet train step and the sliding-window evaluation's forward."""
    s, n = config.seg, config.batch_size
    cs = dataclasses.replace(c, image_size=int(s.crop_size), dtype=jnp.dtype(config.model.compute_dtype),
                             attn_impl=config.model.attn_impl, remat=bool(config.model.remat))
    if s.crop_size % c.patch:
        raise ConfigError('seg.crop_size', f'{s.crop_size} is not a multiple of the patch {c.patch}')
    graphdef, params, stats = seg.split_model(nnx.eval_shape(
        lambda: seg.SegModel(cs, segment._seg_config(config, config.data.num_classes), rngs=nnx.Rngs(0))))
    total, warmup = config_lib.resolve_steps(config, 'total', 1), config_lib.resolve_steps(config, 'warmup', 1)
    schedule = seg.lr_schedule(config.base_lr, total, warmup, start_factor=s.warmup_start_factor, power=s.poly_power)
    tx = optim.make_finetune_optimizer(schedule, params, depth=c.depth, layer_decay=s.layer_decay,
                                       weight_decay=config.wd, b1=config.b1, b2=config.b2,
                                       decay_mask_fn=lambda p: seg.decay_mask(p, s.decay_tokens))

    def forward(params, stats, aux, batch, rng, train_mode):  # as tasks/segment.py
        x = data.model_input(batch['image'], config.data)
        hw = batch['hw']
        rows, cols = jnp.arange(x.shape[1]), jnp.arange(x.shape[2])
        inside = (rows[None, :, None] < hw[:, :1, None]) & (cols[None, None, :] < hw[:, 1:, None])
        x = jnp.where(inside[..., None], x, 0.0)
        return seg.apply(graphdef, params, stats, x, train=train_mode, key=rng)

    def loss_fn(logits, batch):
        return seg.seg_loss(*logits, batch['label'], aux_weight=s.aux_weight, avg_non_ignore=s.avg_non_ignore)[0]

    task = segment.SegTask(config, mesh, '', graphdef, name='segmentation', forward=forward,
                           init_vars=lambda: (params, stats), tx=tx, schedule=schedule, aux=(), total_steps=total,
                           steps_per_epoch=max(1, n_train // n), eval_batches=lambda: iter(()),
                           eval_every=int(config.eval_every_steps), loss_fn=loss_fn)
    bs, crop = parallel.batch_sharding(mesh), int(s.crop_size)
    batch = {'image': _sds((n, crop, crop, 3), np.uint8, bs), 'label': _sds((n, crop, crop), np.uint8, bs),
             'hw': _sds((n, 2), np.int32, bs)}
    fwd, local = task._fwd, task._local_mesh
    if len({d.process_index for d in mesh.devices.flat}) > 1:
        # Each process evaluates on its own devices. libtpu cannot compile for a part of a multi-host
        # compile-only slice (it aborts), so the same program goes to one host's worth of the same chip.
        local = jax.sharding.Mesh(np.asarray(one_host(mesh.devices.flat[0], len(task._local_mesh.devices.flat))),
                                  ('data',))
        rep = jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec())
        fwd = jax.jit(segment.eval_forward(graphdef, config.data),
                      in_shardings=(rep, rep, jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec('data'))),
                      out_shardings=rep)
    lrep = jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec())
    windows = _sds((task._windows, crop, crop, 3), np.uint8,
                   jax.sharding.NamedSharding(local, jax.sharding.PartitionSpec('data')))
    # windows per evaluation image: a 4:3 image resized to the short side of seg.scale
    short = int(min(s.scale))
    per_image = len(seg.slide_windows(short, short * 4 // 3, crop, int(s.stride)))
    evals = total // max(int(config.eval_every_steps), 1) + 1
    return [Program('train step', task._step, (task.abstract_state, batch, ()), n, total),
            Program('eval windows', fwd, (_with(params, lambda _: lrep), _with(stats, lambda _: lrep),
                                                windows), task._windows,
                    evals * math.ceil(n_eval * per_image / task._windows), train=False, state_args=2)]


def one_host(device, n: int) -> list:
    """``n`` compile-only devices of one host of ``device``'s kind (TPU: a 2x2 board; GPU: a node)."""
    k = topologies.TPU_DEVICE_KINDS.get(device.device_kind) if device.platform == 'tpu' else None
    if k:
        return topologies.resolve(f'{k}:2x2x1' if k in topologies.TPU_3D else f'{k}:2x2').devices[:n]
    for k, text in topologies.GPU_TARGET_CONFIGS.items():
        if device.platform == 'gpu' and device.device_kind in text:
            return topologies.resolve(f'{k}:{n}').devices
    raise ConfigError('--topology', f'no one-host topology known for {device.device_kind!r}')


def programs_for(config, mesh, opts: dict) -> list[Program]:
    task = config.get('task', 'pretrain')
    if task == 'pretrain':
        n_train = num_examples(config.data, config.data.split, opts['num_examples'])
        n_eval = num_examples(config.data, config.data.eval_split, 0, False) if config.knn.every_epochs else 0
        return pretrain_programs(config, mesh, n_train, n_eval)
    if task in ('finetune', 'linear_probe', 'knn'):
        n_train = num_examples(config.data, config.data.split, opts['num_examples'])
        n_eval = num_examples(config.data, config.data.eval_split, 0, False)
        c = encoder_config(config, opts['encoder'], opts['encoder_dtype'], config.data.image_size)
        if task == 'finetune':
            return finetune_programs(config, mesh, c, n_train, n_eval)
        if task == 'linear_probe':
            return linear_probe_programs(config, mesh, c, n_train, n_eval)
        kb = config.knn.batch_size or config.batch_size
        enc = abstract_encoder(c, mesh)
        images = _sds((kb, config.data.image_size, config.data.image_size, 3), np.uint8,
                      parallel.batch_sharding(mesh))
        return [Program('feature pass', knn.make_feature_fn(c, config.data, mesh), (enc, images), kb,
                        math.ceil(n_train / kb) + math.ceil(n_eval / kb), train=False)]
    if task == 'segment':
        n_train = num_examples(config.data, config.data.split, opts['num_examples'])
        n_eval = num_examples(config.data, config.data.eval_split, 0, False)
        c = encoder_config(config, opts['encoder'], opts['encoder_dtype'], 224)
        return segment_programs(config, mesh, c, n_train, n_eval)
    raise ConfigError('task', f'{task!r}; the pre-flight check knows pretrain, finetune, linear_probe, knn, segment')


def validate(config, n_devices: int) -> None:
    """The task's own checks, without the data (a placeholder ``init_from`` for the evaluations)."""
    task = config.get('task', 'pretrain')
    if task == 'pretrain':
        pretrain.validate(config, num_devices=n_devices, check_data=False)
        return
    c = config.copy_and_resolve_references()
    with c.unlocked():
        c.init_from = c.init_from or '(pre-flight)'
    if task == 'segment':
        segment.validate(c, num_devices=n_devices, check_data=False)
    else:
        evaluation.validate(c, num_devices=n_devices, check_data=False)


# ------------------------------------------------------------------------------ counting

def _subjaxprs(params: dict):
    for v in params.values():
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            inner = getattr(x, 'jaxpr', x)
            if hasattr(inner, 'eqns'):
                yield inner


def count(jaxpr) -> tuple[float, float]:
    """(FLOPs, bytes) of the matrix products and convolutions of a traced program, 2 FLOPs per
    multiply-add, the bytes of their operands and results; scans times their length, a cond's
    largest branch. Global: the whole batch, before XLA partitions it."""
    flops = nbytes = 0.0
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in ('dot_general', 'conv_general_dilated'):
            out = e.outvars[0].aval
            io = sum(math.prod(v.aval.shape) * v.aval.dtype.itemsize for v in (*e.invars, *e.outvars)
                     if hasattr(v.aval, 'shape'))
            if name == 'dot_general':
                (lc, _), _ = e.params['dimension_numbers']
                k = math.prod(e.invars[0].aval.shape[d] for d in lc)
            else:
                rhs = e.invars[1].aval.shape
                k = math.prod(rhs) / rhs[e.params['dimension_numbers'].rhs_spec[0]]
            flops += 2.0 * math.prod(out.shape) * k
            nbytes += io
            continue
        subs = list(_subjaxprs(e.params))
        if not subs:
            continue
        counted = [count(s) for s in subs]
        if name == 'cond':
            f, b = max(counted)
        else:
            f, b = sum(x[0] for x in counted), sum(x[1] for x in counted)
        times = e.params.get('length', 1) if name == 'scan' else 1
        flops, nbytes = flops + f * times, nbytes + b * times
    return flops, nbytes


def shard_bytes(tree) -> int:
    """Bytes per device of abstract arrays with shardings (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def cpu_forms_in(lowered) -> list[str]:
    """The XLA:CPU layer forms (models/mae.py) that a lowered program holds."""
    text = lowered.as_text(debug_info=True)
    return [f for f in CPU_FORM_FUNCTIONS if re.search(rf'\b{f}(_fwd|_bwd)?\b', text)]


def _num(x: float | None) -> str:
    """3 significant digits, whole numbers from 1000 on."""
    return '-' if x is None else (f'{x:,.0f}' if abs(x) >= 1000 else f'{x:.3g}')


def _gib(x: float | None) -> str:
    return '-' if x is None else _num(x / topologies.GiB)


_UNITS = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}


def _oom_bytes(msg: str, args_bytes: float) -> float | None:
    """The memory XLA says an out-of-memory program needs, from its message: 'Used 52.03G of 15.75G hbm'
    (everything), or 'the total memory required for HLO temporaries (21.52G) exceeds ...' (plus the arguments)."""
    m = re.search(r'Used ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm', msg)
    if m:
        return float(m[1]) * _UNITS[m[2]]
    m = re.search(r'required for HLO temporaries \(([0-9.]+)([KMGT]?)\)', msg)
    if m:
        return float(m[1]) * _UNITS[m[2]] + args_bytes
    return None


# ------------------------------------------------------------------------------ compiling

class Interrupted(Exception):
    """SIGTERM arrived while compiling."""


_STOP = threading.Event()


def _blocking(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a worker thread, so that SIGTERM is seen within a second however long XLA compiles."""
    box: dict = {}

    def run():
        try:
            box['out'] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            box['err'] = e
    th = threading.Thread(target=run, daemon=True)
    th.start()
    while th.is_alive():
        th.join(0.5)
        if _STOP.is_set():
            raise Interrupted
    if 'err' in box:
        raise box['err']
    return box['out']


def compile_program(p: Program, target: topologies.Target, mesh) -> dict:
    """Traces (with the layer forms of the mesh's platform), lowers and compiles ``p``; memory, FLOPs, bytes."""
    n_dev = len(target.devices)
    row: dict[str, Any] = {'program': p.name, 'examples': p.examples, 'calls': p.calls, 'train': p.train}
    with model_lib.forms_for(mesh):
        traced = p.fn.trace(*p.args)
    flops, nbytes = count(traced.jaxpr)
    lowered = traced.lower()
    row.update(analytic_tflop=flops / 1e12, analytic_bytes_per_device=nbytes / n_dev,
               cpu_forms=cpu_forms_in(lowered),
               state_bytes=shard_bytes(p.args[:p.state_args]), batch_bytes=shard_bytes(p.args[p.state_args:]))
    t0 = time.perf_counter()
    try:
        compiled = _blocking(lowered.compile)
    except jax.errors.JaxRuntimeError as e:
        msg = str(e)
        if not any(m in msg for m in OOM_MARKERS):
            raise
        row.update(compile_s=time.perf_counter() - t0, fits=False, refused=msg.splitlines()[0][:300],
                   peak_bytes=_oom_bytes(msg, row['state_bytes'] + row['batch_bytes']), temp_bytes=None)
        return row
    row['compile_s'] = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    peak = getattr(mem, 'peak_memory_in_bytes', 0) or 0
    used = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    row.update(temp_bytes=mem.temp_size_in_bytes, peak_bytes=max(peak, used))
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    row['xla_tflop_per_device'] = cost.get('flops') / 1e12 if cost and cost.get('flops') else None
    row['xla_bytes_per_device'] = cost.get('bytes accessed') if cost else None
    row['fits'] = row['peak_bytes'] <= target.chip.memory_bytes
    return row


def bounds(row: dict, target: topologies.Target) -> dict:
    """Seconds per call: FLOPs at the bf16 peak (lower), and max(FLOPs / peak, bytes / bandwidth) (roofline)."""
    n_dev, chip = len(target.devices), target.chip
    flops = (row.get('xla_tflop_per_device') or row['analytic_tflop'] / n_dev) * 1e12
    nbytes = row.get('xla_bytes_per_device') or row['analytic_bytes_per_device']
    lower = flops / chip.peak_flops
    roof = max(lower, nbytes / chip.bandwidth)
    return {'lower_s': lower, 'roofline_s': roof, 'img_s_upper': row['examples'] / lower if lower else None,
            'img_s_roofline': row['examples'] / roof if roof else None}


# ------------------------------------------------------------------------------ suggestions

def candidates(config, n_devices: int) -> list[tuple[str, dict]]:
    """Changes the config offers, smallest first: the fsdp axis, gradient accumulation, remat, their
    pairs, then a smaller batch. Each: (the --config. lines, {dotted key: value})."""
    task = config.get('task', 'pretrain')
    per_device = config.batch_size // n_devices
    sizes = dict((str(a), int(b)) for a, b in config.mesh)
    out = []
    fsdp = [k for k in (2, 4, 8, 16, 32, 64) if k <= n_devices and n_devices % k == 0] \
        if sizes.get('fsdp', 1) == 1 else []
    accum = [k for k in (2, 4, 8, 16) if per_device % k == 0 and per_device // k >= 1] \
        if config.get('grad_accum_steps', 1) == 1 else []
    remat = task in ('pretrain', 'segment') and not config.model.get('remat', False)

    def mesh_item(k):
        return 'mesh', (('data', -1), ('fsdp', k))
    singles = [dict([mesh_item(k)]) for k in fsdp] + [{'grad_accum_steps': k} for k in accum] + \
        ([{'model.remat': True}] if remat else [])
    out += singles
    if remat:
        out += [dict([mesh_item(k)], **{'model.remat': True}) for k in fsdp]
        out += [{'grad_accum_steps': k, 'model.remat': True} for k in accum]
    out += [dict([mesh_item(a)], grad_accum_steps=b) for a in fsdp for b in accum]
    out += [{'batch_size': config.batch_size // k} for k in (2, 4, 8)
            if config.batch_size // k >= n_devices and (config.batch_size // k) % n_devices == 0]
    return [(override_lines(c), c) for c in out]


def override_lines(change: dict) -> str:
    def fmt(v):
        if isinstance(v, tuple):
            return '"' + repr(v) + '"'
        return repr(v) if isinstance(v, str) else str(v)
    return ' '.join(f'--config.{k}={fmt(v)}' for k, v in change.items())


def apply_change(config, change: dict):
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for key, value in change.items():
            node = c
            *parents, last = key.split('.')
            for p in parents:
                node = node[p]
            node[last] = value
    return c


def estimate(row: dict, change: dict, n_devices: int, config) -> float | None:
    """A rough peak after ``change`` (to skip changes that cannot fit before compiling them): the state,
    and the temporaries that follow it (gradients, the optimizer's update: up to twice the params), over the
    fsdp axis; the other temporaries (activations) over accumulation, remat and the batch."""
    peak = row.get('peak_bytes')
    if peak is None:
        return None
    state, batch = row['state_bytes'], row['batch_bytes']
    temps = max(peak - state - batch, 0.0)
    with_params = min(temps, 2 * state / 3)  # Adam's state is three params-sized trees
    act = temps - with_params
    k = dict((str(a), int(b)) for a, b in change.get('mesh', ())).get('fsdp', 1)
    smaller = config.batch_size / change.get('batch_size', config.batch_size)
    act = act / (change.get('grad_accum_steps', 1) * smaller) * (0.3 if change.get('model.remat') else 1.0)
    return (state + with_params) / k + batch / smaller + act


# ------------------------------------------------------------------------------ the run

class Results:
    """The JSON written as each program finishes; an earlier file of the same command resumes."""

    def __init__(self, path: str, header: dict):
        self.path, self.header = path, header
        self.doc = dict(header, targets={})
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    old = json.load(f)
                if old.get('key') == header['key']:
                    self.doc['targets'] = old.get('targets', {})
            except (OSError, ValueError):
                pass

    def done(self, target: str, key: str) -> dict | None:
        return self.doc['targets'].get(target, {}).get('rows', {}).get(key)

    def target(self, name: str) -> dict:
        return self.doc['targets'].setdefault(name, {'rows': {}})

    def save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        tmp = self.path + '.tmp'
        with open(tmp, 'w') as f:
            json.dump(self.doc, f, indent=1, default=float)
        os.replace(tmp, self.path)


def mesh_for(config, target: topologies.Target) -> jax.sharding.Mesh:
    """The config's mesh over the target's devices (topology-aware order), after the batch checks."""
    n_dev = len(target.devices)
    try:
        names, sizes = parallel.mesh_shape(config.mesh, n_dev)
    except ValueError as e:
        raise ConfigError('mesh', str(e)) from None
    if config.batch_size % target.processes:
        raise ConfigError('batch_size', f'{config.batch_size} is not divisible by the {target.processes} hosts of '
                                        f'{target.name}; use a multiple of {target.processes * n_dev}')
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names), devices=target.devices)


def check_target(config, target: topologies.Target, opts: dict, results: Results, log=print,
                 change_key: str = '') -> dict:
    """Every program of ``config`` on ``target``: rows (cached in ``results``), and whether all fit."""
    n_dev = len(target.devices)
    mesh = mesh_for(config, target)
    validate(config, n_dev)
    progs = [p for p in programs_for(config, mesh, opts) if not opts['programs'] or p.name in opts['programs']
             or p.name.split()[0] in opts['programs']]
    rows, times = [], [r['compile_s'] for r in results.target(target.name)['rows'].values() if 'compile_s' in r]
    for i, p in enumerate(progs):
        key = change_key + p.name
        row = results.done(target.name, key)
        if _STOP.is_set():
            raise Interrupted
        if row is None:
            eta = f', about {np.mean(times) * (len(progs) - i):.0f} s left' if times else ''
            with_change = f' with {change_key.rstrip(" |")}' if change_key else ''
            log(f'compiling {i + 1}/{len(progs)} for {target.name}: {p.name}{with_change}{eta}')
            row = compile_program(p, target, mesh)
            row.update(bounds(row, target))
            row['change'] = change_key
            times.append(row['compile_s'])
            results.target(target.name)['rows'][key] = row
            results.save()
        rows.append(row)
    return {'rows': rows, 'fits': all(r['fits'] for r in rows), 'per_process_batch': config.batch_size //
            target.processes, 'per_device_batch': config.batch_size / n_dev}


def suggest(config, target, opts, results, failing: list[dict], log=print) -> dict | None:
    """The first change (in :func:`candidates` order) whose failing programs compile and fit."""
    n_dev, cap = len(target.devices), target.chip.memory_bytes
    names = [r['program'] for r in failing]
    tried = 0
    for lines, change in candidates(config, n_dev):
        est = [estimate(r, change, n_dev, config) for r in failing]
        if any(e is not None and e > 1.15 * cap for e in est):
            continue
        try:
            changed = apply_change(config, change)
            validate(changed, n_dev)
        except (ConfigError, ValueError):
            continue
        if tried >= opts['max_tries']:
            break
        tried += 1
        o = dict(opts, programs=names)
        res = check_target(changed, target, o, results, log, change_key=lines + ' | ')
        if res['fits']:
            return {'overrides': lines, 'rows': res['rows'],
                    'peak_bytes': max(r['peak_bytes'] for r in res['rows'])}
    return None


def slices(target: topologies.Target) -> list[str]:
    """Slices of the target's chip from the smallest up to the target's size, as names."""
    return slice_names(target.chip.kind, target.platform, len(target.devices))


def slice_names(kind: str, platform: str, n: int) -> list[str]:
    """Slices of ``kind`` from the smallest up to ``n`` devices, as names (v5e-4, v5e-8, ...; h100:1, ...)."""
    if platform == 'tpu':
        per = 2 if kind in topologies.TPU_3D else 1  # Cloud names count TensorCores on v4 / v5p
        sizes = [4 * 2 ** i for i in range(12) if 4 * 2 ** i <= n]
        return [f'{kind}-{c * per}' for c in sizes]
    gpus = [g for g in (1, 2, 4, 8) if g <= n]
    return [f'{kind}:{g}' for g in gpus] + [f'{kind}:{h}x8' for h in (2, 4, 8, 16, 32) if h * 8 <= n]


def estimate_on(rows: list[dict], n_now: int, n_then: int, config) -> float:
    """A program's peak on ``n_then`` devices of the same chip, from its compile on ``n_now``: the state and
    its gradients stay (data parallel), the rest follows the batch per device."""
    out = 0.0
    for r in rows:
        if r.get('peak_bytes') is None:
            continue
        fixed = r['state_bytes'] * 4 / 3
        out = max(out, fixed + max(r['peak_bytes'] - fixed, 0.0) * n_now / n_then)
    return out


def smallest(config, target, res, opts, results, configs, peaks, log=print) -> dict | None:
    """The smallest slice of the target's chip that the estimate says holds every program, checked by
    compiling it (going up a size while it does not)."""
    names = slices(target)
    n_now, cap = len(target.devices), target.chip.memory_bytes
    for name in names:
        if name == target.name or topologies.parse(name) == topologies.parse(target.name):
            return {'name': target.name, 'compiled': True, 'fits': res['fits'],
                    'peak_bytes': max(r.get('peak_bytes') or 0 for r in res['rows'])} if res['fits'] else None
        smaller = topologies.resolve(name, configs, peaks)
        n = len(smaller.devices)
        if config.batch_size % n or estimate_on(res['rows'], n_now, n, config) > 0.95 * cap:
            continue
        try:
            mesh_for(config, smaller)
            validate(config, n)
        except (ConfigError, ValueError):
            continue
        r = check_target(config, smaller, opts, results, log)
        if r['fits']:
            return {'name': name, 'compiled': True, 'fits': True,
                    'peak_bytes': max(x.get('peak_bytes') or 0 for x in r['rows'])}
    return None


def schedule_hours(rows: list[dict]) -> dict:
    lower = sum(r['calls'] * r['lower_s'] for r in rows) / 3600
    roof = sum(r['calls'] * r['roofline_s'] for r in rows) / 3600
    return {'lower_h': lower, 'roofline_h': roof}


def report(target: topologies.Target, res: dict, out=sys.stdout) -> None:
    chip = target.chip
    w = out.write
    w(f'\n{target.describe()}: per device {chip.memory_bytes / topologies.GiB:.1f} GiB, '
      f'{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 peak, {chip.bandwidth / 1e9:.0f} GB/s HBM; batch '
      f'{res["per_process_batch"]} per host, {res["per_device_batch"]:g} per device\n')
    head = ('program', 'fits', 'peak GiB', 'state', 'batch', 'temp', 'TFLOP/call XLA', 'analytic',
            'GB/device', 'compile s', 'img/s (roofline - peak)')
    table = [head]
    n_dev = len(target.devices)
    for r in res['rows']:
        xla = r.get('xla_tflop_per_device')
        fits = 'yes' if r['fits'] else 'NO'
        table.append((r['program'], fits, f'{_gib(r.get("peak_bytes"))} / {chip.memory_bytes / topologies.GiB:.1f}',
                      _gib(r['state_bytes']), _gib(r['batch_bytes']), _gib(r.get('temp_bytes')),
                      _num(xla * n_dev) if xla else '-', _num(r['analytic_tflop']),
                      _num((r.get('xla_bytes_per_device') or r['analytic_bytes_per_device']) / 1e9),
                      f'{r["compile_s"]:.0f}',
                      f'{_num(r["img_s_roofline"])} - {_num(r["img_s_upper"])}' if r.get('img_s_upper') else '-'))
    widths = [max(len(str(x[i])) for x in table) for i in range(len(head))]
    for line in table:
        w('  ' + '  '.join(str(x).ljust(widths[i]) for i, x in enumerate(line)).rstrip() + '\n')
    for r in res['rows']:
        if r.get('refused'):
            w(f'  {r["program"]}: XLA refused it: {r["refused"]}\n')
        if r.get('cpu_forms'):
            w(f'  {r["program"]}: holds XLA:CPU layer forms {r["cpu_forms"]} (a bug: report it)\n')
    h = res['hours']
    w(f'  whole schedule: at least {_num(h["roofline_h"])} h (roofline), {_num(h["lower_h"])} h (FLOPs at peak); '
      f'bounds from the peak figures above, not measurements\n')
    if res.get('smallest'):
        sm = res['smallest']
        w(f'  smallest {chip.kind} slice that holds it: {sm["name"]} (compiled, peak {_gib(sm["peak_bytes"])} GiB)\n')
    if not res['fits']:
        s = res.get('suggestion')
        if s:
            w(f'  does not fit; smallest change that fits (compiled, peak {_gib(s["peak_bytes"])} GiB):\n'
              f'    {s["overrides"]}\n')
        elif res.get('suggest_tried'):
            w('  does not fit, and no change tried fits: use a larger slice\n')


# ------------------------------------------------------------------------------ command line

# Flags of their own: colormae_jax.cli defines --config and --verbose too, and both may be imported in one process.
FLAGS = flags.FlagValues()
_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/imagenet.py:mask=famt',
                                          lock_config=True, flag_values=FLAGS)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'Comma-separated: v5e:4x4, v5e-16, v4-32, v5p-64, v6e:2x2, '
                                                  'h100:8, h200:2x8 (hosts x GPUs), a100:1, ...', flag_values=FLAGS)
_JSON = flags.DEFINE_string('json', '', 'Write the results here (JSON), program by program; the same command '
                                        'with the same file resumes.', flag_values=FLAGS)
_ENCODER = flags.DEFINE_string('encoder', 'B/16', 'The pre-trained encoder of an evaluation config (its init_from '
                                                  'is not read).', flag_values=FLAGS)
_ENCODER_DTYPE = flags.DEFINE_enum('encoder_dtype', 'bfloat16', ['float32', 'bfloat16'],
                                   "The encoder's compute dtype in fine-tuning and the probe (its pre-training's).",
                                   flag_values=FLAGS)
_NUM_EXAMPLES = flags.DEFINE_integer('num_examples', 0, 'Examples in the training split, when the dataset is '
                                                        'not one of the known ones (for the schedule).', lower_bound=0,
                                                        flag_values=FLAGS)
_TARGET_CONFIG = flags.DEFINE_multi_string('target_config', [], 'KIND=FILE: a GpuTargetConfig text proto for a GPU '
                                                                'kind (built in: a100, h100, h200).', flag_values=FLAGS)
_PEAK = flags.DEFINE_multi_string('peak_tflops', [], 'KIND=TFLOPS: the dense bf16 peak of a GPU kind given by '
                                                     '--target_config.', flag_values=FLAGS)
_SUGGEST = flags.DEFINE_bool('suggest', True, 'When a program does not fit, find the smallest change that does.',
                             flag_values=FLAGS)
_MAX_TRIES = flags.DEFINE_integer('max_tries', 4, 'Changes compiled at most per topology when looking for one '
                                                  'that fits.', lower_bound=1, flag_values=FLAGS)
_PROGRAMS = flags.DEFINE_list('programs', [], "Only these programs (e.g. 'step', 'train', 'eval'; default all).",
                              flag_values=FLAGS)
_SMALLEST = flags.DEFINE_bool('smallest', False, 'Also find the smallest slice of the same chip that holds the '
                                                 'programs (estimated from the memory per device, then compiled).',
                                                 flag_values=FLAGS)
_TABLE = flags.DEFINE_bool('table', False, 'Print the docs table (markdown) of the --json files given as arguments '
                                           'instead of compiling.', flag_values=FLAGS)
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Tracebacks instead of one-line errors.', flag_values=FLAGS)


class UsageError(ValueError):
    pass


def _peaks(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        kind, eq, v = item.partition('=')
        try:
            out[kind.strip().lower()] = float(v) * 1e12
        except ValueError:
            raise UsageError(f'--peak_tflops={item}: expected KIND=TFLOPS, e.g. --peak_tflops=b200=2250') from None
    return out


def _command(argv: list[str]) -> str:
    """The command line without --json (and its value)."""
    out, skip = [], False
    for a in argv[1:]:
        if skip or a.startswith('--json'):
            skip = a == '--json' and not skip
            continue
        key, eq, value = a.partition('=')
        out.append(f'{key}="{value}"' if eq and "'" in value and '"' not in value else shlex.quote(a))
    return 'python -m colormae_jax.tools.preflight ' + ' '.join(out)


def table(paths: list[str], out=sys.stdout) -> None:
    """The docs table: one row per config and topology of the given result files (their step programs)."""
    w = out.write
    w('| config | hardware | fits? | peak GiB per device | TFLOP per step | img/s (roofline - peak) | hours for the '
      'schedule (roofline - peak) | smallest slice that holds it | compile s |\n')
    w('| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n')
    for path in paths:
        with open(path) as f:
            doc = json.load(f)
        words = shlex.split(doc['command'])
        arg = ' '.join([words[words.index('--config') + 1] if '--config' in words else
                        next(w.split('=', 1)[1] for w in words if w.startswith('--config='))] +
                       [w for w in words if w.startswith('--config.')])
        for name, t in doc['targets'].items():
            if 'chip' not in t:  # a slice compiled only to find the smallest, or a change tried
                continue
            rows = [r for k, r in t['rows'].items() if not r.get('change')]
            train = [r for r in rows if r.get('train', True)] or rows
            peak = max(r.get('peak_bytes') or 0 for r in train)
            flops = ', '.join(_num((r.get('xla_tflop_per_device') or 0) * t['devices'] or r['analytic_tflop'])
                              for r in train)
            img = ', '.join(f'{_num(r["img_s_roofline"])} - {_num(r["img_s_upper"])}' for r in train)
            h = t['hours']
            fits = 'yes' if t['fits'] else 'no'
            if not t['fits'] and t.get('suggestion'):
                fits += f' (fits with `{t["suggestion"]["overrides"]}`: {_gib(t["suggestion"]["peak_bytes"])} GiB)'
            sm = t.get('smallest')
            cap = t['chip']['memory_bytes'] / topologies.GiB
            if sm:
                sm = sm['name']
            else:  # estimated from the memory per device of these compiles (data parallel)
                chip, n = t['chip'], t['devices']
                names = slice_names(chip['kind'], chip['platform'], 1024)
                counts = [int(re.split(r'[-:x]', x)[-1]) * (int(x.split(':')[1].split('x')[0]) if 'x' in x else 1)
                          for x in names]
                if chip['platform'] == 'tpu' and chip['kind'] in topologies.TPU_3D:
                    counts = [c // 2 for c in counts]
                rows_all = [r for r in rows if r.get('peak_bytes')]
                fit = [x for x, c in zip(names, counts) if doc['config']['batch_size'] % c == 0 and
                       estimate_on(rows_all, n, c, None) <= 0.95 * chip['memory_bytes']]
                same = fit and counts[names.index(fit[0])] == n
                sm = '-' if not (fit and rows_all) else f'{fit[0]} (this one)' if same and t['fits'] else \
                    f'{fit[0]} (estimated)'

            secs = ', '.join(f'{r["compile_s"]:.0f}' for r in rows)
            w(f'| `{arg}` | {name} ({t["devices"]} x {t["chip"]["name"]}) | {fits} | {_gib(peak)} of {cap:.1f} | '
              f'{flops} | {img} | {_num(h["roofline_h"])} - {_num(h["lower_h"])} | '
              f'{sm} | {secs} |\n')


def run(argv: list[str]) -> int:
    if _TABLE.value:
        table(argv[1:])
        return 0
    if len(argv) > 1:
        raise UsageError(f'{argv[1]}: unexpected argument; flags take the form --name=value')
    if _CONFIG.value is None:
        raise UsageError('--config: missing; give it, e.g. --config=configs/imagenet.py:mask=random')
    config = _CONFIG.value
    names = topologies.split_names(_TOPOLOGY.value or '')
    parsed = [topologies.parse(n) for n in names]  # every name checked before anything compiles
    for (platform, _, _), n in zip(parsed, names):
        topologies.check_plugin(platform, n)
    configs = topologies.read_target_configs(_TARGET_CONFIG.value)
    peaks = _peaks(_PEAK.value)
    for (platform, kind, _), n in zip(parsed, names):
        if platform == 'gpu' and kind not in configs:
            topologies.resolve(n, configs, peaks)  # raises with the kinds that have one
    opts = dict(encoder=_ENCODER.value, encoder_dtype=_ENCODER_DTYPE.value, num_examples=_NUM_EXAMPLES.value,
                max_tries=_MAX_TRIES.value, programs=list(_PROGRAMS.value))
    argv_full = sys.argv
    header = {'key': json.dumps([config.to_dict(), opts], sort_keys=True, default=str),
              'command': _command(argv_full), 'config': config.to_dict(),
              'date': datetime.date.today().isoformat(), 'jax': jax.__version__,
              'note': 'time figures are bounds from peak figures (FLOPs at the bf16 peak; roofline with HBM '
                      'bandwidth), not measurements'}
    results = Results(_JSON.value, header)

    def log(msg):
        logging.info('%s', msg)

    targets = [topologies.resolve(n, configs, peaks) for n in names]
    for target in targets:  # every target's mesh, batch and config checked before anything compiles
        mesh_for(config, target)
        validate(config, len(target.devices))
    for n, target in zip(names, targets):
        res = check_target(config, target, opts, results, log)
        res['hours'] = schedule_hours(res['rows'])
        entry = results.target(n)
        entry.update(topology=target.topology, chip=dataclasses.asdict(target.chip), devices=len(target.devices),
                     processes=target.processes, fits=res['fits'], hours=res['hours'],
                     per_process_batch=res['per_process_batch'], per_device_batch=res['per_device_batch'])
        if not res['fits'] and _SUGGEST.value:
            failing = [r for r in res['rows'] if not r['fits'] and r.get('train', True)] or \
                [r for r in res['rows'] if not r['fits']]
            res['suggestion'] = suggest(config, target, opts, results, failing, log)
            res['suggest_tried'] = True
            entry['suggestion'] = res['suggestion'] and {k: v for k, v in res['suggestion'].items() if k != 'rows'}
        if _SMALLEST.value:
            res['smallest'] = entry['smallest'] = smallest(config, target, res, opts, results, configs, peaks, log)
        results.save()
        report(target, res)
    sys.stdout.write('\nTime figures are bounds from the peak figures (FLOPs at the bf16 peak; the roofline adds '
                     'HBM bandwidth), not measurements.\n')
    sys.stdout.flush()
    return 0


def _on_sigterm(signum, frame):
    _STOP.set()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    verbose = '--verbose' in argv or os.environ.get('COLORMAE_VERBOSE', '') in ('1', 'true')
    if any(a in ('-h', '--help', '-help', '--helpshort', '-helpshort', '--helpfull', '-?') for a in argv[1:]):
        sys.stdout.write(f'{(__doc__ or "").strip()}\n\nflags:\n{FLAGS.get_help()}\n')
        sys.exit(0)
    try:
        rest = FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - absl and config_flags raise what their parsers raise
        if verbose:
            raise
        msg = ' '.join(str(e).split())
        sys.stderr.write(f'error: {msg}; see --helpshort\n')
        sys.exit(EXIT_USER_ERROR)
    logging.set_verbosity(logging.INFO)
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = run(rest)
    except Interrupted:
        sys.stderr.write(f'stopped by SIGTERM; the finished programs are in {_JSON.value or "(no --json)"}: run the '
                         f'same command to go on\n')
        code = EXIT_PREEMPTED
    except (UsageError, ConfigError, DataError, topologies.TopologyError) as e:
        if verbose:
            raise
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        sys.stderr.write('error: ' + '; '.join(lines) + '\n')
        code = EXIT_USER_ERROR
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a compile still running in its thread (SIGTERM) is not waited for


if __name__ == '__main__':
    main()

"""Pre-training: train state, optimizer, the jitted step, and the loop.

The step is a pure function of ``(state, batch, mask_aux)``, jit-compiled once per masking
strategy with the state donated and every input and output placed by a NamedSharding on
the config's mesh. Randomness is ``fold_in(PRNGKey(seed), step)``: no key is carried in
the state, so a resumed run draws exactly the masks an uninterrupted run would.
"""
from __future__ import annotations

import functools
import math
import os
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from colormae_jax import checkpoint as ckpt_lib
from colormae_jax import config_lib, data, masking, metrics, model as model_lib, parallel
from colormae_jax.metrics import periodic_actions

Batch = dict[str, jax.Array]


# ------------------------------------------------------------------------------ model/state

def build_model(config) -> tuple[nnx.GraphDef, Any, model_lib.MAEConfig]:
    """(graphdef, abstract params as a pure dict, static model config)."""
    c = model_lib.mae_config(config.model, config.data.image_size)
    abstract = nnx.eval_shape(lambda: model_lib.MAE(c, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return graphdef, nnx.to_pure_dict(state), c


def init_params(config, c: model_lib.MAEConfig) -> Any:
    return nnx.to_pure_dict(nnx.split(model_lib.MAE(c, rngs=nnx.Rngs(config.seed)))[1])


def decay_mask(params) -> Any:
    """Weight decay on matrices only: no decay on biases, norms or tokens (position
    embeddings are fixed constants, not parameters)."""
    def keep(path, x):
        name = str(getattr(path[-1], 'key', path[-1]))
        return x.ndim >= 2 and 'token' not in name
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    peak = config.base_lr * config.batch_size / 256
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=config.min_lr / peak)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    parts = []
    if config.get('grad_clip_norm'):
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.wd, mask=decay_mask))
    return optax.chain(*parts)


class Trainer(NamedTuple):
    """Everything static about a run, built once from the config."""
    config: Any
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    mae: model_lib.MAEConfig
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    state_sharding: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings, for restoring
    total_steps: int
    warmup_steps: int
    steps_per_epoch: int


def make_trainer(config, mesh, steps_per_epoch: int) -> Trainer:
    graphdef, abstract_params, c = build_model(config)
    total = config_lib.resolve_steps(config, 'total', steps_per_epoch)
    warmup = config_lib.resolve_steps(config, 'warmup', steps_per_epoch)
    if warmup > total:
        raise config_lib.ConfigError('warmup_epochs', f'warm-up ({warmup} steps) is longer than training ({total} steps)')
    schedule = make_schedule(config, total, warmup)
    tx = make_optimizer(config, schedule)
    abstract = jax.eval_shape(lambda: new_state(config, c, tx))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return Trainer(config, mesh, graphdef, c, tx, schedule, shardings, abstract, total, warmup, steps_per_epoch)


def new_state(config, c, tx) -> dict:
    params = init_params(config, c)
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def init_state(t: Trainer) -> dict:
    """A fresh train state, created directly in its shardings."""
    return jax.jit(lambda: new_state(t.config, t.mae, t.tx), out_shardings=t.state_sharding)()


# ------------------------------------------------------------------------------ the step

def prepare_images(batch: Batch, config) -> jax.Array:
    """uint8 images are normalised here, on the device; float images come normalised."""
    x = batch['image']
    if x.dtype == jnp.uint8:
        x = data.normalize(x, config.data.mean, config.data.std)
    return x.astype(jnp.float32)


def step_rng(seed: int, step: jax.Array) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), step)


def train_step(state: dict, batch: Batch, aux: Any, *, t: Trainer, strategy: masking.Strategy):
    rng = step_rng(t.config.seed, state['step'])
    images = prepare_images(batch, t.config)
    part = strategy(jax.random.fold_in(rng, 0), batch, aux)

    def loss_fn(params):
        loss, _ = nnx.merge(t.graphdef, params)(images, part)
        return loss

    loss, grads = jax.value_and_grad(loss_fn)(state['params'])
    updates, opt_state = t.tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    out = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    m = {'loss': loss, 'grad_norm': optax.tree.norm(grads), 'lr': t.schedule(state['step']),
         'param_norm': optax.tree.norm(params)}
    return out, m


def compile_step(t: Trainer, strategy: masking.Strategy, aux_sharding: Any) -> Callable:
    bs = parallel.batch_sharding(t.mesh)
    return jax.jit(functools.partial(train_step, t=t, strategy=strategy),
                   in_shardings=(t.state_sharding, bs, aux_sharding),
                   out_shardings=(t.state_sharding, parallel.replicated(t.mesh)),
                   donate_argnums=(0,))


def reconstruct(params, batch: Batch, aux: Any, step: jax.Array, *, t: Trainer, strategy: masking.Strategy):
    """Pictures for TensorBoard: input | masked input | reconstruction (visible patches pasted)."""
    images = prepare_images(batch, t.config)
    part = strategy(jax.random.fold_in(step_rng(t.config.seed, step), 0), batch, aux)
    _, pred = nnx.merge(t.graphdef, params)(images, part)
    c = t.mae
    patches = model_lib.patchify(images, c.patch)
    if c.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
        target = model_lib.take_tokens(patches, part.masked)
        mean = target.mean(-1, keepdims=True)
        std = jnp.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
        pred = pred * std + mean
    rows = jnp.arange(images.shape[0])[:, None]
    recon = patches.at[rows, part.masked].set(pred)
    hidden = jnp.zeros_like(patches).at[rows, part.visible].set(patches[rows, part.visible])
    mean = jnp.asarray(t.config.data.mean) / 255.0
    std = jnp.asarray(t.config.data.std) / 255.0

    def to_img(p):
        x = model_lib.unpatchify(p, c.patch) * std + mean
        return jnp.clip(x * 255.0, 0, 255).astype(jnp.uint8)

    return jnp.concatenate([to_img(patches), to_img(hidden), to_img(recon)], axis=2)  # side by side


# ------------------------------------------------------------------------------ the loop

class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning('SIGTERM received: saving a checkpoint, then exiting.')
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _check_finite(step: int, values: dict, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        last = ckpt.latest_step()
        raise FloatingPointError(
            f'non-finite training metrics at step {step}: {bad}. The run stopped without saving; the last good '
            f'checkpoint is {"step " + str(last) if last is not None else "none"} in {ckpt.directory}. '
            f'Lower base_lr, lengthen the warm-up or set grad_clip_norm, then relaunch (it resumes from there).')


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after: int | None = None) -> dict:
    """Pre-trains an MAE per ``config``, resuming from the newest checkpoint in ``workdir``.

    ``stop_after`` (tests) stops after that many steps of this call, as if the process
    were killed there. Returns the losses of this call's steps and the final state.
    """
    config_lib.validate(config, num_devices=len(devices) if devices is not None else None)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    spe = data.steps_per_epoch(config.data, config.batch_size)  # prepares the data once
    if spe < 1:
        raise config_lib.ConfigError('batch_size', f'{config.batch_size} is larger than the dataset '
                                                   f'({data.num_examples(config.data)} examples)')
    t = make_trainer(config, mesh, spe)
    strategy = masking.create(config.mask, t.mae.grid)
    aux = jax.device_put(strategy.init_aux(jax.random.PRNGKey(config.seed + 1)), parallel.replicated(mesh))
    aux_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), aux)

    workdir = os.path.abspath(workdir) if '://' not in workdir else workdir
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.ckpt.keep,
                                 async_save=config.ckpt.async_save)
    it = data.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    writer = metrics.create_writer(os.path.join(workdir, 'tb'))
    try:
        start = ckpt.latest_step()
        if start is not None:
            state = ckpt.restore(start, t.abstract_state, it, config)
            logging.info('Resumed from %s at step %d.', ckpt.directory, start)
        else:
            state, start = init_state(t), 0
            writer.write_hparams({k: str(v) for k, v in ckpt_lib._flat(config.to_dict()).items()})
        return _loop(t, strategy, aux, aux_sharding, state, start, it, ckpt, writer, stop_after)
    finally:
        it.close()
        ckpt.close()
        writer.flush()


def _loop(t: Trainer, strategy, aux, aux_sharding, state, start, it, ckpt, writer, stop_after) -> dict:
    config, mesh, spe = t.config, t.mesh, t.steps_per_epoch
    step_fn = compile_step(t, strategy, aux_sharding)
    recon_fn = jax.jit(functools.partial(reconstruct, t=t, strategy=strategy), out_shardings=parallel.replicated(mesh))
    progress = periodic_actions.ReportProgress(num_train_steps=t.total_steps, writer=writer,
                                               every_steps=config.log_every_steps, every_secs=None)
    bsh = parallel.batch_sharding(mesh)
    every = config.image_summary_every_epochs
    img_every = max(1, int(round(every * spe))) if every else 0
    losses, pending, data_wait = [], [], 0.0
    end = t.total_steps if stop_after is None else min(t.total_steps, start + stop_after)
    if start >= t.total_steps:
        logging.info('Training is already complete (step %d of %d); nothing to do.', start, t.total_steps)
    else:
        logging.info('Training steps %d..%d of %d (%d steps/epoch, batch %d, mesh %s, mask %s).', start + 1, end,
                     t.total_steps, spe, config.batch_size, dict(zip(mesh.axis_names, mesh.devices.shape)),
                     strategy.name)

    def flush(step):
        nonlocal pending, data_wait
        if not pending:
            return
        fetched = [{k: float(v) for k, v in m.items()} for m in jax.device_get(pending)]
        if config.nan_check:
            for i, m in enumerate(fetched):
                _check_finite(step - len(fetched) + 1 + i, m, ckpt)
        losses.extend(m['loss'] for m in fetched)
        last = dict(fetched[-1], data_wait_ms=1e3 * data_wait / len(fetched), epoch=step / spe)
        writer.write_scalars(step, last)
        pending, data_wait = [], 0.0

    step = start
    with _Preemption() as preempt:
        for step in range(start + 1, end + 1):
            with progress.timed('data', wait_jax_async_dispatch=False):
                t0 = time.perf_counter()
                batch = data.to_global(next(it), lambda name, x: bsh)
                data_wait += time.perf_counter() - t0
            if img_every and (step - 1) % img_every == 0:
                pics = recon_fn(state['params'], batch, aux, jnp.asarray(step - 1, jnp.int32))
                writer.write_images(step - 1, {'masks/input_masked_reconstruction': np.asarray(
                    pics[:config.image_summary_count])})
            state, m = step_fn(state, batch, aux)
            pending.append(m)
            progress(step)
            if step % config.log_every_steps == 0 or step == end or preempt.requested:
                flush(step)
            if step % config.ckpt.every_steps == 0 or step == t.total_steps or preempt.requested:
                flush(step)  # a state that follows a non-finite step is never saved
                ckpt.save(step, state, it, config, force=True)
            if preempt.requested:
                logging.warning('Saved step %d after SIGTERM; exiting.', step)
                break
        flush(step)
    return {'losses': losses, 'state': state, 'step': step, 'trainer': t}

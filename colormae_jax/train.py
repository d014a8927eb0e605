"""Pre-training: train state, optimizer, the jitted step, and the loop.

The step is a pure function of ``(state, batch, mask_aux)``, jit-compiled once per masking
strategy with the state donated and every input and output placed by a NamedSharding on
the config's mesh. Randomness is ``fold_in(PRNGKey(seed), step)``: no key is carried in
the state, so a resumed run draws exactly the masks an uninterrupted run would.
"""
from __future__ import annotations

import functools
import json
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
from jax.experimental import multihost_utils

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
    """Weight decay on matrices only: no decay on biases, norms, tokens or position embeddings
    (MAE's ``no_weight_decay``; pre-training's are fixed constants, fine-tuning's a parameter)."""
    def keep(path, x):
        name = str(getattr(path[-1], 'key', path[-1]))
        return x.ndim >= 2 and 'token' not in name and name != 'pos_embed'
    return jax.tree_util.tree_map_with_path(keep, params)


def make_schedule(config, total_steps: int, warmup_steps: int) -> optax.Schedule:
    peak = config.base_lr * config.batch_size / 256
    warmup = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    cosine = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=config.min_lr / peak)
    return optax.join_schedules([warmup, cosine], [warmup_steps])


def make_optimizer(config, schedule) -> optax.GradientTransformation:
    # Clipping or not, the optimizer state has the same tree (both have an empty state), so a
    # run that diverged can be resumed with grad_clip_norm set.
    clip = optax.clip_by_global_norm(config.grad_clip_norm) if config.get('grad_clip_norm') else optax.identity()
    return optax.chain(clip, optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.wd,
                                         mask=decay_mask))


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
        key = 'warmup_steps' if config.get('warmup_steps') is not None else 'warmup_epochs'
        raise config_lib.ConfigError(key, f'warm-up ({warmup} steps) is longer than training ({total} steps)')
    schedule = make_schedule(config, total, warmup)
    tx = make_optimizer(config, schedule)
    abstract = jax.eval_shape(lambda: new_state(config, c, tx))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return Trainer(config, mesh, graphdef, c, tx, schedule, shardings, abstract, total, warmup, steps_per_epoch)


def new_state(config, c, tx, params: Any = None) -> dict:
    """Step 0, ``params`` (a random init when None) and a fresh optimizer state."""
    params = init_params(config, c) if params is None else params
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}


def init_state(t: Trainer, params: Any = None) -> dict:
    """A fresh train state, created directly in its shardings; from ``params`` (e.g. imported
    weights, same tree as the model's) instead of a random init when given."""
    if params is None:
        return jax.jit(lambda: new_state(t.config, t.mae, t.tx), out_shardings=t.state_sharding)()
    want = t.abstract_state['params']
    bad = [jax.tree_util.keystr(p) for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(want),
                                                        jax.tree.leaves(params)) if a.shape != np.shape(b)]
    if jax.tree.structure(want) != jax.tree.structure(params) or bad:
        raise config_lib.ConfigError('init_from', f'the params do not fit model.variant={t.config.model.variant!r} '
                                                  f'and its decoder (first mismatches: {bad[:3]})')
    return jax.jit(lambda p: new_state(t.config, t.mae, t.tx, p), out_shardings=t.state_sharding)(params)


# ------------------------------------------------------------------------------ the step

def prepare_images(batch: Batch, config) -> jax.Array:
    """uint8 images are normalised here, on the device; float images come normalised."""
    return data.model_input(batch['image'], config.data)


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
    """Pictures for TensorBoard: input | visible patches | reconstruction (visible patches pasted, masked
    ones predicted, thrown ones blank: the mean colour)."""
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
    hidden = jnp.zeros_like(patches).at[rows, part.visible].set(patches[rows, part.visible])
    recon = hidden.at[rows, part.masked].set(pred)  # thrown patches stay blank: nothing predicts them
    mean = jnp.asarray(t.config.data.mean) / 255.0
    std = jnp.asarray(t.config.data.std) / 255.0

    def to_img(p):
        x = model_lib.unpatchify(p, c.patch) * std + mean
        return jnp.clip(x * 255.0, 0, 255).astype(jnp.uint8)

    return jnp.concatenate([to_img(patches), to_img(hidden), to_img(recon)], axis=2)  # side by side


# ------------------------------------------------------------------------------ the loop

class _Preemption:
    """When to stop early and save: on SIGTERM or once ``deadline`` (a ``time.time()``) has passed.

    One process: a SIGTERM handler sets a flag. Several processes must all stop at the same
    step, or the collective save would hang: there JAX's preemption sync service (started by
    ``jax.distributed``, whose own SIGTERM notifier must not be replaced by a Python handler)
    picks the step (``CheckpointManager.reached_preemption``), and process 0's clock decides the
    deadline for all, every ``check_every`` steps.
    """

    def __init__(self, ckpt, deadline: float | None, check_every: int):
        self.ckpt, self.deadline, self.check_every = ckpt, deadline, check_every
        self.multi = jax.process_count() > 1
        self.signalled = False
        self._old = None

    def __enter__(self):
        if not self.multi:
            try:
                self._old = signal.signal(signal.SIGTERM, self._handle)
            except ValueError:  # not the main thread
                self._old = None
        return self

    def _handle(self, signum, frame):
        logging.warning('SIGTERM received: saving a checkpoint, then exiting.')
        self.signalled = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)

    def __call__(self, step: int) -> bool:
        """Whether to save and stop after ``step``; every process calls it at every step."""
        if self.multi and self.ckpt.manager.reached_preemption(step):
            logging.warning('Preemption sync point at step %d (SIGTERM on some process): saving, then exiting.',
                            step)
            return True
        if self.signalled:
            return True
        if self.deadline is None or (self.multi and step % self.check_every):
            return False
        expired = time.time() > self.deadline
        if self.multi:
            expired = bool(multihost_utils.broadcast_one_to_all(np.asarray(expired)))
        return expired


def _check_finite(step: int, values: dict, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = {k: v for k, v in values.items() if not np.isfinite(v)}
    if bad:
        last = ckpt.latest_step()
        raise FloatingPointError(
            f'non-finite training metrics at step {step}: {bad}. The run stopped without saving; the last good '
            f'checkpoint is {"step " + str(last) if last is not None else "none"} in {ckpt.directory}. '
            f'Lower base_lr, lengthen the warm-up or set grad_clip_norm, then relaunch (it resumes from there).')


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after: int | None = None,
                       deadline: float | None = None) -> dict:
    """Pre-trains an MAE per ``config``, resuming from the newest checkpoint in ``workdir``.

    ``stop_after`` (tests) stops after that many steps of this call, as if the process
    were killed there. Returns the losses of this call's steps and the final state.
    """
    if config.get('task', 'pretrain') != 'pretrain':  # kNN, linear probe, fine-tuning
        from colormae_jax import evaluate
        return evaluate.evaluate(config, workdir, devices=devices, stop_after=stop_after, deadline=deadline)
    config_lib.validate(config, num_devices=len(devices) if devices is not None else None)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    spe = data.steps_per_epoch(config.data, config.batch_size)  # prepares the data once
    if spe < 1:
        raise config_lib.ConfigError('batch_size', f'{config.batch_size} is larger than the dataset '
                                                   f'({data.num_examples(config.data)} examples)')
    t = make_trainer(config, mesh, spe)
    task = PretrainTask(t, workdir)
    it = data.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count())
    def init_fn():
        if not config.get('init_from'):
            return init_state(t)
        from colormae_jax import evaluate  # continue pre-training from another run or imported weights
        params, _, desc = evaluate.load_pretrained(config.init_from)
        logging.info('Starting from the params of %s.', desc)
        return init_state(t, params)

    out = run(task, config, workdir, it, t.abstract_state, init_fn, stop_after=stop_after,
              deadline=deadline)
    return dict(out, trainer=t)


def run(task, config, workdir: str, it, abstract_state, init_fn: Callable[[], Any], *,
        stop_after: int | None = None, deadline: float | None = None) -> dict:
    """Checkpoints, logs and the loop around a task: resumes from the newest checkpoint in
    ``workdir/checkpoints`` (state, iterator and the task's extra items) or starts from
    ``init_fn()``. Closes the iterator, the checkpointer and the writer."""
    workdir = os.path.abspath(workdir) if '://' not in workdir else workdir
    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), keep=config.ckpt.keep,
                                 async_save=config.ckpt.async_save)
    writer = metrics.create_writer(os.path.join(workdir, 'tb'))
    try:
        start = ckpt.latest_step()
        if start is not None:
            state, restored = ckpt.restore(start, abstract_state, it, config, extra=task.abstract_extra())
            task.load_extra(restored)
            logging.info('Resumed from %s at step %d.', ckpt.directory, start)
        else:
            state, start = init_fn(), 0
            writer.write_hparams({k: str(v) for k, v in ckpt_lib._flat(config.to_dict()).items()})
        return run_loop(task, config, state, start, it, ckpt, writer, stop_after, deadline)
    finally:
        it.close()
        ckpt.close()
        writer.flush()


class MaskPhases:
    """The masking schedule (``config.mask.schedule``): which strategy runs at each step.

    Each strategy's device state (``aux``: a noise bank, ...) is built, and its step
    compiled, the first time the strategy is needed, and cached: a schedule that switches
    strategies compiles the step once per strategy, never more.
    """

    def __init__(self, t: Trainer):
        self.t = t
        self.starts, self.strategies = [], []
        for i, (epoch, name) in enumerate(masking.parse_schedule(t.config.mask)):
            start = int(round(epoch * t.steps_per_epoch))
            if i and start >= t.total_steps:
                raise config_lib.ConfigError('mask.schedule', f'{name!r} starts at epoch {epoch:g} (step {start}), at '
                                                              f'or after the end of training (step {t.total_steps})')
            if i and start <= self.starts[-1]:
                raise config_lib.ConfigError('mask.schedule', f'{name!r} at epoch {epoch:g} starts at step {start}, '
                                                              f'which leaves no step to the entry before it '
                                                              f'({t.steps_per_epoch} steps per epoch); space them out')
            self.starts.append(start)
            self.strategies.append(masking.create(t.config.mask, t.mae.grid, name))
        self._built: dict[masking.Strategy, tuple] = {}
        self.store, self._weights_fn, self.update_steps = None, None, set()
        famts = {s for s in self.strategies if getattr(s, 'uses_weight_store', False)}
        if len(famts) > 1:
            raise config_lib.ConfigError('mask.schedule', 'one FAMT setting per run')
        if famts:
            self.famt = famts.pop()
            try:
                self.famt.check_schedule(t.steps_per_epoch, t.total_steps)
            except masking.MaskConfigError as e:
                raise config_lib.ConfigError(e.key, str(e)) from None
            self.update_steps = self._useful(self.famt.update_steps(t.steps_per_epoch, t.total_steps))
            self.store = masking.famt.WeightStore(
                data.num_examples(t.config.data), t.mae.grid, jax.process_index(), jax.process_count(),
                pad_to=len(t.mesh.local_devices))

    def _useful(self, updates: list[int]) -> set[int]:
        """The FAMT updates whose weights some step uses: an update before step u serves the
        steps up to the next update, and is skipped where no FAMT phase overlaps them (e.g.
        every update after ``'famt,green@100'`` switches to green)."""
        ends = self.starts[1:] + [self.t.total_steps]
        famt = [(a, b) for a, b, s in zip(self.starts, ends, self.strategies) if s == self.famt]
        nexts = updates[1:] + [self.t.total_steps]
        return {u for u, n in zip(updates, nexts) if any(a < n and u < b for a, b in famt)}

    # -- the FAMT weight store: checkpointed with the state, refreshed by its own jitted pass
    def abstract_extra(self) -> dict | None:
        return None if self.store is None else {'famt': self.store.abstract(self.t.mesh)}

    def extra(self) -> dict | None:
        return None if self.store is None else {'famt': self.store.to_global(self.t.mesh)}

    def load_extra(self, restored: dict | None) -> None:
        if self.store is not None:
            self.store.load(restored['famt'], self.t.mesh)

    def batch_fields(self, strategy: masking.Strategy, batch: dict) -> dict:
        """Host-side additions to a process-local batch (the FAMT weights of its examples)."""
        if getattr(strategy, 'uses_weight_store', False):
            batch = dict(batch, **{masking.famt.WEIGHT_KEY: self.store.lookup(batch['index'])})
        return batch

    def maybe_update(self, step: int, params, writer) -> None:
        """Before 0-based ``step``: recompute the FAMT weights if the schedule says so."""
        if step not in self.update_steps or int(self.store.updated_at) == step:
            return
        t, f = self.t, self.famt
        if self._weights_fn is None:
            def weights(p, images):
                encoder = nnx.merge(t.graphdef, p).encoder
                x = prepare_images({'image': images}, t.config)
                return masking.famt.weight_maps(encoder, x.astype(t.mae.dtype), patch=t.mae.patch,
                                                freq_weight=f.freq_weight, freq_sigma=f.freq_sigma)
            self._weights_fn = jax.jit(weights, out_shardings=parallel.batch_sharding(t.mesh))
        bs = f.update_batch_size or t.config.batch_size
        n_local = math.ceil(self.store.num_examples / jax.process_count())
        batches = data.make_eval_iterator(t.config.data, split=t.config.data.split, global_batch_size=bs,
                                          process_index=jax.process_index(), process_count=jax.process_count(),
                                          view='resize')
        secs = masking.famt.update_pass(self.store, functools.partial(self._weights_fn, params), batches, t.mesh,
                                        show_progress=jax.process_index() == 0,
                                        total=math.ceil(n_local / (bs // jax.process_count())))
        self.store.updated_at = np.asarray(step, np.int64)
        logging.info('FAMT weights of %d examples updated before step %d (epoch %.1f) in %.1f s.',
                     self.store.num_examples, step + 1, step / t.steps_per_epoch, secs)
        writer.write_scalars(step, {'famt/update_seconds': secs})

    def index(self, step: int) -> int:
        """The phase of 0-based ``step``."""
        return max(i for i, s in enumerate(self.starts) if s <= step)

    def get(self, i: int) -> tuple[masking.Strategy, Any, Callable, Callable]:
        """(strategy, aux, step_fn, recon_fn) of phase ``i``."""
        t, strategy = self.t, self.strategies[i]
        if strategy not in self._built:  # a strategy that comes back reuses its bank and its compiled step
            rep = parallel.replicated(t.mesh)
            key = jax.random.fold_in(jax.random.PRNGKey(t.config.seed + 1), self.strategies.index(strategy))
            aux = jax.device_put(strategy.init_aux(key), rep)
            step_fn = compile_step(t, strategy, jax.tree.map(lambda _: rep, aux))
            recon_fn = jax.jit(functools.partial(reconstruct, t=t, strategy=strategy), out_shardings=rep)
            self._built[strategy] = (strategy, aux, step_fn, recon_fn)
        return self._built[strategy]


class PretrainTask:
    """MAE pre-training as a task of :func:`run_loop`: the masking phases, FAMT weight updates
    and image summaries of inputs, masks and reconstructions."""

    def __init__(self, t: Trainer, workdir: str | None = None):
        self.t, self.phases, self.mesh, self.workdir = t, MaskPhases(t), t.mesh, workdir
        self.total_steps, self.steps_per_epoch = t.total_steps, t.steps_per_epoch
        every = t.config.image_summary_every_epochs
        self.img_every = max(1, int(round(every * t.steps_per_epoch))) if every else 0
        self._phase = None

    def describe(self) -> str:
        c = self.t.config
        return f'pre-training, batch {c.batch_size}, mask {c.mask.schedule or c.mask.strategy}'

    def _current(self, step0: int):
        i = self.phases.index(step0)
        built = self.phases.get(i)
        if i != self._phase:
            self._phase = i
            logging.info('Masking with %r from step %d (epoch %.2f).', built[0].name, step0 + 1,
                         step0 / self.steps_per_epoch)
        return built

    def before_step(self, step0: int, state, writer, progress) -> None:
        if self.phases.store is not None:
            with progress.timed('famt_update'):
                self.phases.maybe_update(step0, state['params'], writer)

    def host_batch(self, step0: int, batch: dict) -> dict:
        return self.phases.batch_fields(self._current(step0)[0], batch)

    def step(self, step0: int, state, batch):
        strategy, aux, step_fn, recon_fn = self._current(step0)
        if self.img_every and step0 % self.img_every == 0:
            pics = recon_fn(state['params'], batch, aux, jnp.asarray(step0, jnp.int32))
            self._pics = (step0, np.asarray(pics[:self.t.config.image_summary_count]))
        return step_fn(state, batch, aux)

    def after_step(self, step: int, state, writer) -> None:
        pics = getattr(self, '_pics', None)
        if pics is not None:
            writer.write_images(pics[0], {'masks/input_masked_reconstruction': pics[1]})
            self._pics = None
        knn = self.t.config.get('knn')
        every = max(1, int(round(knn.every_epochs * self.steps_per_epoch))) if knn and knn.every_epochs else 0
        if every and (step % every == 0 or step == self.total_steps):
            from colormae_jax import evaluate
            t0 = time.perf_counter()
            res = evaluate.knn_eval(state['params']['encoder'], self.t.mae, self.t.config.data, knn,
                                    num_classes=self.t.config.num_classes, batch_size=self.t.config.batch_size,
                                    mesh=self.mesh)
            writer.write_scalars(step, dict(res, **{'knn/seconds': time.perf_counter() - t0}))
            logging.info('kNN monitor at step %d (epoch %.1f): %s', step, step / self.steps_per_epoch, res)
            if self.workdir and jax.process_index() == 0 and '://' not in self.workdir:
                with open(os.path.join(self.workdir, 'knn.jsonl'), 'a') as f:  # for the study's curves
                    f.write(json.dumps(dict(res, step=step, epoch=step / self.steps_per_epoch)) + '\n')

    def abstract_extra(self):
        return self.phases.abstract_extra()

    def load_extra(self, restored) -> None:
        self.phases.load_extra(restored)

    def extra(self):
        return self.phases.extra()


def run_loop(task, config, state, start, it, ckpt, writer, stop_after, deadline=None) -> dict:
    """The one training loop (pre-training, linear probe, fine-tuning).

    ``task`` provides ``mesh``, ``total_steps``, ``steps_per_epoch``, ``describe()``,
    ``before_step(step0, state, writer, progress)``, ``host_batch(step0, batch)``,
    ``step(step0, state, global_batch) -> (state, metrics)``, ``after_step(step, state, writer)``,
    ``extra()`` / ``abstract_extra()`` / ``load_extra(restored)`` (more checkpoint items).
    Metrics are fetched and NaN-checked every ``log_every_steps`` and before every save;
    checkpoints every ``ckpt.every_steps``, at the end, and when :class:`_Preemption` stops the
    loop (SIGTERM, or ``deadline``, a ``time.time()``, has passed).
    """
    mesh, spe, total = task.mesh, task.steps_per_epoch, task.total_steps
    progress = periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                               every_steps=config.log_every_steps, every_secs=None)
    bsh = parallel.batch_sharding(mesh)
    losses, pending, data_wait, data_wait_total = [], [], 0.0, 0.0
    end = total if stop_after is None else min(total, start + stop_after)
    loop_t0 = time.perf_counter()
    if start >= total:
        logging.info('Training is already complete (step %d of %d); nothing to do.', start, total)
    else:
        logging.info('Training steps %d..%d of %d (%d steps/epoch, mesh %s): %s.', start + 1, end, total, spe,
                     dict(zip(mesh.axis_names, mesh.devices.shape)), task.describe())

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
    with _Preemption(ckpt, deadline, config.log_every_steps) as should_stop:
        for step in range(start + 1, end + 1):
            task.before_step(step - 1, state, writer, progress)
            with progress.timed('data', wait_jax_async_dispatch=False):
                t0 = time.perf_counter()
                batch = data.to_global(task.host_batch(step - 1, next(it)), lambda name, x: bsh)
                waited = time.perf_counter() - t0
                data_wait += waited
                data_wait_total += waited
            state, m = task.step(step - 1, state, batch)
            pending.append(m)
            progress(step)
            stop = should_stop(step)
            if step % config.log_every_steps == 0 or step == end or stop:
                flush(step)
            due = step % config.ckpt.every_steps == 0 or step == total or stop
            try:
                if not stop:  # before the save, so that what it records (a best accuracy) is saved with the step
                    task.after_step(step, state, writer)
            finally:
                if due:  # also when the evaluation failed: it loses no training
                    flush(step)  # a state that follows a non-finite step is never saved
                    ckpt.save(step, state, it, config, force=True, extra=task.extra())
            if stop:  # a preemption saves first (and waits for it), then evaluates
                ckpt.wait()
                task.after_step(step, state, writer)
                logging.warning('Saved step %d after SIGTERM (or the deadline); exiting.', step)
                break
        flush(step)
    return {'losses': losses, 'state': state, 'step': step, 'total_steps': total,
            'loop_seconds': time.perf_counter() - loop_t0, 'data_wait_seconds': data_wait_total}


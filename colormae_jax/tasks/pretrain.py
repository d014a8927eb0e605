"""MAE pre-training: the train state, the jitted step, the masking phases, and the task.

The step is a pure function of ``(state, batch, aux)``, jit-compiled once per masking
strategy with the state donated and every input and output placed by a NamedSharding on
the config's mesh; :func:`loop.run` drives it. A strategy's device state (``aux``, e.g. a
noise bank) is an argument of the step; its host state (:class:`masking.HostState`, e.g.
per-example weights) is refreshed before each step, adds its fields to the batch, and is
checkpointed with the run, through hooks this module calls without knowing the strategy.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx

from colormae_jax import config_lib, knn, loop, masking, optim, parallel, viz
from colormae_jax.data import device as device_data, pipeline as data, sources as datasets
from colormae_jax.errors import ConfigError
from colormae_jax.interop import weights
from colormae_jax.models import mae as model_lib

Batch = dict[str, jax.Array]


def validate(config, num_devices: int | None = None, check_data: bool = True) -> None:
    """Refuses a bad pre-training config before anything is compiled."""
    config_lib.validate(config, num_devices, check_data)


# ------------------------------------------------------------------------------ model/state

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
    c = model_lib.mae_config(config.model, config.data.image_size)
    graphdef, _ = model_lib.abstract_mae(c)
    total = config_lib.resolve_steps(config, 'total', steps_per_epoch)
    warmup = config_lib.resolve_steps(config, 'warmup', steps_per_epoch)
    if warmup > total:
        key = 'warmup_steps' if config.warmup_steps is not None else 'warmup_epochs'
        raise ConfigError(key, f'warm-up ({warmup} steps) is longer than training ({total} steps)')
    schedule = optim.make_schedule(config, total, warmup)
    tx = optim.make_optimizer(config, schedule)
    abstract = jax.eval_shape(lambda: new_state(config, c, tx))
    shardings = parallel.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    return Trainer(config, mesh, graphdef, c, tx, schedule, shardings, abstract, total, warmup, steps_per_epoch)


def new_state(config, c, tx, params: Any = None) -> dict:
    """Step 0, ``params`` (a random init when None) and a fresh optimizer state."""
    params = model_lib.init_mae_params(c, config.seed) if params is None else params
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
        raise ConfigError('init_from', f'the params do not fit model.variant={t.config.model.variant!r} '
                                                  f'and its decoder (first mismatches: {bad[:3]})')
    return jax.jit(lambda p: new_state(t.config, t.mae, t.tx, p), out_shardings=t.state_sharding)(params)



# ------------------------------------------------------------------------------ the step

def micro_batches(batch: Batch, k: int) -> Batch:
    """[B, ...] -> [k, B/k, ...], micro-batch i holding rows i, i+k, i+2k, ...: with B split evenly over
    the devices (and B/devices divisible by k), every micro-batch is split evenly too, nothing moves."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1), batch)


def loss_and_grads(params, batch: Batch, aux: Any, mask_key: jax.Array, *, t: Trainer, strategy: masking.Strategy):
    """(loss, grads) of one (micro-)batch, masked by ``strategy`` with ``mask_key``."""
    images = data.model_input(batch['image'], t.config.data)
    part = strategy(mask_key, batch, aux)

    def loss_fn(p):
        loss, _ = nnx.merge(t.graphdef, p)(images, part)
        return loss

    return jax.value_and_grad(loss_fn)(params)


def train_step(state: dict, batch: Batch, aux: Any, *, t: Trainer, strategy: masking.Strategy):
    rng = loop.step_rng(t.config.seed, state['step'])
    mask_key = jax.random.fold_in(rng, 0)
    k = t.config.get('grad_accum_steps', 1)
    if k == 1:
        loss, grads = loss_and_grads(state['params'], batch, aux, mask_key, t=t, strategy=strategy)
    else:  # k micro-batches in a scan (one in memory at a time); micro-batch i masked with fold_in(mask_key, i)
        bs = parallel.batch_sharding(t.mesh)

        def body(acc, xs):
            i, micro = xs
            micro = jax.lax.with_sharding_constraint(micro, bs)
            out = loss_and_grads(state['params'], micro, aux, jax.random.fold_in(mask_key, i), t=t, strategy=strategy)
            return jax.tree.map(jnp.add, acc, out), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state['params']))
        total, _ = jax.lax.scan(body, zeros, (jnp.arange(k), micro_batches(batch, k)))
        loss, grads = jax.tree.map(lambda x: x / k, total)  # the mean over the micro-batches
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


def reconstruct(params, batch: Batch, aux: Any, step: jax.Array, *, t: Trainer, strategy: masking.Strategy,
                with_mask: bool = False):
    """Pictures for TensorBoard: input | visible patches | reconstruction (visible patches pasted, masked
    ones predicted, thrown ones blank: the mean colour); ``with_mask``: also the mask [B, N] (0 visible,
    1 masked, -1 thrown), for :func:`viz.reconstruction_grid`."""
    images = data.model_input(batch['image'], t.config.data)
    part = strategy(jax.random.fold_in(loop.step_rng(t.config.seed, step), 0), batch, aux)
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
        return jnp.clip(jnp.round(x * 255.0), 0, 255).astype(jnp.uint8)  # rounded: uint8 inputs come back exactly

    strip = jnp.concatenate([to_img(patches), to_img(hidden), to_img(recon)], axis=2)  # side by side
    return (strip, masking.masked_map(part, c.num_patches)) if with_mask else strip



# ------------------------------------------------------------------------------ the task

class MaskPhases:
    """The masking schedule (``config.mask.schedule``): which strategy runs at each step.

    Each strategy's device state (``aux``: a noise bank, ...) is built, and its step
    compiled, the first time the strategy is needed, and cached: a schedule that switches
    strategies compiles the step once per strategy, never more. Host states
    (:class:`masking.HostState`) are made once per strategy name, for all its phases.
    """

    def __init__(self, t: Trainer):
        self.t = t
        self.starts, self.strategies, self.phases = [], [], masking.parse_schedule(t.config.mask)
        for i, phase in enumerate(self.phases):
            start, name = phase.start_step(t.steps_per_epoch), phase.name
            at = f'step {int(phase.start)}' if phase.in_steps else f'epoch {phase.start:g} (step {start})'
            if i and start >= t.total_steps:
                raise ConfigError('mask.schedule', f'{name!r} starts at {at}, at or after the end of training '
                                                   f'(step {t.total_steps})')
            if i and start <= self.starts[-1]:
                raise ConfigError('mask.schedule', f'{name!r} at {at} leaves no step to the entry before it '
                                                   f'({t.steps_per_epoch} steps per epoch); space them out')
            self.starts.append(start)
            self.strategies.append(masking.create(t.config.mask, t.mae.grid, name, **phase.ratios()))
        self._built: dict[masking.Strategy, tuple] = {}
        ends = self.starts[1:] + [t.total_steps]
        self.states: dict[str, masking.HostState] = {}
        for s in self.strategies:
            if s.name not in self.states:
                active = tuple((a, b) for a, b, x in zip(self.starts, ends, self.strategies) if x.name == s.name)
                run = masking.RunContext(t.config, t.mesh, t.mae, t.graphdef, t.steps_per_epoch, t.total_steps,
                                         active)
                if (state := s.host_state(run)) is not None:
                    self.states[s.name] = state

    def refresh(self, step: int, params, writer) -> None:
        for state in self.states.values():
            state.refresh(step, params, writer)

    def batch_fields(self, strategy: masking.Strategy, batch: dict) -> dict:
        state = self.states.get(strategy.name)
        return batch if state is None else dict(batch, **state.batch_fields(batch))

    # -- checkpoint items of the host states
    def abstract_extra(self) -> dict | None:
        return {k: v for s in self.states.values() for k, v in s.abstract_items().items()} or None

    def extra(self) -> dict | None:
        return {k: v for s in self.states.values() for k, v in s.items().items()} or None

    def load_extra(self, restored: dict | None) -> None:
        for s in self.states.values():
            s.load_items(restored)

    def index(self, step: int) -> int:
        """The phase of 0-based ``step``."""
        return max(i for i, s in enumerate(self.starts) if s <= step)

    def get(self, i: int) -> tuple[masking.Strategy, Any, Callable, Callable]:
        """(strategy, aux, step_fn, recon_fn) of phase ``i``; ``aux`` is the host state's
        ``step_aux()`` when it has one (e.g. FAMT's device weight table, new after each update)."""
        t, strategy = self.t, self.strategies[i]
        state = self.states.get(strategy.name)
        host_aux = None if state is None else state.step_aux()
        if strategy not in self._built:  # a strategy that comes back reuses its bank and its compiled step
            rep = parallel.replicated(t.mesh)
            key = jax.random.fold_in(jax.random.PRNGKey(t.config.seed + 1), self.strategies.index(strategy))
            aux = jax.device_put(strategy.init_aux(key), rep) if host_aux is None else host_aux
            step_fn = compile_step(t, strategy, jax.tree.map(lambda _: rep, aux))
            recon_fn = jax.jit(functools.partial(reconstruct, t=t, strategy=strategy, with_mask=True),
                               out_shardings=rep)
            self._built[strategy] = (strategy, None if host_aux is not None else aux, step_fn, recon_fn)
        built = self._built[strategy]
        return built if host_aux is None else (strategy, host_aux, *built[2:])


class PretrainTask:
    """MAE pre-training as a task of :func:`loop.run_loop`: the masking phases with their
    strategies' host state, image summaries of inputs, masks and reconstructions, and the kNN
    monitor."""

    def __init__(self, t: Trainer, workdir: str | None = None):
        self.t, self.phases, self.mesh, self.workdir = t, MaskPhases(t), t.mesh, workdir
        self.total_steps, self.steps_per_epoch = t.total_steps, t.steps_per_epoch
        every = t.config.image_summary_every_epochs
        self.img_every = max(1, int(round(every * t.steps_per_epoch))) if every else 0
        knn_cfg = t.config.knn
        self.knn_every = max(1, int(round(knn_cfg.every_epochs * t.steps_per_epoch))) if knn_cfg.every_epochs else 0
        self._phase = None
        self._knn = None
        if self.knn_every:
            self._note_knn_cost()

    def _note_knn_cost(self) -> None:
        """A log line when the kNN monitor reads more images than the run trains on (a run cut
        short with total_steps), with how to turn it off or bound it."""
        c, total = self.t.config, self.total_steps
        n_train = knn.count(c.data, c.data.split, c.knn.max_train)
        n_test = knn.count(c.data, c.data.eval_split, c.knn.max_test)
        runs = [s for s in range(self.knn_every, total + 1, self.knn_every)]
        runs += [] if runs and runs[-1] == total else [total]
        trained = total * c.batch_size
        if len(runs) * (n_train + n_test) > trained:
            at = f'after step {runs[0]}' if len(runs) == 1 else f'{len(runs)} times (after steps {runs[0]}, ...)'
            logging.info('The kNN monitor runs %s over %s images each (%s %s + %s %s), more than the %s images '
                         'this run trains on (%d steps of %d); --config.knn.every_epochs=0 turns it off, '
                         '--config.knn.max_train / --config.knn.max_test bound it (docs/pretraining.md, '
                         '"Shortening a run").', at, f'{n_train + n_test:,}', f'{n_train:,}', c.data.split,
                         f'{n_test:,}', c.data.eval_split, f'{trained:,}', total, c.batch_size)

    def describe(self) -> str:
        c = self.t.config
        return f'pre-training, batch {c.batch_size}, mask {c.mask.schedule or c.mask.strategy}'

    def _current(self, step0: int):
        i = self.phases.index(step0)
        built = self.phases.get(i)
        if i != self._phase:
            self._phase = i
            logging.info('Masking with %s from step %d (epoch %.2f).', self.phases.phases[i].describe(built[0]),
                         step0 + 1, step0 / self.steps_per_epoch)
        return built

    def before_step(self, step0: int, state, writer, progress) -> None:
        if self.phases.states:
            with progress.timed('mask_state'):
                self.phases.refresh(step0, state['params'], writer)

    def host_batch(self, step0: int, batch: dict) -> dict:
        return self.phases.batch_fields(self._current(step0)[0], batch)

    def step(self, step0: int, state, batch):
        strategy, aux, step_fn, recon_fn = self._current(step0)
        if self.img_every and step0 % self.img_every == 0:
            pics, mask = recon_fn(state['params'], batch, aux, jnp.asarray(step0, jnp.int32))
            n = self.t.config.image_summary_count
            self._pics = (step0, strategy.name, np.asarray(pics[:n]), np.asarray(mask[:n]))
        return step_fn(state, batch, aux)

    def after_step(self, step: int, state, writer) -> None:
        pics = getattr(self, '_pics', None)
        if pics is not None:
            step_pics, name, strip, mask = pics
            inputs, _, recons = np.split(strip, 3, axis=2)
            writer.write_images(step_pics, {'masks/input_mask_reconstruction': viz.reconstruction_grid(
                inputs, mask, recons, self.t.mae.patch, strategy=name)})
            self._pics = None
        self._knn = None
        if self.evaluates(step):
            t0 = time.perf_counter()
            res = knn.knn_eval(state['params']['encoder'], self.t.mae, self.t.config.data, self.t.config.knn,
                               num_classes=self.t.config.num_classes, batch_size=self.t.config.batch_size,
                               mesh=self.mesh, what=f'kNN monitor after step {step}',
                               hint='--config.knn.every_epochs=0 turns it off, --config.knn.max_train / max_test '
                                    'bound it')
            self._knn = res
            writer.write_scalars(step, dict(res, **{'knn/seconds': time.perf_counter() - t0}))
            logging.info('kNN monitor at step %d (epoch %.1f): %s', step, step / self.steps_per_epoch, res)
            if self.workdir and jax.process_index() == 0 and '://' not in self.workdir:
                _append_knn(os.path.join(self.workdir, 'knn.jsonl'),
                            dict(res, step=step, epoch=step / self.steps_per_epoch))

    def evaluates(self, step: int) -> bool:
        return bool(self.knn_every) and (step % self.knn_every == 0 or step == self.total_steps)

    def eval_record(self) -> dict:
        return {'knn': self._knn}

    def load_eval_record(self, record: dict) -> None:
        self._knn = record.get('knn')

    def abstract_extra(self):
        return self.phases.abstract_extra()

    def load_extra(self, restored) -> None:
        self.phases.load_extra(restored)

    def extra(self):
        return self.phases.extra()





def _append_knn(path: str, line: dict) -> None:
    """Appends the monitor's ``line`` to ``knn.jsonl`` (the study's curves), without the lines of
    its step and later ones: those were written before the run resumed from an earlier step."""
    kept = []
    if os.path.exists(path):
        with open(path) as f:
            for x in f:
                try:
                    if json.loads(x).get('step', -1) < line['step']:
                        kept.append(x if x.endswith('\n') else x + '\n')
                except ValueError:
                    continue
    with open(path + '.tmp', 'w') as f:
        f.writelines(kept + [json.dumps(line) + '\n'])
    os.replace(path + '.tmp', path)


def train_and_evaluate(config, workdir: str, *, devices=None, stop_after: int | None = None,
                       deadline: float | None = None) -> dict:
    """Pre-trains an MAE per ``config``, resuming from the newest checkpoint in ``workdir``.

    ``stop_after`` (tests) stops after that many steps of this call, as if the process
    were killed there. Returns the losses of this call's steps and the final state.
    """
    validate(config, num_devices=len(devices) if devices is not None else None)
    mesh = parallel.make_mesh(config.mesh, devices)
    parallel.global_batch_check(config.batch_size, mesh)
    spe = data.steps_per_epoch(config.data, config.batch_size)
    if spe < 1:
        raise ConfigError('batch_size', f'{config.batch_size} is larger than the dataset '
                                        f'({datasets.num_examples(config.data)} examples)')
    t = make_trainer(config, mesh, spe)
    task = PretrainTask(t, workdir)
    if config.data.get('pipeline', 'grain') == 'device':  # the split resident on the mesh, cropped there
        it = device_data.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                             mesh=mesh)
    else:
        it = data.make_train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                                      process_index=jax.process_index(), process_count=jax.process_count())

    def init_fn():
        if not config.init_from:
            return init_state(t)
        params, _, desc = weights.load_pretrained(config.init_from)  # continue from another run or imports
        logging.info('Starting from the params of %s.', desc)
        return init_state(t, params)

    out = loop.run(task, config, workdir, it, t.abstract_state, init_fn, stop_after=stop_after, deadline=deadline)
    return dict(out, trainer=t)

"""One masking interface for every strategy.

A strategy turns ``(rng, batch, aux)`` into a per-token priority score ``[B, N]``.
:func:`partition` ranks the scores once with ``jax.lax.top_k`` and cuts the order into
three index arrays of static sizes:

    highest priority ... lowest priority
    [ visible (encoder) | thrown (nowhere) | masked (decoder + loss) ]

``aux`` is the strategy's device-resident state (a colour-noise bank, a per-example
weight table, ...); it is passed into the jitted step as an argument so that it stays on
the accelerator and is never baked into the program. Shapes are static, and all
randomness comes from the ``rng`` key.

A strategy that needs host-side state across steps (FAMT's per-example weights) returns a
:class:`HostState` from :meth:`Strategy.host_state`; the training task keeps it, calls its
hooks and checkpoints its items, knowing nothing else about it (docs/design.md, "Adding a
masking strategy").
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from colormae_jax.errors import ConfigError


class Partition(NamedTuple):
    """Token indices, each [B, K] int32, in descending priority."""
    visible: jax.Array
    thrown: jax.Array
    masked: jax.Array


@dataclasses.dataclass(frozen=True)
class Counts:
    num_patches: int
    visible: int
    thrown: int
    masked: int


def _checked(c: Counts, mask_ratio: float, throw_ratio: float) -> Counts:
    if c.visible < 1 or c.masked < 1:
        raise ValueError(
            f'mask_ratio={mask_ratio} and throw_ratio={throw_ratio} on {c.num_patches} patches leave '
            f'{c.visible} visible and {c.masked} masked tokens; both must be at least 1 '
            f'(keep mask_ratio + throw_ratio < 1 - 1/{c.num_patches}).')
    return c


def mae_counts(num_patches: int, mask_ratio: float) -> Counts:
    """MAE's (and ColorMAE's) counts: ``len_keep = int(N * (1 - mask_ratio))`` visible, the rest masked."""
    visible = int(num_patches * (1 - mask_ratio))
    return _checked(Counts(num_patches, visible, 0, num_patches - visible), mask_ratio, 0.0)


def amt_counts(num_patches: int, mask_ratio: float, throw_ratio: float) -> Counts:
    """AMT's counts: ``int(N * mask_ratio)`` masked, ``N - int(N * (mask_ratio + throw_ratio))``
    visible, the rest thrown."""
    masked = int(num_patches * mask_ratio)
    visible = num_patches - int(num_patches * (mask_ratio + throw_ratio))
    return _checked(Counts(num_patches, visible, num_patches - masked - visible, masked), mask_ratio, throw_ratio)


def partition(scores: jax.Array, c: Counts) -> Partition:
    """Split tokens by priority: the highest ``c.visible`` scores are visible, the next
    ``c.thrown`` are thrown, the rest are masked."""
    if scores.shape[-1] != c.num_patches:
        raise ValueError(f'scores have {scores.shape[-1]} tokens, expected {c.num_patches}')
    _, order = jax.lax.top_k(scores, c.num_patches)  # a full descending ranking
    order = order.astype(jnp.int32)
    return Partition(order[:, :c.visible], order[:, c.visible:c.visible + c.thrown], order[:, c.visible + c.thrown:])


def masked_map(part: Partition, num_patches: int) -> jax.Array:
    """[B, N] float mask: 1 where masked, 0 where visible, -1 where thrown (for pictures)."""
    b = part.visible.shape[0]
    m = jnp.zeros((b, num_patches), jnp.float32)
    rows = jnp.arange(b)[:, None]
    m = m.at[rows, part.masked].set(1.0)
    return m.at[rows, part.thrown].set(-1.0)


# --------------------------------------------------------------------------- host state

class RunContext(NamedTuple):
    """What a strategy's host state may use of the run it belongs to."""
    config: Any                # the run's config (read only)
    mesh: jax.sharding.Mesh
    model: Any                 # model.MAEConfig
    graphdef: Any              # the MAE's nnx.GraphDef: nnx.merge(graphdef, params) is the model
    steps_per_epoch: int
    total_steps: int
    active: tuple[tuple[int, int], ...]  # [start, end) 0-based steps in which the strategy masks


class HostState:
    """Host-side state of a strategy, with no-op hooks to override.

    The training task calls :meth:`refresh` before every step, merges :meth:`batch_fields`
    into each process-local batch of the steps the strategy masks, passes :meth:`step_aux`
    (when not None) to those steps as their ``aux``, and saves :meth:`items`
    with each checkpoint (restored through :meth:`abstract_items` and :meth:`load_items`).

    Preemption: when SIGTERM arrives before or during :meth:`refresh` (one process), the
    training loop saves the state as it was before the step (the host state's items too) and
    exits without running the step; the relaunch calls :meth:`refresh` for that step again.
    A long refresh (a pass over the dataset) should therefore poll the loop's stop check,
    ``colormae_jax.loop.stop_requested()``, between two pieces of work, stop when it turns
    True and leave its items marked stale so that the relaunch redoes it in full: FAMT's pass
    then leaves ``updated_at`` unchanged (``masking/famt.py``). With several processes the
    check stays False (a collective pass must not stop on one process alone): the pass
    finishes, and JAX's preemption sync point stops the run after the next step.
    """

    def refresh(self, step: int, params: Any, writer: Any) -> None:
        """Before 0-based ``step``, with the current params (e.g. recompute per-example weights);
        may return early on SIGTERM (see the class docstring)."""

    def batch_fields(self, batch: dict) -> dict:
        """Entries added to a process-local numpy batch (its ``index`` names the examples)."""
        return {}

    def step_aux(self) -> Any:
        """Device state the strategy's steps take as their ``aux`` in place of ``init_aux``'s (FAMT's
        weight table with ``data.pipeline='device'``), asked for before each step; None: none. Its
        tree and shapes stay the same over the run, replicated on the mesh (the step compiles once)."""
        return None

    def items(self) -> dict:
        """Checkpoint items ``{name: tree of arrays}``; names must not clash with other strategies'."""
        return {}

    def abstract_items(self) -> dict:
        """Restore targets of :meth:`items`: a tree, or a function of the saved item's metadata."""
        return {}

    def load_items(self, restored: dict) -> None:
        """Takes the restored trees of :meth:`abstract_items`."""


# --------------------------------------------------------------------------- strategies

@dataclasses.dataclass(frozen=True)
class Strategy:
    """Base class. Subclasses override :meth:`scores` (and :meth:`init_aux` if they keep
    device state). Instances are hashable and static under jit: one compiled step per
    strategy."""
    name: str
    grid: int
    mask_ratio: float
    throw_ratio: float = 0.0

    @property
    def counts(self) -> Counts:
        """MAE's formula; with throwing (AMT's idea) AMT's. A strategy may use its paper's own."""
        n = self.grid * self.grid
        return amt_counts(n, self.mask_ratio, self.throw_ratio) if self.throw_ratio else mae_counts(n, self.mask_ratio)

    def check(self, num_devices: int) -> None:
        """Raises :class:`ConfigError` for settings that cannot work (before compiling)."""

    def init_aux(self, rng: jax.Array) -> Any:
        """Device-resident state; returned once, replicated on the mesh, passed to every step."""
        return ()

    def host_state(self, run: RunContext) -> HostState | None:
        """Host-side state kept across steps (one per strategy name and run), or None."""
        return None

    def scores(self, rng: jax.Array, batch: dict, aux: Any) -> jax.Array:
        raise NotImplementedError

    def __call__(self, rng: jax.Array, batch: dict, aux: Any) -> Partition:
        s = self.scores(rng, batch, aux)
        return partition(s, self.counts)


@dataclasses.dataclass(frozen=True)
class RandomMasking(Strategy):
    """MAE's random masking: uniform scores, a fresh permutation per sample."""

    def scores(self, rng, batch, aux):
        b = batch['image'].shape[0]
        return jax.random.uniform(rng, (b, self.grid * self.grid))


def from_config(cls: type, name: str, grid: int, mask_cfg, section: str | None = None, **fixed) -> Strategy:
    """``cls(name, grid, mask.ratio, mask.throw_ratio, ...)`` with every other dataclass field
    of ``cls`` that ``mask_cfg[section]`` sets (the rest keep their defaults), then ``fixed``
    (a schedule phase's own ratios come in ``fixed`` as ``mask_ratio`` / ``throw_ratio``)."""
    sub = mask_cfg.get(section) if section else None
    base = {'name', 'grid', 'mask_ratio', 'throw_ratio'}
    kw = {f.name: sub[f.name] for f in dataclasses.fields(cls)
          if sub is not None and f.name not in base and f.name in sub}
    kw = {'mask_ratio': mask_cfg.ratio, 'throw_ratio': mask_cfg.throw_ratio, **kw, **fixed}
    return cls(name, grid, **kw)


STRATEGIES = {'random': lambda name, grid, cfg, **ratios: from_config(RandomMasking, name, grid, cfg, **ratios)}


def create(mask_cfg, grid: int, name: str | None = None,
           factories: dict[str, Callable[..., Strategy]] | None = None, **ratios) -> Strategy:
    """Build a strategy from ``config.mask``. ``name`` overrides ``mask_cfg.strategy``
    (used by schedules), ``ratios`` (``mask_ratio``, ``throw_ratio``) the config's ratios;
    ``factories``: the strategies to choose from (:func:`colormae_jax.masking.strategies`)."""
    name = name or mask_cfg.strategy
    if name not in factories:
        raise ConfigError('mask.strategy', f'{name!r} is unknown; valid: {sorted(factories)}')
    return factories[name](name, grid, mask_cfg, **ratios)


class Phase(NamedTuple):
    """One entry of ``config.mask.schedule``."""
    name: str
    start: float                # in epochs, or in steps when ``in_steps``
    in_steps: bool = False
    mask_ratio: float | None = None   # None: mask.ratio and mask.throw_ratio
    throw_ratio: float | None = None  # None with a mask ratio: 0

    def ratios(self) -> dict:
        """The ratios this phase sets, as :func:`create` takes them: none, or both."""
        if self.mask_ratio is None:
            return {}
        return {'mask_ratio': self.mask_ratio, 'throw_ratio': self.throw_ratio or 0.0}

    def start_step(self, steps_per_epoch: int) -> int:
        return int(self.start) if self.in_steps else int(round(self.start * steps_per_epoch))

    def describe(self, s: Strategy) -> str:
        return f'{s.name!r} (mask {s.mask_ratio:g}, throw {s.throw_ratio:g}: {s.counts.visible} visible, ' \
               f'{s.counts.masked} masked, {s.counts.thrown} thrown of {s.counts.num_patches})'


_ENTRY = re.compile(r'(?P<name>\w+)(?::(?P<mask>[0-9.eE+-]+)(?:/(?P<throw>[0-9.eE+-]+))?)?'
                    r'(?:@(?P<start>[0-9.eE+-]+)(?P<steps>steps)?)?')
SCHEDULE_SYNTAX = ("NAME[:MASK[/THROW]][@START], START in epochs or 'Nsteps', e.g. 'green,blue@200' or "
                   "'random:0.75,famt:0.45/0.40@40'")


def parse_schedule(mask_cfg, names: list[str]) -> list[Phase]:
    """``config.mask.schedule`` -> the phases, in order, the first starting at 0.

    ``'green,blue@200'`` is green from epoch 0 and blue from epoch 200 (ColorMAE's epoch
    hook); ``'random:0.75,famt:0.45/0.40@40'`` is random masking at 0.75 for 40 epochs, then
    FAMT masking 0.45 and throwing 0.40 (AMT); ``famt@10steps`` starts at step 10. A phase
    without ratios takes ``mask.ratio`` / ``mask.throw_ratio``; one with a mask ratio and no
    throw ratio throws nothing. An empty schedule is ``mask.strategy`` throughout.
    """
    text = mask_cfg.schedule.strip()
    if not text:
        return [Phase(mask_cfg.strategy, 0.0)]
    out = []
    for i, item in enumerate(t.strip() for t in text.split(',')):
        m = _ENTRY.fullmatch(item)
        try:
            if m is None:
                raise ValueError
            start = float(m['start']) if m['start'] else 0.0
            phase = Phase(m['name'], start, bool(m['steps']), float(m['mask']) if m['mask'] else None,
                          float(m['throw']) if m['throw'] else None)
        except ValueError:
            raise ConfigError('mask.schedule', f'{item!r}: expected {SCHEDULE_SYNTAX}') from None
        if phase.name not in names:
            raise ConfigError('mask.schedule', f'{phase.name!r} is unknown; valid: {sorted(names)}')
        if phase.in_steps and start != int(start):
            raise ConfigError('mask.schedule', f'{item!r}: a start in steps is a whole number')
        if phase.mask_ratio is not None and not 0 < phase.mask_ratio < 1:
            raise ConfigError('mask.schedule', f'{item!r}: the mask ratio must be in (0, 1)')
        if phase.throw_ratio is not None and not 0 <= phase.throw_ratio < 1:
            raise ConfigError('mask.schedule', f'{item!r}: the throw ratio must be in [0, 1)')
        if (i == 0) != (start == 0):
            raise ConfigError('mask.schedule', f'the first entry starts at 0 and only the first; got {text!r}')
        if out and out[-1].in_steps == phase.in_steps and start <= out[-1].start:
            raise ConfigError('mask.schedule', f'the starts must increase; got {text!r}')
        out.append(phase)
    return out

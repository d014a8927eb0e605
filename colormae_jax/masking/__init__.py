"""Masking: one interface (:mod:`.core`) and the strategies that plug into it.

A strategy lives in one module of this package that defines ``STRATEGIES``, a dict
``{name: factory(name, grid, mask_cfg, **ratios) -> Strategy}`` (``ratios``: a schedule
phase's ``mask_ratio`` / ``throw_ratio``, when it sets them): ``random`` (:mod:`.core`), the
ColorMAE colours ``red``, ``blue``, ``green``, ``purple`` (:mod:`.colour`) and ``famt``
(:mod:`.famt`). :func:`strategies` finds them by listing the package, so a new strategy is
one new file (and its config section) and nothing registers itself on import.
"""
from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from colormae_jax.masking.core import (
    Counts,
    HostState,
    Partition,
    Phase,
    RandomMasking,
    RunContext,
    Strategy,
    amt_counts,
    create as _create,
    mae_counts,
    masked_map,
    parse_schedule as _parse_schedule,
    partition,
)

Factory = Callable[..., Strategy]


def strategies() -> dict[str, Factory]:
    """Every strategy of the modules of this package (their ``STRATEGIES``), by name."""
    out: dict[str, Factory] = {}
    for module in pkgutil.iter_modules(__path__):
        found = getattr(importlib.import_module(f'{__name__}.{module.name}'), 'STRATEGIES', {})
        clash = set(found) & set(out)
        if clash:
            raise ValueError(f'masking strategy names {sorted(clash)} are defined twice (module {module.name})')
        out.update(found)
    return out


def names() -> list[str]:
    return sorted(strategies())


def create(mask_cfg, grid: int, name: str | None = None, **ratios) -> Strategy:
    """The strategy ``name`` (default ``mask_cfg.strategy``) built from ``config.mask``;
    ``ratios`` (``mask_ratio``, ``throw_ratio``) override the config's."""
    return _create(mask_cfg, grid, name, strategies(), **ratios)


def parse_schedule(mask_cfg) -> list[Phase]:
    """``config.mask.schedule`` -> its phases (see :func:`core.parse_schedule`)."""
    return _parse_schedule(mask_cfg, names())


__all__ = ['Counts', 'HostState', 'Partition', 'Phase', 'RandomMasking', 'RunContext', 'Strategy', 'amt_counts',
           'mae_counts', 'create', 'masked_map', 'names', 'parse_schedule', 'partition', 'strategies']

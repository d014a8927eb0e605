"""Mesh and shardings, declared in the config (big_vision style).

``config.mesh`` is a list of ``(axis_name, size)`` pairs; one size may be -1 (take the
remaining devices). The batch is split over every axis (``data`` and ``fsdp``); params
and optimizer state are replicated over ``data`` and, if the ``fsdp`` axis is larger than
1, each array is split over ``fsdp`` along its largest divisible dimension (ZeRO-3 style).
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ('data', 'fsdp')


def mesh_shape(mesh_cfg: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
    names = tuple(str(n) for n, _ in mesh_cfg)
    sizes = [int(s) for _, s in mesh_cfg]
    unknown = set(names) - set(AXES)
    if unknown or len(set(names)) != len(names):
        raise ValueError(f'mesh={list(mesh_cfg)}: axis names must be distinct and among {AXES}')
    if sizes.count(-1) > 1:
        raise ValueError(f'mesh={list(mesh_cfg)}: at most one axis may have size -1')
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(f'mesh={list(mesh_cfg)} does not fit {num_devices} devices: the sizes must be '
                         f'positive (or -1) and their product must divide the device count')
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(f'mesh={list(mesh_cfg)} uses {math.prod(sizes)} devices but {num_devices} are '
                         f'available; use -1 for one axis to take the rest')
    return names, tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    names, sizes = mesh_shape(mesh_cfg, len(devices))
    if devices == list(jax.devices()):
        # Topology-aware device order on TPU/GPU. Auto axes: jit propagates the shardings.
        return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))
    return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(n for n in mesh.axis_names if n in AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every mesh axis."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def batch_spec(mesh: Mesh) -> P:
    return P(batch_axes(mesh))


def local_rows(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order, as numpy."""
    return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, batch_spec(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """Split the largest dimension divisible by the fsdp axis; small arrays stay replicated."""
    if fsdp_size <= 1 or math.prod(shape) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = 'fsdp'
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """A NamedSharding for every leaf of a (possibly abstract) train state."""
    fsdp_size = dict(zip(mesh.axis_names, mesh.devices.shape)).get('fsdp', 1)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size)), abstract_state)


def global_batch_check(global_batch: int, mesh: Mesh) -> None:
    n = math.prod(mesh.devices.shape)
    if global_batch % n:
        raise ValueError(f'batch_size={global_batch} is not divisible by the {n} devices of the mesh; '
                         f'use a multiple of {n}')
    p = jax.process_count()
    if global_batch % p:
        raise ValueError(f'batch_size={global_batch} is not divisible by the {p} processes (each reads batch_size / '
                         f'{p} examples per step); use a multiple of {p}, e.g. {p * max(1, global_batch // p)}')

"""Multi-process start-up: ``jax.distributed`` on TPU pods, GPU clusters and CPU loopback.

One call, :func:`initialize`, before anything touches a device (``colormae_jax.main`` makes it
first thing). It decides whether the run is multi-process and, if so, calls
``jax.distributed.initialize``:

* **explicit**: a coordinator address, a process count or a process id is given (arguments,
  i.e. the ``--coordinator_address`` / ``--num_processes`` / ``--process_id`` flags of
  ``colormae_jax.main``, else the ``COLORMAE_COORDINATOR_ADDRESS`` / ``COLORMAE_NUM_PROCESSES``
  / ``COLORMAE_PROCESS_ID`` environment variables). A process count of 1 is a single-process
  run. Values not given are auto-detected by JAX (e.g. the process id from SLURM);
* **detected**: none is given, and JAX's own cluster detection finds a TPU pod (Cloud TPU
  VM metadata or GKE), a SLURM job step or an Open MPI job with more than one process;
* otherwise the run is single-process and ``jax.distributed`` is left alone.

``distributed='on'`` always initializes (e.g. a single-host TPU VM that should still start
the coordination service), ``'off'`` never does.

Failures: every process sends heartbeats to the coordination service (hosted by process
0). A process that stops (crash, kill, lost host) is declared dead after
``heartbeat_timeout`` seconds and every other process is then terminated by JAX (SIGABRT,
exit code 134) instead of hanging in a collective; if process 0 dies the others lose the
service and stop at once. Relaunching all processes resumes from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import jax
from absl import logging

MODES = ('auto', 'on', 'off')
CPU_COLLECTIVES = ('gloo', 'mpi')

# Environment fallbacks of the arguments of :func:`initialize` (flags win).
ENV = {
    'distributed': 'COLORMAE_DISTRIBUTED',
    'coordinator_address': 'COLORMAE_COORDINATOR_ADDRESS',
    'num_processes': 'COLORMAE_NUM_PROCESSES',
    'process_id': 'COLORMAE_PROCESS_ID',
    'cpu_collectives': 'COLORMAE_CPU_COLLECTIVES',
    'initialization_timeout': 'COLORMAE_INITIALIZATION_TIMEOUT',
    'heartbeat_timeout': 'COLORMAE_HEARTBEAT_TIMEOUT',
}
DEFAULT_INITIALIZATION_TIMEOUT = 300  # s, JAX's default: how long processes wait for each other at start
DEFAULT_HEARTBEAT_TIMEOUT = 100       # s, JAX's default: silence after which a process is declared dead


class DistributedError(ValueError):
    """Bad multi-process settings; the message says which and how to fix them."""


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """What :func:`initialize` did and the topology it left."""
    initialized: bool       # jax.distributed.initialize was called
    how: str                # 'single-process', 'explicit', 'detected <cluster>', 'forced (distributed=on)'
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    platform: str

    def describe(self) -> str:
        return (f'process {self.process_index} of {self.process_count} ({self.how}): {self.local_device_count} '
                f'local of {self.device_count} {self.platform} devices')


def _get(name: str, value, env: Mapping[str, str]):
    """``value``, else the environment variable of ``name`` (as a string), else None."""
    if value is not None and value != '':
        return value
    v = env.get(ENV[name], '')
    return v if v != '' else None


def _int(name: str, value, minimum: int) -> int | None:
    if value is None:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v is None or v < minimum or (isinstance(value, float) and value != v):
        raise DistributedError(f'{name}={value!r} must be an integer >= {minimum} '
                               f'(flag --{name} or environment variable {ENV[name]})')
    return v


def detect_cluster() -> tuple[str, int] | None:
    """``(cluster name, process count)`` of the cluster JAX would auto-detect (TPU pod, SLURM,
    Open MPI, Kubernetes), or None. Uses JAX's own detectors (``jax._src.clusters``; jax is
    pinned in pyproject.toml), so it agrees with what ``jax.distributed.initialize()`` does."""
    try:
        from jax._src.clusters import ClusterEnv
    except ImportError:  # a jax without the registry: only explicit settings work
        return None
    for env in ClusterEnv._cluster_types:
        if getattr(env, 'opt_in_only_method', False):
            continue  # e.g. mpi4py: only when asked for by name
        try:
            if env.is_env_present():
                return getattr(env, 'name', '') or env.__name__, int(env.get_process_count())
        except Exception as e:  # a detector that cannot reach its metadata: not that cluster
            logging.warning('cluster detection %s failed: %s: %s', env.__name__, type(e).__name__, e)
    return None


def initialize(*, distributed: str | None = None, coordinator_address: str | None = None,
               num_processes: int | str | None = None, process_id: int | str | None = None,
               cpu_collectives: str | None = None, initialization_timeout: int | str | None = None,
               heartbeat_timeout: int | str | None = None,
               environ: Mapping[str, str] | None = None) -> DistributedInfo:
    """Starts ``jax.distributed`` when the run is multi-process (see the module doc); logs and
    returns the topology. Must come before anything touches a device.

    ``cpu_collectives`` ('gloo' or 'mpi') sets ``jax_cpu_collectives_implementation``: CPU
    devices of different processes can then compute together (loopback tests, CPU clusters).
    Left unset, a multi-process run with ``JAX_PLATFORMS=cpu`` uses 'gloo'.
    """
    env = os.environ if environ is None else environ
    mode = (_get('distributed', distributed, env) or 'auto').lower()
    if mode not in MODES:
        raise DistributedError(f'distributed={mode!r}; valid: {MODES} (flag --distributed or {ENV["distributed"]})')
    address = _get('coordinator_address', coordinator_address, env)
    count = _int('num_processes', _get('num_processes', num_processes, env), 1)
    pid = _int('process_id', _get('process_id', process_id, env), 0)
    init_timeout = _int('initialization_timeout', _get('initialization_timeout', initialization_timeout, env), 1)
    hb_timeout = _int('heartbeat_timeout', _get('heartbeat_timeout', heartbeat_timeout, env), 1)
    collectives = _get('cpu_collectives', cpu_collectives, env)
    if collectives is not None and collectives not in CPU_COLLECTIVES:
        raise DistributedError(f'cpu_collectives={collectives!r}; valid: {CPU_COLLECTIVES} '
                               f'(flag --cpu_collectives or {ENV["cpu_collectives"]})')
    if count is not None and pid is not None and pid >= count:
        raise DistributedError(f'process_id={pid} must be in [0, num_processes={count})')
    if address is not None and ':' not in address:
        raise DistributedError(f'coordinator_address={address!r} must be HOST:PORT, the address of process 0 and a '
                               f'free port on it, e.g. 10.0.0.1:8476')

    explicit = address is not None or count is not None or pid is not None
    if mode == 'off':
        how = None
    elif mode == 'on':
        how = 'forced (distributed=on)'
    elif explicit:
        how = 'explicit' if count is None or count > 1 else None
    else:
        found = detect_cluster()
        how = f'detected {found[0]}' if found is not None and found[1] > 1 else None

    if how is not None:
        missing = [f'--{n} (or {ENV[n]})' for n, v in (('coordinator_address', address), ('num_processes', count),
                                                        ('process_id', pid)) if v is None]
        if missing and detect_cluster() is None:
            raise DistributedError(f'a multi-process run outside a TPU pod, SLURM or Open MPI job needs '
                                   f'{", ".join(missing)} on every process')
        platforms = str(env.get('JAX_PLATFORMS', '') or jax.config.jax_platforms or '')
        if collectives is None and platforms.split(',')[0].strip().lower() == 'cpu':
            collectives = 'gloo'
        if collectives is not None:
            jax.config.update('jax_cpu_collectives_implementation', collectives)
        kwargs = dict(coordinator_address=address, num_processes=count, process_id=pid,
                      initialization_timeout=init_timeout or DEFAULT_INITIALIZATION_TIMEOUT,
                      heartbeat_timeout_seconds=hb_timeout or DEFAULT_HEARTBEAT_TIMEOUT)
        logging.info('Starting jax.distributed (%s): %s', how,
                     ', '.join(f'{k}={v}' for k, v in kwargs.items() if v is not None))
        jax.distributed.initialize(**kwargs)

    info = DistributedInfo(initialized=how is not None, how=how or 'single-process',
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                           platform=jax.devices()[0].platform)
    logging.info('JAX %s: %s.', jax.__version__, info.describe())
    return info

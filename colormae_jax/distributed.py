"""Multi-process start-up: ``jax.distributed`` on TPU pods, GPU clusters and CPU loopback.

One call, :func:`initialize`, before anything touches a device (``colormae_jax.main`` makes it
first thing). It decides whether the run is multi-process and, if so, calls
``jax.distributed.initialize``:

* **explicit**: a coordinator address, a process count or a process id is given (arguments,
  i.e. the ``--coordinator_address`` / ``--num_processes`` / ``--process_id`` flags of
  ``colormae_jax.main``, else the ``COLORMAE_COORDINATOR_ADDRESS`` / ``COLORMAE_NUM_PROCESSES``
  / ``COLORMAE_PROCESS_ID`` environment variables). A process count of 1 is a single-process
  run. Values not given are auto-detected by JAX (e.g. the process id from SLURM);
* **detected**: none is given, and the scheduler's environment (:func:`detect_cluster`) shows
  a SLURM job step or an Open MPI job with more than one process, or a TPU VM (libtpu
  installed). ``jax.distributed.initialize()`` then fills in the settings from the same
  environment, as JAX documents for these clusters (on TPU from the VM metadata, so a TPU
  VM outside a pod slice starts a one-process service; when JAX finds no TPU slice the run is
  single-process). Other clusters (e.g. plain Kubernetes jobs) need the settings;
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
import importlib.util
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


def _count(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name, '')
    if v.isdigit():
        return int(v)
    logging.warning('%s=%r is not a process count; not treated as a cluster', name, v)
    return None


def detect_cluster(environ: Mapping[str, str] | None = None) -> tuple[str, int | None] | None:
    """``(cluster, process count)`` of the multi-process launch this process is part of, read
    from the variables the schedulers set (``jax.distributed.initialize()`` reads the same ones
    to fill in what is not given), or None:

    * ``'slurm'``: an ``srun`` job step (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``,
      ``SLURM_PROCID``, ``SLURM_LOCALID``), ``SLURM_NTASKS`` processes;
    * ``'ompi'``: Open MPI's ``mpirun``, ``OMPI_COMM_WORLD_SIZE`` processes;
    * ``'tpu'``: the libtpu package is installed and ``JAX_PLATFORMS`` allows TPUs: a GKE TPU
      slice (``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` hosts, times
      ``MEGASCALE_NUM_SLICES``), else a TPU VM whose slice only JAX's detection reads (the VM
      metadata): count None.
    """
    env = os.environ if environ is None else environ
    if all(v in env for v in ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                              'SLURM_LOCALID')):
        count = _count(env, 'SLURM_NTASKS')
        return None if count is None else ('slurm', count)
    if 'OMPI_COMM_WORLD_SIZE' in env:
        count = _count(env, 'OMPI_COMM_WORLD_SIZE')
        return None if count is None else ('ompi', count)
    platforms = str(env.get('JAX_PLATFORMS', '') or jax.config.jax_platforms or '').lower()
    if (not platforms or 'tpu' in platforms) and importlib.util.find_spec('libtpu') is not None:
        hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES')
        slices = env.get('MEGASCALE_NUM_SLICES', '')
        return 'tpu', (len(hosts.split(',')) * (int(slices) if slices.isdigit() else 1) if hosts else None)
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
        found = detect_cluster(env)
        how = f'detected {found[0]}' if found is not None and (found[1] is None or found[1] > 1) else None

    if how is not None:
        missing = [f'--{n} (or {ENV[n]})' for n, v in (('coordinator_address', address), ('num_processes', count),
                                                        ('process_id', pid)) if v is None]
        cluster = detect_cluster(env) if missing else None
        if missing and cluster is None:
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
        try:
            jax.distributed.initialize(**kwargs)
        except ValueError as e:  # JAX's detection did not find what was missing
            if not missing:
                raise
            if how == 'detected tpu' and cluster[1] is None:
                logging.info('No TPU slice found by jax.distributed (%s): single-process.', e)
                how = None
            else:
                raise DistributedError(f'{cluster[0]}: jax.distributed could not find {", ".join(missing)} ({e}); '
                                       f'give them on every process') from e

    info = DistributedInfo(initialized=how is not None, how=how or 'single-process',
                           process_index=jax.process_index(), process_count=jax.process_count(),
                           local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                           platform=jax.devices()[0].platform)
    logging.info('JAX %s: %s.', jax.__version__, info.describe())
    return info

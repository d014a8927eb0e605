r"""Run a task from a config file: MAE pre-training, or an evaluation of a pre-trained encoder.

  python -m colormae_jax.main --config configs/cifar10.py:smoke --workdir /tmp/mae_smoke
  python -m colormae_jax.main --config configs/cifar10.py:mask=random --config.batch_size=512 --workdir /tmp/mae
  python -m colormae_jax.main --config configs/cifar10_eval.py:task=knn --config.init_from=/tmp/mae --workdir /tmp/knn

``config.task`` picks the task from :data:`TASKS`.

Multi-process (docs/multihost.md): on a TPU pod, under SLURM or Open MPI, run the same
command on every host; ``jax.distributed`` is started by itself. Elsewhere give each process
the coordinator and its rank (flags, or the COLORMAE_* environment variables):

  python -m colormae_jax.main --config ... --workdir ... \
      --coordinator_address=10.0.0.1:8476 --num_processes=2 --process_id=0
"""
import jax
import numpy as np
from absl import app, flags, logging
from jax.experimental import multihost_utils
from ml_collections import config_flags

from colormae_jax import datasets, distributed
from colormae_jax.errors import ConfigError, DataError
from colormae_jax.tasks import finetune, knn, linear_probe, pretrain

# config.task -> its module: validate(config, num_devices, check_data), train_and_evaluate(config, workdir, ...)
TASKS = {'pretrain': pretrain, 'knn': knn, 'linear_probe': linear_probe, 'finetune': finetune}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py:smoke',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs; an existing one is resumed.')
flags.mark_flags_as_required(['config', 'workdir'])

_env = distributed.ENV
_DISTRIBUTED = flags.DEFINE_enum(
    'distributed', None, list(distributed.MODES),
    f'jax.distributed: auto (default: start it when the run is multi-process: explicit settings below, or a TPU pod, '
    f'SLURM or Open MPI job detected by JAX), on (always), off (never). Env: {_env["distributed"]}.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, f'HOST:PORT of process 0 (the coordinator). Env: {_env["coordinator_address"]}.')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, f'Number of processes (1: single-process). Env: {_env["num_processes"]}.', lower_bound=1)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, f'This process, in [0, num_processes). Env: {_env["process_id"]}.', lower_bound=0)
_CPU_COLLECTIVES = flags.DEFINE_enum(
    'cpu_collectives', None, list(distributed.CPU_COLLECTIVES),
    f'Cross-process collectives of CPU devices (multi-process runs with JAX_PLATFORMS=cpu use gloo by default). '
    f'Env: {_env["cpu_collectives"]}.')
_INIT_TIMEOUT = flags.DEFINE_integer(
    'initialization_timeout', None, f'Seconds every process waits for the others at start (default '
    f'{distributed.DEFAULT_INITIALIZATION_TIMEOUT}). Env: {_env["initialization_timeout"]}.', lower_bound=1)
_HEARTBEAT_TIMEOUT = flags.DEFINE_integer(
    'heartbeat_timeout', None, f'Seconds of silence after which a process is declared dead and the others stop '
    f'(default {distributed.DEFAULT_HEARTBEAT_TIMEOUT}). Env: {_env["heartbeat_timeout"]}.', lower_bound=1)


def configure_logging(process_index: int = 0) -> None:
    """INFO on process 0, WARNING elsewhere (progress and metrics are process 0's job); orbax's
    and grain's per-file INFO chatter is dropped, their warnings kept."""
    logging.set_verbosity(logging.INFO if process_index == 0 else logging.WARNING)
    logger = logging.get_absl_logger()
    if _drop_io_chatter not in logger.filters:
        logger.addFilter(_drop_io_chatter)


def _drop_io_chatter(record) -> bool:
    return record.levelno >= 30 or ('/orbax/' not in record.pathname and '/grain/' not in record.pathname)


def prepare_data_once(config) -> None:
    """With several processes, process 0 prepares the data (an image folder is converted to
    array_record on first use) while the others wait, so that they do not race to write the
    same files on a shared disk; then each process checks (or prepares) its own view."""
    if jax.process_count() == 1:
        return
    error = None
    if jax.process_index() == 0:
        try:
            datasets.prepare(config.data)
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the other processes
            error = e
    # Every process learns whether process 0 succeeded (instead of waiting at a barrier
    # until the heartbeat timeout declares it dead).
    ok = bool(multihost_utils.broadcast_one_to_all(np.asarray(error is None)))
    if error is not None:
        raise error
    if not ok:
        raise DataError('process 0 could not prepare the data; its log says why')


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if not _WORKDIR.value.strip():
        raise app.UsageError('--workdir is empty: give the folder for checkpoints and logs (an existing one is '
                             'resumed), e.g. --workdir=/tmp/colormae_run')
    configure_logging()
    try:  # before anything touches a device
        info = distributed.initialize(
            distributed=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, cpu_collectives=_CPU_COLLECTIVES.value,
            initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    except distributed.DistributedError as e:
        raise app.UsageError(str(e)) from None
    configure_logging(info.process_index)
    config = _CONFIG.value
    try:  # before process 0 spends hours preparing the data
        task = task_module(config)
        task.validate(config)
    except ConfigError as e:
        raise app.UsageError(str(e)) from None
    prepare_data_once(config)
    task.train_and_evaluate(config, _WORKDIR.value)


def task_module(config):
    """The module of ``config.task``."""
    if config.task not in TASKS:
        raise ConfigError('task', f'{config.task!r}; valid: {sorted(TASKS)}')
    return TASKS[config.task]


def run(config, workdir: str, **kw) -> dict:
    """Runs ``config.task`` (validated first) in ``workdir``: what ``main`` does, from Python."""
    return task_module(config).train_and_evaluate(config, workdir, **kw)


if __name__ == '__main__':
    app.run(main)

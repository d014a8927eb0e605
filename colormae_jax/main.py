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

The command line (flags, errors as one line, exit codes) is :mod:`colormae_jax.cli`. Exit
codes: 0 finished; 2 a user error, printed as one line ``error: <key or file>: <what is
wrong>; <what to do>`` (``--verbose`` or COLORMAE_VERBOSE=1: the traceback instead); 3 a
non-finite loss (nothing bad saved: fix the config and relaunch to resume); 75
(:data:`EXIT_PREEMPTED`) stopped early after saving, on SIGTERM: relaunch to resume
(docs/multihost.md, "Preemption and requeueing").
"""
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from colormae_jax import cli as cli_lib, loop
from colormae_jax.checkpoints.workdir import WorkdirLock
from colormae_jax.cli import EXIT_NON_FINITE, EXIT_PREEMPTED, EXIT_USER_ERROR  # noqa: F401 - main.EXIT_*
from colormae_jax.data import sources as datasets
from colormae_jax.errors import ConfigError, DataError
from colormae_jax.tasks import finetune, knn, linear_probe, pretrain, segment

# config.task -> its module: validate(config, num_devices, check_data), train_and_evaluate(config, workdir, ...)
TASKS = {'pretrain': pretrain, 'knn': knn, 'linear_probe': linear_probe, 'finetune': finetune,
         'segment': segment}


def main(argv) -> int:
    """The run of a parsed command line; returns its exit code (0 finished, EXIT_PREEMPTED)."""
    config, workdir = cli_lib.start(argv)
    task = task_module(config)  # before process 0 spends hours preparing the data
    task.validate(config)
    cli_lib.check_workdir(workdir)
    # A second run on the workdir is refused now, before data or compiling; SIGTERM stops the data work too.
    with WorkdirLock(workdir), loop.sigterm_stops_passes():
        try:
            prepare_data_once(config)
            out = task.train_and_evaluate(config, workdir)
        except datasets.PreparationStopped as e:  # released the data's lock; nothing half-written kept
            logging.warning('%s.', e)
            out = {'preempted': True}
    cli_lib.log_summary(config, workdir, out)
    return EXIT_PREEMPTED if out.get('preempted') else 0


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


def task_module(config):
    """The module of ``config.task``."""
    if config.task not in TASKS:
        raise ConfigError('task', f'{config.task!r}; valid: {sorted(TASKS)}')
    return TASKS[config.task]


def run(config, workdir: str, **kw) -> dict:
    """Runs ``config.task`` (validated first) in ``workdir``: what ``main`` does, from Python.
    A task that trains returns ``step``, ``losses``, ``state`` and ``preempted`` (stopped early
    on SIGTERM or at ``deadline``, after saving), an evaluation its ``results``."""
    return task_module(config).train_and_evaluate(config, workdir, **kw)


def cli(argv: list[str] | None = None) -> None:
    """``python -m colormae_jax.main``: :func:`main` under absl, errors as one line and exit
    codes as :mod:`colormae_jax.cli` says."""
    cli_lib.run(main, argv)


if __name__ == '__main__':
    cli()

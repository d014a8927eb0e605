r"""The command line of ``python -m colormae_jax.main``: flags, logging, and errors as one line.

:mod:`colormae_jax.main` holds what a run does (the task table, ``main``); this module holds
how a command line becomes a run and how it ends: the flags (``--config``, ``--workdir``,
``--verbose`` and the ``jax.distributed`` ones), absl's flag parsing with every error turned
into one line (:func:`parse_flags`, a typo'd key named with the closest valid one), the log
filters, the checks before anything is prepared or compiled (:func:`check_workdir`), the
closing summary, and :func:`run`, which runs ``main`` under absl and maps how it ended to
the exit code:

  0   (EXIT_OK)          the run finished;
  2   (EXIT_USER_ERROR)  a bad flag, config, data, checkpoint or workdir, printed as one line
                         ``error: <key or file>: <what is wrong>; <what to do>`` on stderr
                         (``--verbose`` or COLORMAE_VERBOSE=1: the traceback instead);
  3   (EXIT_NON_FINITE)  the training loss (or another metric) became NaN or infinite: the run
                         stopped without saving the bad state, one ``error:`` line says what to
                         change; a relaunch resumes from the last good checkpoint;
  75  (EXIT_PREEMPTED)   stopped early after saving (SIGTERM, or the deadline of ``main.run``):
                         relaunch the same command to resume (docs/multihost.md, "Preemption
                         and requeueing"; EX_TEMPFAIL of sysexits.h).

Anything else is a crash (1, with a traceback) or a signal (128 + N, e.g. 137 for ``kill -9``).
"""
import difflib
import errno
import json
import os
import re
import sys
from typing import Callable

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from colormae_jax import config_lib, distributed
from colormae_jax.checkpoints import checkpointer as checkpoint, workdir as workdir_lib
from colormae_jax.errors import ConfigError, DataError, chain
from colormae_jax.loop import NonFiniteMetrics
from colormae_jax.tools import absl_help

EXIT_OK = 0
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: a temporary failure, try again

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/cifar10.py:smoke',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs; an existing one is resumed.')
flags.mark_flags_as_required(['config', 'workdir'])

VERBOSE_ENV = 'COLORMAE_VERBOSE'
_VERBOSE = flags.DEFINE_bool('verbose', False, f'On an error a user can fix, raise it with its Python traceback '
                                               f'instead of one line. Env: {VERBOSE_ENV}=1.')

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
    and grain's per-file INFO chatter is dropped, their warnings kept; so are two lines that
    say nothing on a CPU or GPU host: JAX's INFO that the TPU backend could not be initialised
    and TFDS's ``Using custom data configuration`` warning, repeated each time an image folder's
    builder is made (:func:`_drop_noise`)."""
    logging.set_verbosity(logging.INFO if process_index == 0 else logging.WARNING)
    logger = logging.get_absl_logger()
    if _drop_io_chatter not in logger.filters:
        logger.addFilter(_drop_io_chatter)
    handler = logging.get_absl_handler()  # also sees the records of Python loggers (JAX's), through the root logger
    if _drop_noise not in handler.filters:
        handler.addFilter(_drop_noise)


def _drop_io_chatter(record) -> bool:
    if '/orbax/' not in record.pathname and '/grain/' not in record.pathname:
        return True
    return record.levelno >= 30 and not _storage_failure(record)


def _storage_failure(record) -> bool:
    """A record of orbax's about a save that failed for lack of space or permission (with its
    traceback): dropped, the run stops on that failure with one ``error:`` line."""
    if record.exc_info and workdir_lib.storage_error(record.exc_info[1]) is not None:
        return True
    try:
        return workdir_lib.storage_error(Exception(record.getMessage())) is not None
    except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
        return False


_NOISE = (
    (20, "Unable to initialize backend 'tpu'"),  # JAX on a host without libtpu (INFO)
    (30, 'Using custom data configuration'),  # TFDS, each time an image folder's builder is made
)


def _drop_noise(record) -> bool:
    """False for the records of :data:`_NOISE` (at most at their level); every other record passes."""
    try:
        msg = record.getMessage()
    except Exception:  # noqa: BLE001 - a record that cannot format is not ours to drop
        return True
    if f'{os.sep}asyncio{os.sep}' in record.pathname and _storage_failure(record):
        return False  # "Task exception was never retrieved" of orbax's writes after a failed save
    return not any(record.levelno <= level and msg.startswith(text) for level, text in _NOISE)


def start(argv: list[str]):
    """The parsed command line as ``(config, workdir)``, once the logging is set and
    ``jax.distributed`` started (before anything touches a device)."""
    if len(argv) > 1:
        raise CommandLineError(f'{argv[1]}: unexpected argument; flags take the form --name=value (see --helpshort)')
    if not _WORKDIR.value.strip():
        raise CommandLineError('--workdir: empty; give the folder for checkpoints and logs (an existing one is '
                               'resumed), e.g. --workdir=/tmp/colormae_run')
    configure_logging()
    info = distributed.initialize(  # a DistributedError is printed as one line
        distributed=_DISTRIBUTED.value, coordinator_address=_COORDINATOR.value,
        num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value, cpu_collectives=_CPU_COLLECTIVES.value,
        initialization_timeout=_INIT_TIMEOUT.value, heartbeat_timeout=_HEARTBEAT_TIMEOUT.value)
    configure_logging(info.process_index)
    return _CONFIG.value, _WORKDIR.value


def check_workdir(workdir: str) -> None:
    """Creates a local ``workdir`` (a ``gs://`` one is left to the checkpointer) and checks that it
    is a writable folder, before anything is prepared or compiled."""
    if '://' in workdir:
        return
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise CommandLineError(f'{workdir}: cannot create the workdir ({e.strerror}); give --workdir a folder '
                               f'this user can write') from e
    if not os.access(workdir, os.W_OK | os.X_OK):
        raise CommandLineError(f'{workdir}: the workdir is not writable; give --workdir a folder this user can '
                               f'write (or fix its permissions)')
    checkpoints = os.path.join(workdir, 'checkpoints')
    if os.path.isdir(checkpoints) and (err := workdir_lib.check_writable(checkpoints)) is not None:
        raise CommandLineError(f'{checkpoints}: cannot be written ({err.strerror}): the run could not save its '
                               f'steps; make it writable, or copy the workdir and give the copy as --workdir')


def log_summary(config, workdir: str, out: dict) -> None:
    """One closing line: the step reached, the last loss, the results and where the outputs went."""
    parts = []
    if out.get('step') is not None:
        parts.append(f'step {out["step"]}' + (f' of {out["total_steps"]}' if out.get('total_steps') else ''))
    if out.get('losses'):
        parts.append(f'last loss {out["losses"][-1]:.4f}')
    results = out.get('results') or _last_knn(workdir)
    shown = {k: v for k, v in results.items() if k not in ('step', 'epoch')}
    if shown:
        at = f'kNN monitor at step {results["step"]}: ' if 'step' in results and not out.get('results') else ''
        parts.append(at + ', '.join(f'{k}={v:.2f}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items()))
    where = os.path.abspath(workdir) if '://' not in workdir else workdir
    places = [f'TensorBoard in {where}/tb']
    if 'losses' in out:  # a task that trains (and checkpoints)
        places.insert(0, f'checkpoints in {where}/checkpoints')
    if out.get('results'):
        places.append(f'results in {where}/results.json')
    head = (f'Stopped early (SIGTERM or deadline; exit code {EXIT_PREEMPTED}: relaunch the same command to resume)'
            if out.get('preempted') else f'Done ({config.task})')
    logging.info('%s: %s; %s.', head, '; '.join(parts) or 'nothing trained', ', '.join(places))


def _last_knn(workdir: str) -> dict:
    """The last kNN monitor result of a pre-training run (``workdir/knn.jsonl``), or {}."""
    path = os.path.join(workdir, 'knn.jsonl')
    if '://' in workdir or not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            lines = [x for x in f.read().splitlines() if x.strip()]
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------ errors as one line

class CommandLineError(Exception):
    """A bad command line; the message is ``<flag, key or file>: <what is wrong>; <what to do>``."""


# What a user can fix: printed as one line ``error: ...`` with exit code EXIT_USER_ERROR (EXIT_NON_FINITE for
# NonFiniteMetrics).
USER_ERRORS = (CommandLineError, ConfigError, DataError, checkpoint.CheckpointError, checkpoint.CheckpointMismatch,
               distributed.DistributedError, NonFiniteMetrics)


def error_line(e: BaseException, workdir: str | None = None) -> str | None:
    """``error: ...``, one line, for an error a user can fix (:data:`USER_ERRORS`, and an
    ``OSError`` about a file in ``workdir``); None for anything else (a bug: shown with its
    traceback)."""
    if isinstance(e, ConfigError) and e.key is None:  # re-raised by config_flags: the original says it better
        e = next((x for x in chain(e) if isinstance(x, ConfigError) and x.key is not None), e)
    if isinstance(e, checkpoint.CheckpointMismatch):
        msg = re.sub(r'^The checkpoint (\S+) does not match this config:', r'\1: the checkpoint does not match this '
                     r'config:', str(e))
    elif isinstance(e, USER_ERRORS):
        msg = str(e)
    elif (isinstance(e, OSError) and e.errno not in _NO_ROOM and workdir and '://' not in workdir
          and _inside(e.filename, workdir)):
        msg = (f'{e.filename}: {e.strerror or e}; give --workdir a folder this user can write (an existing one is '
               f'resumed)')
    elif (err := _storage(e, workdir)) is not None:  # disk full, file-size limit, read-only
        inside = workdir and '://' not in workdir and _inside(err.filename, workdir)
        msg = workdir_lib.storage_message(err, key='--workdir' if inside else None,
                                          then='it resumes from the last checkpoint' if inside else '')
    else:
        return None
    return 'error: ' + _one_line(data_root_hint(msg))


_ROOT_EXAMPLE = re.compile(r'--config\.data\.root=([^\s;,)]+)')
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def data_root_hint(msg: str, example: str = '--config.data.root={}') -> str:
    """``msg`` with each relative ``--config.data.root=PATH`` example that does not exist from the
    working directory (a run started outside the repository root) written as ``example`` of a path
    that exists: PATH taken from the repository root, else a placeholder saying what to give."""
    def fix(m: re.Match) -> str:
        path = m.group(1)
        if os.path.isabs(path) or os.path.isdir(path):
            return example.format(path)
        found = os.path.normpath(os.path.join(REPO_ROOT, path))
        if os.path.isdir(found):
            return example.format(found)
        return example.format('/ABSOLUTE/PATH/TO/cifar10') + f' (the folder of train/ and test/; a relative path is ' \
                                                             f'read from the working directory, {os.getcwd()})'
    return _ROOT_EXAMPLE.sub(fix, msg)


_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # storage errors whose fix is not another folder's permissions


def _storage(e: BaseException, workdir: str | None) -> OSError | None:
    """The storage failure behind ``e`` (``workdir.storage_error``), except a permission error
    outside the workdir: the data's are worded by the data code, any other is a bug."""
    err = workdir_lib.storage_error(e)
    if err is None or (err.errno in (errno.EACCES, errno.EPERM) and not (
            workdir and '://' not in workdir and _inside(err.filename, workdir))):
        return None
    return err


def _one_line(msg: str) -> str:
    """A message of several lines (a list after a colon) as one: the lines joined by '; '."""
    lines = [x.strip() for x in str(msg).strip().splitlines() if x.strip()]
    out = lines[0] if lines else ''
    for x in lines[1:]:
        out += (' ' if out.endswith(':') else '; ') + x
    return out


def _inside(path, folder: str) -> bool:
    if not isinstance(path, (str, os.PathLike)):
        return False
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _verbose(argv=None) -> bool:
    """``--verbose`` (parsed, or on the command line when the flags did not parse) or COLORMAE_VERBOSE=1."""
    if os.environ.get(VERBOSE_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on'):
        return True
    if flags.FLAGS.is_parsed():
        return bool(_VERBOSE.value)
    return any(a in ('--verbose', '--verbose=true', '--verbose=True', '--verbose=1') for a in (argv or sys.argv))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every error (an unknown ``--config.KEY``, a value of the wrong
    type, a config file that is missing or refuses its argument) raised as one
    :class:`CommandLineError` instead of a traceback or the flag help."""
    try:
        rest = flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 - config_flags raises what its parsers raise (KeyError, ValueError, ...)
        if _verbose(argv):
            raise
        raise CommandLineError(_flag_error(e, argv)) from e
    config = flags.FLAGS['config'].value
    if not isinstance(config, ml_collections.ConfigDict):  # config_flags defers a file that failed to load
        path = _config_arg(argv).split(':', 1)[0]
        try:
            config.lock()
        except Exception as e:  # noqa: BLE001 - the deferred error, for its last line
            why = [x.strip() for x in str(e).splitlines() if x.strip()]
            if _verbose(argv):
                raise
            if not os.path.isfile(path):
                raise CommandLineError(f'{path}: config file not found (relative to {os.getcwd()}); give --config an '
                                       f'existing file, e.g. --config=configs/cifar10.py:smoke') from None
            raise CommandLineError(f'{path}: cannot load the config file ({why[-1] if why else e}); fix it, or run '
                                   f'with --verbose for the traceback') from None
    return rest


def _config_arg(argv) -> str | None:
    for i, a in enumerate(argv):
        if a.startswith('--config=') or a.startswith('-config='):
            return a.split('=', 1)[1]
        if a in ('--config', '-config') and i + 1 < len(argv):
            return argv[i + 1]
    return None


def _load_config(arg: str):
    """The config of ``--config=arg`` without the overrides, or None."""
    try:
        c = config_lib.load_config_file(arg)
        return c if isinstance(c, ml_collections.ConfigDict) else None
    except Exception:  # noqa: BLE001 - only for the messages
        return None


def _flat_keys(c, prefix: str = '') -> list[str]:
    out = []
    for k, v in c.items():
        out.append(prefix + k)
        if isinstance(v, ml_collections.ConfigDict):
            out.extend(_flat_keys(v, prefix + k + '.'))
    return out


def _lookup(c, path: str):
    """(True, value) for a dotted key of config ``c``, (False, None) when it has no such key."""
    node = c
    for part in path.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


_KINDS = {bool: 'True or False', int: 'an integer', float: 'a number', str: 'a string', tuple: 'a tuple',
          list: 'a list'}
_OVERRIDE = re.compile(r'^-{1,2}(?:no)?config\.([^=]+)')


def _flag_error(e: BaseException, argv) -> str:
    """The one-line message of a flag parsing error."""
    for x in chain(e):  # get_config refusing its argument
        if isinstance(x, ConfigError) and x.key is not None:
            return _one_line(str(x))
    arg = _config_arg(argv)
    if isinstance(e, flags.UnrecognizedFlagError):
        name = e.flagname
        if name.startswith(('config.', 'noconfig.')) and arg is None:
            return f'--{name}: an override needs a config file; give --config first, e.g. ' \
                   f'--config=configs/cifar10.py:smoke --{name}=...'
        known = [n for n in flags.FLAGS if not n.startswith('config.')]
        close = difflib.get_close_matches(name, known, n=1)
        return f'--{name}: unknown flag; ' + (f'did you mean --{close[0]}?' if close else 'see --helpshort')
    config = _load_config(arg) if arg else None
    if arg is not None and config is None and not os.path.isfile(arg.split(':', 1)[0]):
        return f'{arg.split(":", 1)[0]}: config file not found (relative to {os.getcwd()}); give --config an ' \
               f'existing file, e.g. --config=configs/cifar10.py:smoke'
    if config is not None:
        for a in argv:
            m = _OVERRIDE.match(a)
            if m and not _lookup(config, m[1])[0]:
                close = difflib.get_close_matches(m[1], _flat_keys(config), n=1, cutoff=0.6)
                hint = f'did you mean config.{close[0]}?' if close else \
                    'the keys are those of the config file and colormae_jax/defaults.py'
                return f'config.{m[1]}: no such key; {hint}'
    m = re.match(r'flag --([^=]+)=(.*?): (.*)', str(e), re.S)
    if m:
        name, value, what = m[1], m[2], _one_line(m[3])
        if name in ('config', 'workdir') and value == 'None':
            example = '--config=configs/cifar10.py:smoke' if name == 'config' else '--workdir=/tmp/colormae_run'
            return f'--{name}: missing; give it, e.g. {example}'
        if name.startswith('config.') and config is not None:
            _, current = _lookup(config, name[len('config.'):])
            if isinstance(current, ml_collections.ConfigDict):
                return f'{name}: cannot use {value!r} ({what}); give a dict, or set its keys one by one ' \
                       f'(--{name}.KEY=VALUE)'
            kind = _KINDS.get(type(current), 'another value')
            example = f' like the config\'s {current!r}' if current is not None else ''
            return f'{name}: cannot use {value!r} ({what}); give {kind}{example}'
        return f'--{name}: cannot use {value!r} ({what}); see --helpshort'
    return f'command line: {_one_line(str(e))}; see --helpshort'


def run(main: Callable[[list[str]], int], argv: list[str] | None = None) -> None:
    """``main`` (``colormae_jax.main.main``) under absl, with this module's flag parsing; the
    errors a user can fix printed as one line ``error: ...`` with their exit code
    (:data:`EXIT_USER_ERROR`, :data:`EXIT_NON_FINITE`; ``--verbose`` or COLORMAE_VERBOSE=1: the
    traceback instead). ``main`` returns the exit code of a run that ended (0, or
    :data:`EXIT_PREEMPTED`)."""
    absl_help(argv, modules=[__name__])  # -h, --help, --helpshort: this module's flags, exit 0
    try:
        app.run(main, argv, flags_parser=parse_flags)
    except Exception as e:  # noqa: BLE001 - anything that is not a user error is re-raised
        workdir = _WORKDIR.value if flags.FLAGS.is_parsed() else None
        line = error_line(e, workdir)
        if line is None or _verbose(argv):
            raise
        sys.stderr.write(line + '\n')
        sys.stderr.flush()
        sys.exit(EXIT_NON_FINITE if isinstance(e, NonFiniteMetrics) else EXIT_USER_ERROR)

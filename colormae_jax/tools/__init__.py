"""Command-line tools: ``python -m colormae_jax.tools.<name>``.

:func:`absl_help` gives the absl programs (``tools.noise``, ``main``, the benchmarks) ``-h``:
absl knows ``--help`` and ``--helpshort`` only, and exits 1 after either.
"""
from __future__ import annotations

import sys
from typing import Sequence

from absl import flags

_SHORT = ('-h', '--help', '-help', '--helpshort', '-helpshort', '-?')
_FULL = ('--helpfull', '-helpfull')


def absl_help(argv: Sequence[str] | None = None, modules: Sequence[str] = ()) -> None:
    """When ``argv`` (default ``sys.argv``) asks for help (``-h``, ``--help``, ``--helpshort``;
    ``--helpfull``: every flag, JAX's too), prints the ``__main__`` docstring and its flags (and
    those of ``modules``) to stdout and exits 0; otherwise returns."""
    argv = list(sys.argv if argv is None else argv)
    asked = next((a for a in argv[1:] if a in _SHORT + _FULL or a == '--'), None)
    if asked is None or asked == '--':
        return
    import __main__  # the program's docstring, as absl's usage()
    doc = (getattr(__main__, '__doc__', None) or f'{argv[0]} [flags]').strip()
    if asked in _FULL:
        text = flags.FLAGS.get_help()
    else:
        parts = [flags.FLAGS.main_module_help()] + [flags.FLAGS.module_help(m) for m in modules]
        text = '\n\n'.join(p.strip('\n') for p in parts if p.strip())
        text += '\n\n(--helpfull: every flag, those of absl and JAX too)'
    sys.stdout.write(f'{doc}\n\nflags:\n{text}\n')
    sys.stdout.flush()
    sys.exit(0)

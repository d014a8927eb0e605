"""The errors a user can fix: each names what is wrong and what to do (docs/design.md).

The bottom of the package: every layer may raise them, ``main`` prints them as one line.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value is wrong. The message names the key and what would be valid."""

    def __init__(self, key: str, msg: str | None = None):
        # One-argument form: config_flags re-raises ``type(e)(full_message)``.
        super().__init__(key if msg is None else f'config.{key}: {msg}')
        self.key = None if msg is None else key


class DataError(ValueError):
    """Bad data input; the message says what is wrong and how to fix it."""


class WorkdirError(ConfigError):
    """The ``--workdir`` cannot be used (another run holds its lock); the message names the
    holder and what to do."""

    def __init__(self, workdir: str, msg: str | None = None):
        if msg is None:  # the one-argument form of ConfigError
            super().__init__(workdir)
            return
        ValueError.__init__(self, f'--workdir {workdir}: {msg}')
        self.key = '--workdir'


def chain(e: BaseException | None):
    """``e``, then its causes (``__cause__``, else ``__context__``), each once."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__

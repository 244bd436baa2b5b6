"""The project's expected failures: mistakes and conditions a user can act on.

Every such exception derives from ``SarjepaError``. ``sarjepa`` (``cli.main``) catches them in one
place and prints one ``sarjepa: error: <message>`` block to stderr, without a traceback unless
``-v`` is given, and exits with the error's ``exit_code``:

* 2 (``UsageError``): the command line, a config value or a job spec is wrong (argparse's own
  usage errors exit 2 too);
* 1 (every other ``SarjepaError``): the command was well formed but what it met was not: a
  missing input, dataset or checkpoint, bad data over budget, storage unreachable or refused, a
  job the cluster refused.

The message names the offending file, key or URI. Each class also derives from the builtin its
module raised before (``ValueError``, ``OSError``, ...), so ``except ValueError`` callers keep
working. Exceptions that are not ``SarjepaError`` (nor ``OSError``, see ``cli.main``) are bugs
and keep their traceback.

This module imports nothing: the method layer (config) derives from it without pulling in Ray.
"""

from __future__ import annotations

__all__ = ["SarjepaError", "UsageError", "InputNotFoundError", "JobRefusedError"]


class SarjepaError(Exception):
    """An expected failure; its message alone tells the user what to fix."""

    exit_code = 1


class UsageError(SarjepaError):
    """The command line, a config value or a job spec is wrong."""

    exit_code = 2


class InputNotFoundError(SarjepaError, FileNotFoundError):
    """An input a command needs (folder, file, dataset, checkpoint) is missing or of the wrong kind."""


class JobRefusedError(SarjepaError):
    """A Ray cluster refused a job submission (unreachable, not authorised, rejected)."""

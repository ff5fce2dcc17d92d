"""The line between bad input and a bug: ``UsageError`` and ``usage_errors``.

A ``UsageError`` says that a value given to moekit is not acceptable: a command
flag, a config field, a file or folder to read. The ``moekit`` command prints
its message as one line and exits with status 2. Every other exception is a
bug in moekit (or in torch) and keeps its traceback, so that it can be seen and
reported.

``UsageError`` is a ``ValueError``, so code that catches ``ValueError`` from
moekit catches it too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UsageError(ValueError):
    """A value given to moekit (a flag, a config field, a file or folder) is not acceptable."""


@contextmanager
def usage_errors() -> Iterator[None]:
    """Inside, a ``ValueError``, ``TypeError`` or ``OSError`` is a ``UsageError`` with the
    same message.

    For the one step that validates what a user gave, such as building a config
    from command-line flags: the validators of the configs raise plain
    ``ValueError``/``TypeError`` with a message that names the field and the
    value; reading a file a user named raises ``OSError`` when it is missing. Wrap
    nothing that does real work, or its bugs would look like bad input.
    """
    try:
        yield
    except UsageError:
        raise
    except (ValueError, TypeError, OSError) as error:
        raise UsageError(str(error)) from error

"""The errors a user can act on: one small hierarchy, so a notebook can catch
``MaxJupyterError`` and show its message as one line.

Each class also derives from the built-in error it refines (``ValueError``,
``FileNotFoundError``, ...), so code written against those keeps working.
"""
from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` on one line: its non-blank lines, stripped, joined by " | "."""
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


class MaxJupyterError(Exception):
    """Base of every error this package raises for bad input or an unusable state.

    Its message is one line (a notebook shows it so): each message is written as one line,
    and a line break that slips in (a library's text quoted in it) is shown as " | ".
    Longer detail, such as SQLite's own report, goes in ``detail``, not in the message.
    """

    def __init__(self, *args: object, detail: str | None = None):
        super().__init__(*args)
        self.detail = detail

    def __str__(self) -> str:
        return one_line(str(self.args[0]) if len(self.args) == 1 else super().__str__())


class BadArgumentError(MaxJupyterError, ValueError, TypeError):
    """An argument of the wrong type or out of range; the message names it, its value and the fix."""


class UnknownNameError(MaxJupyterError, KeyError):
    """No vector, mix entry, mix or judge has this name (a ``KeyError`` for mapping use;
    its message is the text, not ``KeyError``'s repr of it)."""

    __str__ = MaxJupyterError.__str__


class ModelMismatchError(MaxJupyterError, ValueError):
    """A vector, mix or judge meets a model it was not made for."""


class ContextOverflowError(MaxJupyterError, ValueError):
    """Feeding these tokens would exceed the engine's context length."""


class CorruptFileError(MaxJupyterError, ValueError):
    """A file that is not what it claims to be, or whose contents were altered."""


class ModelSourceError(MaxJupyterError, FileNotFoundError):
    """A model source that is missing, empty or not a model."""


class BackendUnavailableError(MaxJupyterError, ImportError):
    """A backend whose packages (or device) are not present; the message names the install."""


class BusyError(MaxJupyterError, RuntimeError):
    """The session is generating and the caller asked not to wait (``wait=False``)."""


class SessionClosedError(MaxJupyterError, RuntimeError):
    """The session was closed; load a new one."""


class PoolWorkerError(MaxJupyterError, RuntimeError):
    """A worker of a ``SessionPool`` could not load its models, or its share of a job failed
    on every replacement; the message names the worker and the cause."""


class OldNameWarning(DeprecationWarning):
    """An old name of this package was used; the message names the new one. The tests
    turn it into an error, so no old name hides in the package's own code."""


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """Warn (``OldNameWarning``, a ``DeprecationWarning``) that ``old`` is an old name of
    ``new``; ``stacklevel`` 3 points at the caller of the function that calls this."""
    import warnings

    warnings.warn(f"{old} is deprecated; use {new}.", OldNameWarning, stacklevel=stacklevel)


def did_you_mean(word: str, known) -> str:
    """``" (did you mean X?)"`` for the name in ``known`` closest to a mistyped ``word``
    (difflib), else ``""``: the hint an error message ends a name with."""
    import difflib

    close = difflib.get_close_matches(word, [str(k) for k in known], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""

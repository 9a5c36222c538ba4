"""Exceptions raised by tensormerge.

Every error of the Rust libraries arrives as a :class:`TensormergeError`
whose message is what ``tensormerge`` (the CLI) prints after ``error:``: the
top line, each further cause on a ``Caused by:`` line, and a ``hint:`` line
where one helps. The class follows the CLI's exit code.
"""

from typing import Optional

__all__ = [
    "TensormergeError",
    "InvalidInputError",
    "UnknownTensorError",
    "TensormergeOSError",
]


class TensormergeError(Exception):
    """Base class of every tensormerge error.

    Attributes:
        hint: what to do about it (also the message's ``hint:`` line), or None.
        exit_code: the exit code ``tensormerge`` gives for the same error
            (1 bad input, 2 usage or I/O).
    """

    hint: Optional[str] = None
    exit_code: int = 1


class InvalidInputError(TensormergeError, ValueError):
    """Bad input (CLI exit code 1): an invalid config, an unknown method or
    parameter, models or vectors whose layouts differ (the message names the
    first tensor that differs), a non-finite weight."""


class UnknownTensorError(TensormergeError, KeyError):
    """A tensor name the layout does not have (``vector["no.such.tensor"]``)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class TensormergeOSError(TensormergeError, OSError):
    """A usage or I/O error (CLI exit code 2): the output exists, a file
    cannot be read or written."""

    exit_code = 2

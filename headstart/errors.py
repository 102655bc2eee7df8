"""Exceptions raised by headstart.

Every error a user can cause derives from :class:`HeadstartError` and also from the built-in
type a Python user would expect (``ValueError``, ``FileNotFoundError`` ...), so ``except ValueError``
keeps working. Messages name the file or parameter, what was expected, what was got, and the fix.
"""

from __future__ import annotations

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError


class HeadstartError(Exception):
    """Base class of every error headstart raises on purpose."""


class UsageError(HeadstartError, ValueError):
    """A parameter has a value that cannot work (the CLI exits with code 2)."""


class DataError(HeadstartError, ValueError):
    """The image folder, CSV manifest or labels cannot be used as given."""


class DataNotFoundError(HeadstartError, FileNotFoundError):
    """A path given as data does not exist."""


class UnknownBackboneError(UsageError, KeyError):
    """The backbone name is not a model timm knows (a usage error: the CLI exits with code 2)."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


class WeightsError(HeadstartError, RuntimeError):
    """Pre-trained weights are missing, unreadable or do not match the model."""


class RunError(HeadstartError, ValueError):
    """A saved run folder is missing, incomplete or does not match what it is used with."""


class NotFittedError(HeadstartError, _SklearnNotFittedError):
    """A head was asked to predict before ``fit`` was called.

    Also scikit-learn's ``NotFittedError``, so a ``ValueError`` and an ``AttributeError``.
    """


class DiskFullError(HeadstartError, OSError):
    """A write failed because the file system holding the file is full (nothing half-written is left)."""

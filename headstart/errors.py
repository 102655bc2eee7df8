"""Exceptions raised by headstart.

Every error a user can cause derives from :class:`HeadstartError` and also from the built-in
type a Python user would expect (``ValueError``, ``FileNotFoundError`` ...), so ``except ValueError``
keeps working. Messages name the file or parameter, what was expected, what was got, and the fix.
"""

from __future__ import annotations

from pathlib import Path

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


class HeadFileError(RunError):
    """A saved head (``head.safetensors`` or its ``.json`` settings) is missing, unreadable or inconsistent.

    ``file`` is the file at fault and ``problem`` what is wrong with it (no fix), so a run can say it in
    its own words.
    """

    def __init__(self, file: Path, problem: str, fix: str = "save the head again with head.save(path)") -> None:
        self.file, self.problem = file, problem
        super().__init__(f"head file '{file}' {problem}; {fix}")


class NotFittedError(HeadstartError, _SklearnNotFittedError):
    """A head was asked to predict before ``fit`` was called.

    Also scikit-learn's ``NotFittedError``, so a ``ValueError`` and an ``AttributeError``.
    """


class ExportError(HeadstartError, RuntimeError):
    """A run cannot be exported as asked, or the exported file does not compute what the run computes
    (the file is kept for inspection; ``result`` holds the figures measured, when there are any)."""

    def __init__(self, message: str, result: dict | None = None) -> None:
        super().__init__(message)
        self.result = result


class DiskFullError(HeadstartError, OSError):
    """A write failed because the file system holding the file is full (nothing half-written is left)."""

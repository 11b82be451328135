"""The project's error types: the one contract between the library, its callers and the tools.

- :class:`UserError` (a ``ValueError``): bad input, named in its message: a value, a file, a setting, a folder in
  use. Every refusal is one, so a library caller catches ``UserError`` for all of them. A refusal about a path is
  one of four subclasses that are also the matching ``OSError``, for a caller that catches that:

  - :class:`OutputExists` (a ``FileExistsError``): an output is in the way (pass ``force``, or it holds what
    ``force`` may not replace);
  - :class:`InputMissing` (a ``FileNotFoundError``): an input, dataset or tool that does not exist;
  - :class:`AccessDenied` (a ``PermissionError``): a path this process may not read or write (its mode, a
    read-only file system, a file where a folder should be);
  - :class:`DiskFull` (an ``OSError`` with ``errno`` ENOSPC or EDQUOT and ``filename``): a write ran out of space.

  A message names a setting by its field (``seed``, ``sparse.base_lr``) and lists it in ``fields``; the tools
  print the flag that sets it instead (``--seed``, ``--sparse-base-lr``, see :mod:`dsd_caffe.cli`).
- :class:`Interrupted` (a ``KeyboardInterrupt``): a training run stopped by Ctrl-C or SIGTERM. Its message says at
  which iteration and how to resume. It is a ``KeyboardInterrupt`` so that code catching ``Exception`` never
  swallows it.

The tools' shell (``cli.py``) prints a UserError as one line and exits with status 2, and an Interrupted as one line
with status 130. Anything else that escapes, an ``OSError`` that is no refusal included, is a bug and keeps its
traceback: code that turns an exception into a UserError keeps it as the cause (``from e``) and never wraps an
exception raised by this package's own code (:func:`own_module`).
"""


class UserError(ValueError):
    """Bad input: the message names the bad value, file or setting (one line, no traceback in the tools).
    ``fields`` are the settings it names by their field names (the tools print their flags instead)."""

    fields = ()

    def __init__(self, message, fields=()):
        super().__init__(message)
        self.fields = tuple(fields)


# The OSError comes first in each base list: its constructor and str() are used (``errno``, ``strerror``,
# ``filename`` from ``(errno, strerror, filename)``; the message itself from one argument).
class OutputExists(FileExistsError, UserError):
    """An output in the way: it exists (pass ``force``) or holds what ``force`` may not replace."""


class InputMissing(FileNotFoundError, UserError):
    """An input (a file, folder, dataset or tool) that does not exist."""


class AccessDenied(PermissionError, UserError):
    """A path this process may not read or write: its mode, a read-only file system, a file in the way."""


class DiskFull(OSError, UserError):
    """A write of ``filename`` ran out of space or quota: made as ``DiskFull(errno, strerror, filename)``."""

    def __str__(self):
        return f"{self.strerror}: {self.filename}; free some space and run the same command again"


def own_module(name):
    """True when the module ``name`` is this package's own code: an exception it raises is a bug, never a
    UserError about the input that loaded it."""
    package = __name__.partition(".")[0]
    return name == package or name.startswith(package + ".")


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM; ``iteration`` is the last iteration reached (None before training)."""

    def __init__(self, message, iteration=None):
        super().__init__(message)
        self.iteration = iteration

    def __str__(self):
        return self.args[0] if self.args else "interrupted"

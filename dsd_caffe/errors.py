"""The project's two error types, and what each means to a caller.

- :class:`UserError` (a ``ValueError``): bad input, named in its message: a value, a file, a setting, a folder in
  use. The tools' shell (``cli.py``) prints it as one line and exits with status 2, as it does the OS errors of
  missing, unwritable or full paths. Anything else that escapes is a bug and keeps its traceback.
- :class:`Interrupted` (a ``KeyboardInterrupt``): a training run stopped by Ctrl-C or SIGTERM. Its message says at
  which iteration and how to resume; the shell prints it and exits with status 130, as a shell does for SIGINT.
  It is a ``KeyboardInterrupt`` so that code catching ``Exception`` never swallows it.
"""


class UserError(ValueError):
    """Bad input: the message names the bad value, file or setting (one line, no traceback in the tools)."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by SIGINT/SIGTERM; ``iteration`` is the last iteration reached (None before training)."""

    def __init__(self, message, iteration=None):
        super().__init__(message)
        self.iteration = iteration

    def __str__(self):
        return self.args[0] if self.args else "interrupted"

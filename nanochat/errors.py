"""
Errors the user can fix, told apart from bugs.

The CLI prints a `UserError` as one line (`nanochat <stage>: error: ...`) and exits with
status 2: a wrong flag, a missing or malformed input file, a resume that does not match
its checkpoint. Its message says what is wrong and how to fix it, so a traceback would
only bury it. Every other exception (a ValueError from pyarrow, an unpacking error, a
shape mismatch in our own code) is a bug or an environment problem and keeps its full
traceback.

`UserError` subclasses ValueError and `MissingInputError` also FileNotFoundError, so
code and tests that catch the built-in types keep working.
"""
from __future__ import annotations


class UserError(ValueError):
    """A mistake in the user's flags, environment or files; the message names the fix."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or directory the user must provide (or create with an earlier stage) is absent."""

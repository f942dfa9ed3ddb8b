"""The one error type a user can cause. Its message says what is wrong and what to do."""
from __future__ import annotations


class Med3DError(Exception):
    """A problem with the user's input, files or environment (not a bug).

    The command line prints the message on one line without a traceback and exits with status 2.
    """

"""The one error type adainfer raises for bad input: files, arguments, prompts."""

from __future__ import annotations


class AdainferError(Exception):
    """Bad input, with the file or argument it came from.

    The command-line tools print `str(error)` on one line and exit with status 2, without a traceback.
    """

    def __init__(self, where: object, problem: str):
        self.where = str(where)
        self.problem = problem
        super().__init__(f"{self.where}: {problem}")

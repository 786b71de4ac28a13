"""One error type for every user-facing failure: the CLI prints it as one line, never a traceback."""
from __future__ import annotations


class GemqError(Exception):
    """A problem the user can fix: says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}")

"""The one error type for user mistakes.

A `UserError` is something the user can fix (a missing file, a bad key, a stage run before the one it
needs). The CLI prints its message in one paragraph and exits with code 2; anything else is a bug and
keeps its traceback (exit code 1).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can act on. The message says what, where, and how to fix it."""

    exit_code = 2


def check(problems: list[str], context: str) -> None:
    """Raise one UserError listing every problem found (cross-field checks collect before raising)."""
    if problems:
        if len(problems) == 1:
            raise UserError(f"{context}: {problems[0]}")
        raise UserError(f"{context}:\n" + "\n".join(f"  - {p}" for p in problems))

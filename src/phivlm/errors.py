"""phivlm's own exceptions: errors whose one-line message the CLI prints without a traceback."""
from __future__ import annotations


class PhivlmError(Exception):
    """An error with a one-line, user-facing message (the CLI prints it without a traceback)."""

    exit_code = 2


class Interrupted(PhivlmError):
    """Training stopped by SIGINT after saving a resumable checkpoint."""

    exit_code = 130

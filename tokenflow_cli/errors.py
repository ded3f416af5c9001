"""The one base class for errors a user can fix (a missing or unreadable file, a truncated or
foreign checkpoint, a bad recipe or option value, an empty input, an output that cannot be
written, codes that do not fit the model). The CLI prints such an error as one `error:` line and
exits with `EXIT_USER_ERROR`; anything else is a bug and keeps its traceback.

Library errors subclass `UserError` next to the builtin they always were (`ValueError`,
`OSError`, ...), so callers that catch the builtin keep working.
"""

from __future__ import annotations

EXIT_USER_ERROR = 1  # a user error: the message says what to fix
EXIT_USAGE = 2  # a bad command line or option value (click's usage error)
EXIT_NON_FINITE_LOSS = 3  # training stopped on a non-finite loss; the last good checkpoint is kept
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT); another signal exits 128 + its number (SIGTERM: 143)


def exit_code_for_signal(signum: int) -> int:
    """The shell's convention for a process stopped by a signal."""
    return 128 + int(signum)


class UserError(Exception):
    """An error whose message names the file or value and what to do about it."""

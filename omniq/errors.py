"""The one exception type for problems the user can fix.

The CLI prints its message on one line and exits with its code (2 for bad input, 1 for a failed gate or
check). Anything else that escapes is a bug and keeps its traceback.
"""


class OmniqError(Exception):
    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class GateFailed(OmniqError):
    """A quality gate or a check on the artifact failed (exit 1)."""

    def __init__(self, message: str):
        super().__init__(message, exit_code=1)

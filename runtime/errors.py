"""The one exception type users see: its message is printed as a single line, never a traceback."""


class TandemError(Exception):
    """A user-facing error (bad recipe, bad artifact, missing model, context that does not fit)."""

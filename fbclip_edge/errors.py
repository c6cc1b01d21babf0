"""User-facing errors: one line that names the fix; the CLI prints them without a traceback."""


class FBClipError(Exception):
    """An error caused by the user's input (file, shape, setting), not by a bug."""

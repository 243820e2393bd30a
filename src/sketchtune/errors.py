"""Errors meant for the user: one line, no traceback (the CLI prints them and exits with 2)."""


class SketchtuneError(Exception):
    """A user mistake or bad input, described in one line."""

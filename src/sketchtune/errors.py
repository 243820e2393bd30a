"""Errors meant for the user: one line, no traceback (the CLI prints them and exits with 2)."""


class SketchtuneError(Exception):
    """A user mistake or bad input, described in one line."""


def corrupt_checkpoint(file: object, exc: BaseException) -> SketchtuneError:
    """The error for a safetensors file that cannot be read (safetensors raises its own types)."""
    text = str(exc).strip().splitlines()
    reason = text[0] if text else type(exc).__name__
    return SketchtuneError(f"corrupt or truncated checkpoint {file}: {reason}")

"""Errors meant for the user: one line, no traceback (the CLI prints them and exits with 2)."""


class SketchtuneError(Exception):
    """A user mistake or bad input, described in one line."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """A library's exception as one short line: their messages often run to many lines."""
    lines = str(exc).strip().splitlines()
    line = lines[0].strip() if lines else type(exc).__name__
    if isinstance(exc, KeyError):
        line = f"missing key {line}"  # a KeyError's text is only the key
    return line if len(line) <= limit else line[: limit - 3] + "..."


def corrupt_checkpoint(file: object, exc: BaseException) -> SketchtuneError:
    """The error for a safetensors file that cannot be read (safetensors raises its own types)."""
    return SketchtuneError(f"corrupt or truncated checkpoint {file}: {first_line(exc)}")

"""Config dataclass fields as command-line options: help and default are written once, on the field.

A field made with `option(default, help, ...)` becomes `--field-name` (or `flag`), with its
default, its help and a type read from the annotation: int/float/str, `Literal[...]` (choices),
`list[str]` (comma-separated), `bool` (a switch: `--name` when the default is False, `flag` turns
a True default off) and `bool | None` (`--name/--no-name`, None: decide later). Fields without
help are settings the command line does not offer. Light on purpose: `sketchtune --help` must
not import the model stack.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

_NONE = type(None)
_UNIONS = (typing.Union, types.UnionType)  # Optional[X] and X | None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    return parse


positive_int = at_least(1)


def comma_list(text: str) -> list[str]:
    """argparse type: "a, b" -> ["a", "b"]."""
    return [part.strip() for part in text.split(",")]


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    factory: Callable[[], Any] | Any = dataclasses.MISSING,
    flag: str | None = None,
    positional: bool = False,
    **argparse_kwargs: Any,
) -> Any:
    """A dataclass field offered on the command line (argparse keywords such as `type`,
    `choices` or `metavar` pass through)."""
    metadata = {"help": help, "flag": flag, "positional": positional, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def add_options(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One argparse option (or positional) per `option` field of `config_cls`, dest = its name."""
    hints = typing.get_type_hints(config_cls)
    for f in _option_fields(config_cls):
        meta, default = f.metadata, _default(f)
        kwargs = {"help": _help(meta["help"], default), **_kind(hints[f.name], default)}
        kwargs.update(meta["argparse"])
        if meta["positional"]:
            kwargs.pop("default", None)
            parser.add_argument(f.name, **kwargs)
            continue
        if default is dataclasses.MISSING:
            kwargs.pop("default", None)
            kwargs["required"] = True
        if meta["flag"] and "type" in kwargs and "choices" not in kwargs:
            kwargs.setdefault("metavar", meta["flag"].upper())  # not the dest's name
        flag = "--" + (meta["flag"] or f.name).replace("_", "-")
        parser.add_argument(flag, dest=f.name, **kwargs)


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """`config_cls` from the parsed options of its `option` fields (others keep their default)."""
    return config_cls(**{f.name: getattr(args, f.name) for f in _option_fields(config_cls)})


def _option_fields(config_cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("help")]


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _kind(hint: Any, default: Any) -> dict:
    """argparse keywords for a field's type."""
    if hint is bool:  # a switch away from the default
        return {"action": "store_false" if default else "store_true"}
    if typing.get_origin(hint) in _UNIONS:
        args = [a for a in typing.get_args(hint) if a is not _NONE]
        if args == [bool]:  # on, off, or None: decided later
            return {"action": argparse.BooleanOptionalAction, "default": None}
        (hint,) = args  # `X | None`: an X when given
    if typing.get_origin(hint) is typing.Literal:
        return {"choices": typing.get_args(hint), "default": default}
    if typing.get_origin(hint) is list:
        return {"type": comma_list, "default": default}
    return {"type": hint, "default": default}


def _help(text: str, default: Any) -> str:
    text = text.replace("%", "%%")  # argparse %-formats help
    if default is None or isinstance(default, bool) or default is dataclasses.MISSING:
        return text
    if "default" in text:  # the help says it better
        return text
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    return f"{text} (default: {shown})"

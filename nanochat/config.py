"""
Config dataclasses → command-line flags.

Every stage declares one dataclass. Each field is declared with `option(...)`, whose
`help` is the flag's help text; `None` means "automatic". `add_dataclass_args` turns the
dataclass into argparse flags (`max_chars` → `--max-chars`), and `from_args` builds the
dataclass back from the parsed namespace. Stages call `validate()` which gathers every
problem and raises one `UserError` (a ValueError).
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Literal, get_args, get_origin

from nanochat.errors import UserError


def option(default: Any = MISSING, help: str = "", *, short: str | None = None,
           factory: Any = MISSING, choices: typing.Sequence[Any] | None = None,
           flag: str | None = None, positional: bool = False) -> Any:
    """A config field with CLI metadata. Use `factory=` for mutable defaults.
    `positional=True` makes it an optional positional argument (`nanochat import-hf DIR`)
    instead of a flag; `validate()` says when it is missing."""
    metadata = {"help": help, "short": short, "choices": choices, "flag": flag, "positional": positional}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        names = [_flag_name(f)]
        if f.metadata.get("short"):
            names.insert(0, f.metadata["short"])
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else None)  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        shown = "automatic" if default is None else default
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f"{help_text} (default: {shown})"}
        if f.metadata.get("positional"):
            many = get_origin(tp) in (list, tuple)  # PATH...: any number of values
            inner = (get_args(tp) or (str,))[0] if many else tp
            parser.add_argument(f.name, metavar=f.name.upper().rstrip("S") + ("..." if many else ""),
                                nargs="*" if many else "?", default=default, help=help_text,
                                type=inner if inner in (int, float, str) else str)
            continue
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(tp) is Literal:
            kwargs["choices"] = list(get_args(tp))
            kwargs["type"] = type(get_args(tp)[0])
        elif get_origin(tp) in (list, tuple):
            (inner, *_) = get_args(tp) or (str,)
            kwargs["type"] = inner if inner in (int, float, str) else str
            kwargs["nargs"] = "+"
        else:
            kwargs["type"] = tp if tp in (int, float, str) else str
            if f.metadata.get("choices"):
                kwargs["choices"] = list(f.metadata["choices"])
        parser.add_argument(*names, **kwargs)


def from_args(cls: type, ns: argparse.Namespace) -> Any:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)}
    hints = typing.get_type_hints(cls)
    for name, value in values.items():
        tp, _ = _unwrap_optional(hints[name])
        if get_origin(tp) is tuple and isinstance(value, list):
            values[name] = tuple(value)
    return cls(**values)


def to_dict(config: Any) -> dict:
    """JSON-friendly view of a config (for checkpoints' meta and the report)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else (str(v) if hasattr(v, "__fspath__") else v)
    return out


def check(problems: list[str]) -> None:
    """Raise one ValueError listing every problem (for `validate()` methods)."""
    if problems:
        raise UserError("invalid configuration:\n  - " + "\n  - ".join(problems))

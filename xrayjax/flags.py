"""Dataclass fields that carry their command-line flag, and the flags built from them.

A setting's default and help live once, on its field (:class:`xrayjax.data.DataConfig`'s data
settings, :class:`xrayjax.config.TrainConfig`'s run settings); every command that takes the
setting builds its flag with :func:`add_flags`, on an :class:`ArgumentParser`. Imports nothing
of xrayjax, so any layer may use it.
"""

from __future__ import annotations

import argparse
import dataclasses
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a bad command line is one line on stderr, as every command's errors
    are (exit status 2); ``--help`` shows the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} ({self.prog} --help lists the flags)\n")


def field(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help; ``cli`` may hold flag, choices, metavar, group."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


def same_field(config: type, name: str) -> Any:
    """``config``'s field ``name`` again (its default and help), for a config that holds it too."""
    source = config.__dataclass_fields__[name]
    return dataclasses.field(default=source.default, metadata=source.metadata)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_flags(p: argparse.ArgumentParser, config: type, names: Sequence[str] | None = None,
              notes: Mapping[str, str] | None = None, groups: Mapping[str, Any] | None = None) -> None:
    """Add to ``p`` the flags of the dataclass ``config``'s fields ``names`` (default: all), each
    with its help and default; ``notes`` append a command's own words to a field's help, and
    ``groups`` are the argument groups fields name. A flag left out is absent from the parsed
    namespace, so a command can tell the flags given from the defaults."""
    for f in dataclasses.fields(config):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        help = meta["help"] + (notes or {}).get(f.name, "")
        if isinstance(f.default, bool):
            kwargs["action"] = "store_false" if f.default else "store_true"
        else:
            kwargs["type"] = {"str": str, "int": int, "float": float}[str(f.type).split(" |")[0]]
            kwargs.update({k: meta[k] for k in ("choices", "metavar") if k in meta})
            help += "" if f.default is None or "(default" in meta["help"] else f" (default: {f.default})"
        (groups or {}).get(meta.get("group"), p).add_argument(_flag(f), help=help.replace("%", "%%"), **kwargs)


# Per type of field: the values it takes, their conversion to the field's own type, and its name.
_KINDS = {
    "str": ((str, os.PathLike), os.fspath, "a string or path"),
    "int": (numbers.Integral, int, "an integer"),
    "float": (numbers.Real, float, "a number"),
    "bool": (bool, bool, "True or False"),
}


def coerce_types(config: Any) -> dict[str, Any]:
    """The fields of the dataclass instance ``config`` whose values need converting to their field's
    type (a path to its string, a numpy number to Python's), converted. A value of another type
    (from Python; the command line converts its flags) raises ValueError naming its flag."""
    changes = {}
    for f in dataclasses.fields(config):
        kind, _, optional = str(f.type).partition(" |")
        value, (types, convert, word) = getattr(config, f.name), _KINDS[kind]
        if value is None and optional:
            continue
        if not isinstance(value, types) or (kind != "bool" and isinstance(value, bool)):
            raise ValueError(f"{_flag(f)} must be {word}{' or None' if optional else ''}, got {value!r}")
        if type(value) is not type(convert(value)):
            changes[f.name] = convert(value)
    return changes


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value

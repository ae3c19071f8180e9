"""The control commands' table: each command's handler and its arguments.

A command is a handler (a method of the service that answers it) and the
arguments it takes, each with its JSON type and whether it is required.
Arguments are checked here, before the handler runs, so every mistake in a
request gets one clear line naming the command and the argument, and the
handlers never see a wrong type or an unknown name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ImageError

JSON_TYPES = {str: "a string", int: "an integer", bool: "true or false"}


class CommandError(ImageError):
    """A request the protocol refuses before any handler runs."""

    template = "{reason}"

    def __init__(self, reason: str) -> None:
        super().__init__("", reason)


class CommandNotFound(CommandError):
    pass


@dataclass(frozen=True)
class Arg:
    type: type
    required: bool = False


@dataclass(frozen=True)
class Command:
    handler: Callable[..., dict[str, Any]]
    args: Mapping[str, Arg]


def run(table: Mapping[str, Command], target: Any, command: str,
        arguments: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check the arguments of ``command`` against the table and run its handler."""
    spec = table.get(command)
    if spec is None:
        raise CommandNotFound(f"unknown command {command!r}; known: {', '.join(sorted(table))}")
    args = dict(arguments or {})
    for name, value in args.items():
        arg = spec.args.get(name)
        if arg is None:
            known = ", ".join(sorted(spec.args)) or "none"
            raise CommandError(f"{command}: unknown argument {name!r} (arguments: {known})")
        if not isinstance(value, arg.type) or (arg.type is int and isinstance(value, bool)):
            if value is None and not arg.required:
                continue
            raise CommandError(f"{command}: argument {name!r} must be {JSON_TYPES[arg.type]}, "
                               f"not {type(value).__name__}")
    missing = [n for n, a in spec.args.items() if a.required and n not in args]
    if missing:
        raise CommandError(f"{command}: missing argument {missing[0]!r}")
    return spec.handler(target, **{k: v for k, v in args.items() if v is not None})

"""Backend options from the command line: ``KEY=VALUE`` strings checked against the
backend's config dataclass (``TransferBackend.config_class``).

Values are converted by the declared type of the field they set, never guessed from
their text: ``device_name=0`` stays the string ``"0"``, ``slice_bytes=4194304`` becomes
an int, ``progress_thread=true`` a bool. The whole config is then built once, so the
dataclass's own checks (``protocol`` must be tcp or rdma, ...) run before any endpoint
exists, and a bad option is a clear error at start-up, not a failure on the first
request.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Iterable
from typing import Any

from .base import backend_class

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class TransferOptionError(ValueError):
    """A ``KEY=VALUE`` backend option that is malformed, unknown or invalid."""


def option_fields(backend: str, reserved: Collection[str] = ()) -> dict[str, Any]:
    """Settable option name -> its declared type, for ``backend``'s config."""
    config_class = backend_class(backend).config_class
    hints = typing.get_type_hints(config_class)
    return {f.name: hints[f.name] for f in dataclasses.fields(config_class)
            if f.init and f.name not in reserved}


def parse_transfer_options(backend: str, items: Iterable[str],
                           reserved: Collection[str] = ()) -> dict[str, Any]:
    """``["protocol=rdma", "device_name=mlx5_0"]`` -> ``{"protocol": "rdma", ...}``,
    validated by building ``backend``'s config. ``reserved`` keys are set by the
    caller itself (e.g. the worker's bind host) and refused here."""
    fields = option_fields(backend, reserved)
    options: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise TransferOptionError(f"transfer option {item!r} is not KEY=VALUE")
        if key in reserved:
            raise TransferOptionError(f"transfer option {key!r} is set by the worker itself "
                                      f"({reserved_hint(key)})")
        if key not in fields:
            raise TransferOptionError(f"unknown option {key!r} for transfer backend {backend!r}; "
                                      f"valid keys: {', '.join(sorted(fields)) or '(none)'}")
        if key in options:
            raise TransferOptionError(f"transfer option {key!r} is given twice")
        options[key] = _convert(key, text, fields[key])
    config_class = backend_class(backend).config_class
    try:
        config_class(**options)
    except (ValueError, TypeError) as exc:
        raise TransferOptionError(f"invalid options for transfer backend {backend!r}: {exc}") from None
    return options


def reserved_hint(key: str) -> str:
    return {"host": "use --host", "advertise_host": "use --advertise-host"}.get(key, "not settable")


def _convert(key: str, text: str, declared: Any) -> Any:
    """``text`` as the declared type: int, float, bool or str (optionally ``| None``)."""
    kind = _plain_type(declared)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in _TRUE | _FALSE:
                return lowered in _TRUE
            raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
        if kind is int:
            return int(text.strip(), 10)
        if kind is float:
            value = float(text.strip())
            if not math.isfinite(value):
                raise ValueError("expected a finite number")
            return value
        if kind is str:
            return text
    except ValueError as exc:
        raise TransferOptionError(f"transfer option {key}={text!r}: not a valid "
                                  f"{kind.__name__} ({exc})") from None
    raise TransferOptionError(f"transfer option {key!r} has type {declared!r}, "
                              "which cannot be set from the command line")


def _plain_type(declared: Any) -> Any:
    """``int`` for ``int``, ``str`` for ``str | None``; anything else as is."""
    if isinstance(declared, types.UnionType) or typing.get_origin(declared) is typing.Union:
        args = [a for a in typing.get_args(declared) if a is not type(None)]
        return args[0] if len(args) == 1 else declared
    return declared

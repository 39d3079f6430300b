"""Converters for configuration values: each takes the raw TOML value and returns the typed
value or raises ValueError with a short description of what was expected (the loader adds the
key and the file)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from enum import StrEnum
from typing import Any

Converter = Callable[[Any], Any]


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a string")
    return value


def number(low: float, high: float) -> Converter:
    def convert(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError("expected a number")
        if not low <= value <= high:
            raise ValueError(f"expected a number from {low:g} to {high:g}")
        return float(value)

    return convert


def integer(low: int, high: int) -> Converter:
    def convert(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("expected an integer")
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return convert


MAX_WORKERS = 64


def workers(value: Any) -> int:
    """``[milter] workers``: an integer from 1 to 64, or ``"auto"`` (one per CPU, at most 64)."""
    if value == "auto":
        return max(1, min(os.cpu_count() or 1, MAX_WORKERS))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ValueError(f'expected an integer from 1 to {MAX_WORKERS} or "auto"')
    return value


def enum_of(kind: type[StrEnum]) -> Converter:
    def convert(value: Any) -> StrEnum:
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(f'"{member.value}"' for member in kind)
            raise ValueError(f"expected one of {allowed}") from None

    return convert


def list_of(item: Converter) -> Converter:
    def convert(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        return tuple(item(entry) for entry in value)

    return convert


def checked_by(parse: Callable[[str], object], *, optional: bool = False) -> Converter:
    """A string ``parse`` accepts (or, when ``optional``, the empty string)."""

    def convert(value: Any) -> str:
        text = string(value)
        if text or not optional:
            parse(text)
        return text

    return convert


def octal_mode(value: Any) -> str:
    text = string(value)
    if not (3 <= len(text) <= 4 and all(c in "01234567" for c in text)):
        raise ValueError('expected an octal mode like "0660"')
    return text


def network(value: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(string(value), strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a network (like 192.0.2.0/24)") from None


def map_name(value: Any) -> str:
    text = string(value)
    if not text or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in text):
        raise ValueError("expected a non-empty name of letters, digits, '-', '_' or '.'")
    return text


def one_of(allowed: tuple[str, ...]) -> Converter:
    def convert(value: Any) -> str:
        if string(value) not in allowed:
            raise ValueError("expected one of " + ", ".join(f'"{a}"' for a in allowed))
        return str(value)

    return convert


def authserv_id(text: str) -> None:
    if not text or any(ch.isspace() or ch in ';()"' for ch in text):
        raise ValueError("expected an authserv-id (a host name, no blanks or ;)")


def trust_source(value: Any) -> str:
    text = string(value)
    if not text:
        raise ValueError('expected "system" or a PEM file path')
    return text

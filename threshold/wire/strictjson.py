"""Strict JSON decoding, shared by every parser of outside input.

Stricter than :func:`json.loads` in the ways that matter for input from
the network and from operators: a key given twice in one object is refused
(parsers disagree on which one wins, so guessing is wrong), and so are the
non-standard ``NaN``/``Infinity`` literals, numbers too large for a float
(``1e400`` would become infinity), integers too long to convert (Python
refuses more than ``sys.get_int_max_str_digits()`` digits) and nesting
deeper than the interpreter's recursion limit. Every refusal is a
:class:`JsonError`, never another exception, with one line that each
caller can put in its own words.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any


class JsonError(ValueError):
    """Not strict JSON; ``str()`` says what and where, without a prefix."""


class NotUtf8(JsonError):
    """The bytes are not text in the expected encoding."""

    def __init__(self, reason: str, start: int) -> None:
        super().__init__(f"{reason} at byte {start}")
        self.reason = reason
        self.start = start


class DuplicateKey(JsonError):
    """An object names the same key twice."""

    def __init__(self, key: str) -> None:
        super().__init__(f"the key {key!r} is given twice in an object")
        self.key = key


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKey(key)
        result[key] = value
    return result


def _no_constant(name: str) -> None:
    raise JsonError(f"{name} is not a JSON number")


def _integer(text: str) -> int:
    # int() would raise a plain ValueError (with advice about sys) past the
    # interpreter's limit; 0 means no limit.
    limit = sys.get_int_max_str_digits() or len(text)
    digits = len(text) - text.startswith("-")
    if digits > limit:
        raise JsonError(f"an integer of {digits} digits is too long (at most {limit})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        shown = text if len(text) <= 20 else text[:17] + "..."
        raise JsonError(f"the number {shown} is too large")
    return value


def loads(data: bytes, encoding: str = "utf-8") -> object:
    """Decode ``data`` as strict JSON, or raise a :class:`JsonError`."""
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        raise NotUtf8(e.reason, e.start) from None
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique,
            parse_constant=_no_constant,
            parse_int=_integer,
            parse_float=_float,
        )
    except json.JSONDecodeError as e:
        raise JsonError(f"{e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise JsonError("nested too deeply") from None

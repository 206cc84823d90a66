"""The control channel: JSON lines on stream 1 after the hello is accepted.

Stream 1 stays open in both directions once the hello is accepted; each side
may send further lines on it, each one compact JSON object and ``\\n``, at
most :data:`~threshold.wire.handshake.MAX_LINE` bytes. Unknown keys and
unknown kinds of message are ignored, so old and new peers interoperate.

The one message defined so far goes from the client to the gateway::

    {"health": {"web": true, "db": false},
     "detail": {"db": "connection refused at 127.0.0.1:5432"}}

It carries the full current state of every service the client checks (so
a duplicate or a lost earlier message cannot desync the two sides); a
service not listed is not checked by this client. ``detail`` is optional:
one short printable text per unhealthy service. Pure code, no reactor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from threshold.schema import SERVICE_NAME, SchemaError, show
from threshold.wire.handshake import MAX_LINE, decode_line, encode_line

__all__ = [
    "MAX_DETAIL",
    "ControlError",
    "ControlMessage",
    "Health",
    "Unknown",
    "clean_detail",
    "encode_health",
    "health_line_fits",
    "parse_control_line",
]

#: Longest detail text per service, in characters (longer ones are cut and
#: end in "..."), so a message with a few unhealthy services stays far
#: below MAX_LINE.
MAX_DETAIL = 200

# When the details do not fit in one line they are cut to this many
# characters, then left out; the states always go (see encode_health).
_SHORT_DETAIL = 40


class ControlError(ValueError):
    """A control line is malformed; the message says why."""


@dataclass(frozen=True)
class Health:
    """Health of every service the client checks; ``detail`` for unhealthy ones.

    ``states`` maps a service name to True (healthy) or False. ``detail``
    holds only services that are in ``states`` and unhealthy.
    """

    states: Mapping[str, bool]
    detail: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Unknown:
    """A well-formed message of a kind this side does not know (ignored)."""

    keys: tuple[str, ...]


ControlMessage = Health | Unknown


def clean_detail(text: str) -> str:
    """Make a detail text safe to send and to show: printable, at most MAX_DETAIL.

    Every character that is not printable (line breaks, control and format
    characters, lone surrogates) becomes "?".
    """
    text = "".join(c if c.isprintable() else "?" for c in text)
    if len(text) > MAX_DETAIL:
        text = text[: MAX_DETAIL - 3] + "..."
    return text


def _cut(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 3] + "..."


def _checked_states(states: Mapping[str, bool]) -> dict[str, bool]:
    if not isinstance(states, Mapping):
        raise ControlError(f"health must be a mapping, got {show(states)}")
    checked: dict[str, bool] = {}
    for name, state in states.items():
        try:
            SERVICE_NAME.check_key(name)
        except SchemaError as e:
            raise ControlError(f"health: {e}") from None
        if not isinstance(state, bool):
            raise ControlError(
                f"health.{name}: expected true or false, got {show(state)}"
            )
        checked[name] = state
    return checked


def encode_health(
    states: Mapping[str, bool], detail: Mapping[str, str] | None = None
) -> bytes:
    """Encode one health message (the line, ``\\n`` included).

    ``detail`` entries for services that are not listed or are healthy are
    left out; the others are cleaned (:func:`clean_detail`). When the line
    would exceed MAX_LINE the details are shortened, then left out; if the
    states alone do not fit, ControlError (the client config refuses a set
    of checks that could not be reported, see
    :func:`health_line_fits`).
    """
    checked = _checked_states(states)
    texts: dict[str, str] = {}
    for name, text in (detail or {}).items():
        if not isinstance(text, str):
            raise ControlError(
                f"detail: the text for {show(name)} must be a string, got {show(text)}"
            )
        if checked.get(name) is False:
            texts[name] = clean_detail(text)
    candidates: list[dict[str, str]] = [texts]
    if texts:
        candidates.append({k: _cut(v, _SHORT_DETAIL) for k, v in texts.items()})
        candidates.append({})
    for details in candidates:
        obj: dict[str, Any] = {"health": checked}
        if details:
            obj["detail"] = details
        line = encode_line(obj)
        if len(line) - 1 <= MAX_LINE:
            return line
    raise ControlError(
        f"a health message for {len(checked)} services is {len(line) - 1} bytes,"
        f" longer than {MAX_LINE}"
    )


def health_line_fits(services: list[str]) -> bool:
    """Tell whether the health of all ``services`` fits in one control line."""
    try:
        encode_health(dict.fromkeys(services, False))
    except ControlError:
        return False
    return True


def _parse_health(obj: dict[str, Any]) -> Health:
    raw_states = obj["health"]
    if not isinstance(raw_states, dict):
        raise ControlError(f"health: expected an object, got {show(raw_states)}")
    states = _checked_states(raw_states)
    raw_detail = obj.get("detail")
    if raw_detail is None:
        raw_detail = {}
    if not isinstance(raw_detail, dict):
        raise ControlError(f"detail: expected an object, got {show(raw_detail)}")
    detail: dict[str, str] = {}
    for name, text in raw_detail.items():
        if not isinstance(text, str):
            raise ControlError(
                f"detail: the text for {show(name)} must be a string, got {show(text)}"
            )
        # Details of services not listed or healthy say nothing: dropped.
        if states.get(name) is False:
            detail[name] = clean_detail(text)
    return Health(MappingProxyType(states), MappingProxyType(detail))


def parse_control_line(line: bytes) -> ControlMessage:
    """Parse one control line (with or without its ``\\n``).

    A line with a ``health`` key is a :class:`Health`; any other object is
    :class:`Unknown` (to be ignored). Raise ControlError for a line that is
    not one JSON object within MAX_LINE or a ``health`` message of the
    wrong shape.
    """
    obj = decode_line(line, "control line", ControlError)
    if "health" in obj:
        return _parse_health(obj)
    return Unknown(tuple(sorted(obj)))

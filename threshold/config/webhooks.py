"""``Webhooks`` of the server config: where the event feed is posted.

One :class:`WebhookSettings` per entry of ``"Webhooks": [{"Url": ...,
"Events": [...]}]`` (docs/events.md): the URL, the event types it wants
(wildcards, ``client.*``), the file holding the HMAC secret, and the
bounds of its delivery (timeout, retries, queue).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from threshold.schema import (
    FilePath,
    Integer,
    Kind,
    Schema,
    SchemaError,
    Seconds,
    Text,
    UnknownField,
    field,
)
from threshold.schema.core import show

__all__ = [
    "EVENT_PATTERNS",
    "MAX_WEBHOOKS",
    "WEBHOOK",
    "WEBHOOKS",
    "WebhookSettings",
    "type_matches",
]

#: Most webhooks one gateway posts to.
MAX_WEBHOOKS = 32

#: An event type pattern: dotted names, ``*`` for any run of characters.
_PATTERN = re.compile(r"[a-z*][a-z0-9_.*]{0,63}")


def type_matches(patterns: Sequence[str], event_type: str) -> bool:
    """Whether ``event_type`` matches one of ``patterns`` (``client.*``, ``*``)."""
    return any(fnmatch.fnmatchcase(event_type, p) for p in patterns)


class _Url(Kind):
    expected = "an http:// or https:// URL"
    doc = "URL"

    def check(self, value: object, base_dir: str | None = None) -> str:
        if not isinstance(value, str) or len(value) > 2048:
            raise self.wrong(value)
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 (raises on a bad port)
        except ValueError:
            raise self.wrong(value) from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise self.wrong(value)
        if not value.isprintable() or " " in value:
            raise self.wrong(value)
        return value


class _Patterns(Kind):
    expected = 'a list of event types ("client.*", "tunnel.failover")'
    doc = "list of strings"

    def check(self, value: object, base_dir: str | None = None) -> tuple[str, ...]:
        if not isinstance(value, list | tuple) or not value:
            raise self.wrong(value)
        for i, item in enumerate(value):
            if not isinstance(item, str) or not _PATTERN.fullmatch(item):
                raise SchemaError(
                    f"expected an event type or pattern (a-z 0-9 _ . *),"
                    f" got {show(item)}",
                    f"[{i}]",
                )
        return tuple(value)

    def to_json(self, value: Any) -> object:
        return list(value)


#: The ``Events`` kind (also the ``type`` filter of ``GET /events``).
EVENT_PATTERNS = _Patterns()


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """One webhook: where the events go and how hard to try."""

    url: str = field(
        "Url", _Url(), doc="Where each event is POSTed as JSON (http or https)."
    )
    events: tuple[str, ...] = field(
        "Events",
        EVENT_PATTERNS,
        ("*",),
        doc='Event types posted; `*` matches any characters: `["client.*",'
        ' "tunnel.failover"]`.',
    )
    secret_file: str | None = field(
        "SecretFile",
        FilePath(),
        None,
        nullable=True,
        doc="File holding the HMAC-SHA256 key (its text, surrounding whitespace"
        " removed); each POST carries `X-Threshold-Signature`. Without it the"
        " posts are unsigned.",
    )
    timeout_seconds: float = field(
        "TimeoutSeconds",
        Seconds(),
        10.0,
        doc="Time one POST may take (connect, send, answer) before it counts as"
        " failed and is retried.",
    )
    max_attempts: int = field(
        "MaxAttempts",
        Integer(1, 100),
        8,
        doc="Tries per event (the first included); a connection failure, a"
        " timeout, a 5xx, a 408 or a 429 is retried.",
    )
    retry_initial_seconds: float = field(
        "RetryInitialSeconds",
        Seconds(),
        1.0,
        doc="Wait before the first retry; doubled at each further one.",
    )
    retry_max_seconds: float = field(
        "RetryMaxSeconds",
        Seconds(),
        300.0,
        doc="Longest wait between two tries.",
    )
    max_queue: int = field(
        "MaxQueue",
        Integer(1, 1_000_000),
        1000,
        doc="Events waiting for this webhook; past it the oldest is dropped"
        " (counted, and reported as a `webhook.dropped` event).",
    )
    name: str | None = field(
        "Name",
        Text(),
        None,
        nullable=True,
        doc="The webhook's name in metrics and logs; default: its URL without"
        " user info and query.",
    )

    @property
    def label(self) -> str:
        """The name in metrics and logs (never the query, which may hold a token)."""
        if self.name is not None:
            return self.name
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port is not None else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"


#: The table of one webhook.
WEBHOOK = Schema(WebhookSettings)


class _WebhooksKind(Kind):
    expected = 'a list of webhooks ({"Url": ..., "Events": [...]})'
    doc = "list of objects (docs/events.md)"

    def check(
        self, value: object, base_dir: str | None = None
    ) -> tuple[WebhookSettings, ...]:
        if not isinstance(value, list | tuple):
            raise self.wrong(value)
        if len(value) > MAX_WEBHOOKS:
            raise SchemaError(f"more than {MAX_WEBHOOKS} webhooks")
        hooks = []
        for i, entry in enumerate(value):
            if isinstance(entry, WebhookSettings):
                hooks.append(entry)
                continue
            if not isinstance(entry, dict):
                raise SchemaError(f"expected an object, got {show(entry)}", f"[{i}]")
            try:
                hooks.append(WEBHOOK.parse(entry, base_dir))
            except UnknownField as e:
                raise SchemaError(e.message, f"[{i}]") from None
            except SchemaError as e:
                raise e.within(f"[{i}].") from None
        return tuple(hooks)

    def to_json(self, value: Any) -> object:
        return [WEBHOOK.to_json(hook) for hook in value]


#: The ``Webhooks`` kind.
WEBHOOKS = _WebhooksKind()

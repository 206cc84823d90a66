"""Prometheus metrics of the event feed: events, streams, webhook deliveries."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from threshold.server.events import EventType
from threshold.server.families import single

if TYPE_CHECKING:
    from threshold.server.events_service import EventService

__all__ = ["EventCollector"]


class EventCollector(Collector):
    """Reads the event service's counters at scrape time."""

    def __init__(self, service: EventService) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        feed = self.service.feed
        emitted = CounterMetricFamily(
            "threshold_events_emitted",
            "Events emitted by the gateway's event feed, by type.",
            labels=["type"],
        )
        for event_type in EventType:
            emitted.add_metric([event_type.value], feed.emitted[event_type.value])
        yield emitted
        streams = self.service.streams
        yield single(
            GaugeMetricFamily,
            "threshold_event_subscribers",
            "GET /events streams open now.",
            len(streams.subscribers),
        )
        yield single(
            CounterMetricFamily,
            "threshold_event_streams_cut",
            "GET /events streams ended because their reader fell behind"
            " (MaxEventBacklog).",
            streams.cuts,
        )
        labels = ["webhook"]
        families = {
            "delivered": CounterMetricFamily(
                "threshold_webhook_deliveries",
                "Events a webhook's receiver accepted (2xx).",
                labels=labels,
            ),
            "failed": CounterMetricFamily(
                "threshold_webhook_failures",
                "Events given up: refused (4xx) or out of tries.",
                labels=labels,
            ),
            "retries": CounterMetricFamily(
                "threshold_webhook_retries",
                "Failed tries that were retried (error, timeout, 5xx, 408, 429).",
                labels=labels,
            ),
            "dropped": CounterMetricFamily(
                "threshold_webhook_dropped",
                "Events dropped from a full webhook queue (MaxQueue).",
                labels=labels,
            ),
        }
        queued = GaugeMetricFamily(
            "threshold_webhook_queue", "Events waiting for a webhook.", labels=labels
        )
        for hook in self.service.webhooks:
            families["delivered"].add_metric([hook.label], hook.delivered)
            families["failed"].add_metric([hook.label], hook.failed)
            families["retries"].add_metric([hook.label], hook.retries)
            families["dropped"].add_metric([hook.label], hook.dropped)
            queued.add_metric([hook.label], len(hook.queue))
        yield from families.values()
        yield queued

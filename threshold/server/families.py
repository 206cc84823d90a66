"""Small builders of Prometheus metric families, shared by the collectors."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

__all__ = ["single"]


def single(
    family: type[GaugeMetricFamily] | type[CounterMetricFamily],
    name: str,
    documentation: str,
    value: float,
) -> GaugeMetricFamily | CounterMetricFamily:
    """A metric with a single, unlabelled sample."""
    metric = family(name, documentation)
    metric.add_metric([], value)
    return metric

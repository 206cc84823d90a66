"""The fleet's metrics (``threshold_cluster_*``), beside the gateway's."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import GaugeMetricFamily

__all__ = ["FleetCollector", "FleetState"]


class FleetState(Protocol):
    """What the metrics read of threshold.server.fleet.Fleet."""

    applied_revision: int
    latest_revision: int
    errors: list[Any]
    apply_failures: int

    @property
    def etcd_up(self) -> bool: ...


class FleetCollector:
    """The fleet's metrics (registered beside the gateway's collector)."""

    def __init__(self, fleet: FleetState) -> None:
        self.fleet = fleet

    def collect(self) -> Iterator[GaugeMetricFamily]:
        fleet = self.fleet
        yield GaugeMetricFamily(
            "threshold_cluster_applied_revision",
            "Revision of the tunnel set in force on this gateway.",
            value=fleet.applied_revision,
        )
        yield GaugeMetricFamily(
            "threshold_cluster_latest_revision",
            "Newest tunnel set revision this gateway's watch has seen.",
            value=fleet.latest_revision,
        )
        yield GaugeMetricFamily(
            "threshold_cluster_apply_errors",
            "Errors of the newest set not applied here (0: it is in force).",
            value=len(fleet.errors),
        )
        yield GaugeMetricFamily(
            "threshold_cluster_apply_failures",
            "Tunnel sets from etcd this gateway could not apply, since start.",
            value=fleet.apply_failures,
        )
        yield GaugeMetricFamily(
            "threshold_cluster_etcd_up",
            "1 while this gateway's watch of the tunnel set is connected to etcd.",
            value=1 if fleet.etcd_up else 0,
        )

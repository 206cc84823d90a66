"""A gateway's fleet settings (``Cluster`` in ``server.json``): etcd and its lease.

Declared once like every other config object; docs/cluster.md explains
them and docs/configuration.md's table is generated from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from threshold.schema import (
    CLIENT_ID,
    STRING_LIST,
    FilePath,
    Integer,
    Kind,
    Schema,
    SchemaError,
    Text,
    UnknownField,
    field,
)

__all__ = ["CLUSTER", "CLUSTER_KIND", "ClusterSettings"]


@dataclass(frozen=True, kw_only=True)
class ClusterSettings:
    """``Cluster``: the fleet this gateway belongs to (docs/cluster.md)."""

    etcd_endpoints: tuple[str, ...] = field(
        "EtcdEndpoints",
        STRING_LIST,
        doc='URLs of the etcd members, `"https://10.0.0.5:2379"` (etcd v3,'
        " reached through its JSON gateway under `/v3`).",
    )
    key_prefix: str = field(
        "KeyPrefix",
        Text(),
        "/threshold/",
        doc="Where the fleet's keys live in etcd; must end with `/`. Gateways"
        " of one fleet share it.",
    )
    gateway_id: str = field(
        "GatewayId",
        CLIENT_ID,
        doc="This gateway's name in the fleet (1-128 of `A-Z a-z 0-9 . _ -`),"
        " unique among the gateways.",
    )
    etcd_ca_certificate_file: str | None = field(
        "EtcdCaCertificateFile",
        FilePath(),
        None,
        nullable=True,
        doc="CA that etcd's certificate must chain to (https endpoints).",
    )
    etcd_client_certificate_file: str | None = field(
        "EtcdClientCertificateFile",
        FilePath(),
        None,
        nullable=True,
        doc="Certificate shown to etcd (`--client-cert-auth`).",
    )
    etcd_client_key_file: str | None = field(
        "EtcdClientKeyFile",
        FilePath(),
        None,
        nullable=True,
        doc="Its private key.",
    )
    lease_ttl_seconds: int = field(
        "LeaseTtlSeconds",
        Integer(2, 3600),
        10,
        doc="The lease of this gateway's presence and status keys: a gateway"
        " that dies drops out of the fleet's view within this time.",
    )

    @property
    def tls(self) -> tuple[str, str, str] | None:
        """``(ca, cert, key)`` for the etcd client, None without a CA."""
        files = (
            self.etcd_ca_certificate_file,
            self.etcd_client_certificate_file,
            self.etcd_client_key_file,
        )
        if any(f is None for f in files):
            return None
        return files  # type: ignore[return-value]


#: The table of a ``Cluster`` object.
CLUSTER = Schema(ClusterSettings)


class _ClusterKind(Kind):
    expected = "an object of cluster fields"
    doc = "object (docs/cluster.md)"

    def check(self, value: object, base_dir: str | None = None) -> ClusterSettings:
        if isinstance(value, ClusterSettings):
            return value
        if not isinstance(value, Mapping):
            raise self.wrong(value)
        try:
            settings: ClusterSettings = CLUSTER.parse(value, base_dir)
        except UnknownField as e:
            raise SchemaError(e.message, "") from None
        except SchemaError as e:
            raise e.within(".") from None
        if not settings.key_prefix.endswith("/"):
            raise SchemaError("must end with /", ".KeyPrefix")
        if not settings.etcd_endpoints:
            raise SchemaError("give at least one endpoint", ".EtcdEndpoints")
        given = [
            f is not None
            for f in (
                settings.etcd_ca_certificate_file,
                settings.etcd_client_certificate_file,
                settings.etcd_client_key_file,
            )
        ]
        if any(given) and not all(given):
            raise SchemaError(
                "give EtcdCaCertificateFile, EtcdClientCertificateFile and"
                " EtcdClientKeyFile together",
                ".EtcdCaCertificateFile",
            )
        return settings

    def to_json(self, value: Any) -> object:
        return None if value is None else CLUSTER.to_json(value)


#: The ``Cluster`` field's kind (null: no fleet).
CLUSTER_KIND = _ClusterKind()

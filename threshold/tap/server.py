"""``twistd -n threshold-server -c server.json``: the gateway's service tree."""

from __future__ import annotations

import os
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import (
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from threshold import logs
from threshold.config import ConfigError, ServerConfig, load_server_config
from threshold.logs import observer as log_observer
from threshold.server import metrics
from threshold.server.certinfo import read_file as read_certificate
from threshold.server.control import ControlSettings
from threshold.server.egress_gate import EgressSettings
from threshold.server.events_metrics import EventCollector
from threshold.server.events_service import build_events
from threshold.server.frontend import FrontendLimits
from threshold.server.history import HistorySettings
from threshold.server.policy import PolicySettings
from threshold.server.reuseport import reuseport_listen
from threshold.server.serverinfo import ServerFacts
from threshold.server.service import TunnelServer
from threshold.server.statefile import StateFileError, read_state
from threshold.server.udp import UdpLimits
from threshold.tap.common import (
    LazyFactory,
    fail,
    listener,
    server_endpoint,
    session_config,
)
from threshold.tls import CONTROL_MINIMUM_TLS, server_options

if TYPE_CHECKING:
    # Imported where a Cluster is configured: etcd, treq, the fleet code.
    from threshold.server.fleet import Fleet

log = Logger(observer=log_observer)


class Options(usage.Options):
    """Command line of ``twistd threshold-server``."""

    optParameters = [
        ["config", "c", "config.json", "The server's JSON configuration file."],
    ]


def makeService(options: Options, reactor: Any = None) -> MultiService:  # noqa: N802
    """Build the server: control listener, management API, tunnels."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_server_config(options["config"])
        return build_server(config, reactor)
    except (ConfigError, StateFileError) as e:
        raise fail(str(e)) from None


def build_server(config: ServerConfig, reactor: Any) -> MultiService:
    """The server's service tree for a loaded configuration."""
    logs.set_debug(config.debug_log)
    tls = management_tls = None
    if config.use_tls:
        assert config.ca_certificate_file is not None
        assert config.server_tls_key_file is not None
        assert config.server_tls_certificate_file is not None
        files = (
            config.ca_certificate_file,
            config.server_tls_key_file,
            config.server_tls_certificate_file,
        )
        # Both ends of the control connection are threshold: TLS 1.3 only.
        tls = server_options(*files, config.source, minimum=CONTROL_MINIMUM_TLS)
        management_tls = server_options(*files, config.source)
    restore = []
    if config.state_file is not None:
        if os.path.exists(config.state_file):
            restore = read_state(config.state_file)

    def listen(host: str, port: int, factory: Any) -> Any:
        endpoint = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        return endpoint(reactor, port, interface=host).listen(factory)

    if config.reuses_port:
        listen = reuseport_listen(reactor)  # noqa: F811

    settings = ControlSettings(
        use_tls=config.use_tls,
        domain=config.domain,
        handshake_timeout=config.handshake_timeout_seconds,
        max_clients=config.max_clients,
        max_pending_handshakes=config.max_pending_handshakes,
        max_pending_per_source=config.max_pending_handshakes_per_source_ip,
        ipv6_prefix=config.source_ipv6_prefix_length,
        session=session_config(config),
        # In a fleet the hello reply names the gateway, so a client of
        # several gateways can tell its sessions apart.
        gateway_id=config.cluster.gateway_id if config.cluster else None,
    )
    server = TunnelServer(
        listen,
        reactor,
        settings,
        state_file=config.state_file,
        restore=restore,
        limits=FrontendLimits(
            sni_timeout=config.sni_read_timeout_seconds,
            max_hello=config.max_client_hello_bytes,
            max_per_tunnel=config.max_connections_per_tunnel,
            max_per_ip=config.max_connections_per_source_ip,
            idle_timeout=config.public_idle_timeout_seconds,
            first_byte_timeout=config.public_first_byte_timeout_seconds,
            ipv6_prefix=config.source_ipv6_prefix_length,
            log_connections=config.log_connections,
        ),
        shutdown_grace=config.shutdown_grace_seconds,
        policy=PolicySettings.from_config(config),
        udp_reactor=reactor,
        udp_limits=UdpLimits.from_config(config),
        egress=EgressSettings.from_config(config),
        history=HistorySettings(interval=config.status_sample_interval_seconds),
    )
    top = MultiService()
    server.setServiceParent(top)
    fleet = None
    if config.cluster is not None:
        # Started after the server: the watch applies after the restore.
        fleet = build_fleet(config, server, reactor)
        fleet.setServiceParent(top)
    # The event feed (docs/events.md); stopped before the gateway, so its
    # streams end with stream.closed.
    certificate = (
        read_certificate(config.server_tls_certificate_file)
        if config.use_tls and config.server_tls_certificate_file is not None
        else None
    )
    events = build_events(config, server, reactor, certificate)
    events.setServiceParent(top)
    facts = ServerFacts(
        server,
        gateway_id=config.cluster.gateway_id if config.cluster else None,
        use_tls=config.use_tls,
        listen_address=config.listen_address,
        tunnel_control_port=config.tunnel_control_port,
        management_port=None
        if config.management_socket is not None
        else config.management_port,
        certificate=certificate,
        feed=events.feed,
    )
    metrics_registry = metrics.server_registry(server)
    metrics_registry.register(EventCollector(events))
    if fleet is not None:
        from threshold.server.fleet_metrics import FleetCollector

        metrics_registry.register(FleetCollector(fleet))
    listener(
        server_endpoint(
            reactor, config.listen_address, config.tunnel_control_port, tls
        ),
        server.control_factory(),
    ).setServiceParent(top)
    api_options: dict[str, Any] = dict(
        max_body_bytes=config.max_management_body_bytes,
        apply=server.apply,
        metrics=partial(metrics.render, metrics_registry),
        limit_hit=server.stats.limit_hit,
        policy=server.policy,
        serving=server.serving,
        fleet=fleet,
        history=server.history,
        events=events.streams,
        server_info=facts.to_json,
    )
    if config.management_socket is not None:
        # The socket file's permissions (0600) are the access control.
        endpoint: IStreamServerEndpoint = UNIXServerEndpoint(
            reactor, config.management_socket, mode=0o600, wantPID=True
        )
    else:
        endpoint = server_endpoint(
            reactor,
            config.management_listen_address,
            config.management_port,
            management_tls,
        )

    def management() -> Any:
        # Imported here: klein and twisted.web, made once the reactor runs
        # (LazyFactory), so the control port listens 0.15 s sooner.
        from threshold.server.api import ManagementAPI
        from threshold.server.site import ManagementLimits, management_site

        if config.management_socket is not None:
            api = ManagementAPI(server.routes, server.registry, **api_options)
        else:
            api = ManagementAPI(
                server.routes,
                server.registry,
                allowed_common_names=config.management_allowed_common_names,
                require_tls_identity=config.use_tls,
                **api_options,
            )
        limits = ManagementLimits(
            max_pending=config.max_pending_management_connections,
            # On the Unix socket every peer is the same "source".
            max_pending_per_source=0
            if config.management_socket is not None
            else config.max_pending_management_connections_per_source_ip,
            request_timeout=config.management_request_timeout_seconds,
            ipv6_prefix=config.source_ipv6_prefix_length,
        )
        return management_site(api, limits, reactor)

    listener(endpoint, LazyFactory(management, reactor)).setServiceParent(top)
    if not config.use_tls:
        log.warn(
            "UseTls is false: anyone who can reach port {port} can connect as "
            "any client; use TLS on any network you do not fully control",
            port=config.tunnel_control_port,
        )
    elif (
        config.management_allowed_common_names is None
        and config.management_socket is None
    ):
        log.warn(
            "ManagementAllowedCommonNames is not set: any certificate from the "
            "CA, tunnel clients' included, may use the management API; set it "
            "to the operator certificates' names to close that door"
        )
    return top


def build_fleet(config: ServerConfig, server: TunnelServer, reactor: Any) -> Fleet:
    """The gateway's part of its fleet (``Cluster``): etcd client, store, watch."""
    from threshold.cluster.etcd import EtcdClient
    from threshold.cluster.store import ClusterStore
    from threshold.server.fleet import Fleet, read_revision

    cluster = config.cluster
    assert cluster is not None
    client = EtcdClient(
        cluster.etcd_endpoints, reactor, cluster.tls, source=config.source
    )
    store = ClusterStore(client, reactor, cluster.key_prefix)
    applied = read_revision(config.state_file)
    if config.state_file is None:
        log.warn(
            "Cluster without StateFile: a restart while etcd is down comes up"
            " with no tunnels; set StateFile to keep a local copy"
        )
    return Fleet(
        server,
        store,
        cluster.gateway_id,
        reactor,
        ttl=cluster.lease_ttl_seconds,
        applied_revision=applied,
    )

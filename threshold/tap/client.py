"""``twistd -n threshold-client -c client.json``: the tunnel client's service tree."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
    UNIXServerEndpoint,
    wrapClientTLS,
)
from twisted.logger import Logger

from threshold import logs
from threshold.client.endpoints import local_tcp_endpoint
from threshold.client.gateway import GatewayLink
from threshold.client.health import HealthMonitor, tcp_probe
from threshold.client.service import reconnecting_service
from threshold.client.settings import ClientSettings
from threshold.client.socks import SocksFactory
from threshold.config import ClientConfig, load_client_config
from threshold.config.client import ServerEntry
from threshold.logs import observer as log_observer
from threshold.schema import format_address
from threshold.tap.common import (
    ConfigFileOptions,
    listener,
    service_from_file,
    session_config,
)
from threshold.tls import client_creator

log = Logger(observer=log_observer)


class Options(ConfigFileOptions):
    """Command line of ``twistd threshold-client``: ``-c client.json``."""


def makeService(options: Options, reactor: Any = None) -> MultiService:  # noqa: N802
    """Build the client: a reconnecting session to each gateway."""
    return service_from_file(options, reactor, load_client_config, build_client)


def gateway_endpoint(config: ClientConfig, entry: ServerEntry, reactor: Any) -> Any:
    """The endpoint of one gateway: TCP, and TLS checked against its Host."""
    endpoint = HostnameEndpoint(
        reactor,
        entry.host,
        entry.tunnel_control_port,
        timeout=config.connect_timeout_seconds,
    )
    if not config.use_tls:
        return endpoint
    assert config.ca_certificate_file is not None
    assert config.client_tls_key_file is not None
    assert config.client_tls_certificate_file is not None
    creator = client_creator(
        config.ca_certificate_file,
        config.client_tls_key_file,
        config.client_tls_certificate_file,
        entry.host,
        source=config.source,
    )
    return wrapClientTLS(creator, endpoint)


def build_client(config: ClientConfig, reactor: Any) -> MultiService:
    """The client's service tree for a loaded configuration.

    The health checks (if any) first, so a session that comes up soon
    after start finds their first results; then one reconnecting service
    per gateway; then the admin socket.
    """
    logs.set_debug(config.debug_log)
    top = MultiService()
    services = dict(config.service_to_local_addr_map)
    health = None
    if config.health_checks:
        health = HealthMonitor(
            config.health_checks, services, reactor, tcp_probe(reactor)
        )
        health.setServiceParent(top)
    settings = ClientSettings(
        client_id=config.client_id,
        services=services,
        clock=reactor,
        local_endpoint=local_tcp_endpoint(reactor, config.connect_timeout_seconds),
        session_config=session_config(config),
        hello_timeout=config.connect_timeout_seconds,
        health=health,
        udp_reactor=reactor,
    )
    links = []
    for entry in config.gateways:
        link = GatewayLink(entry.address, reactor)
        links.append(link)
        reconnecting_service(
            settings,
            link,
            gateway_endpoint(config, entry, reactor),
            reactor,
            initial_delay=config.reconnect_initial_delay_seconds,
            max_delay=config.reconnect_max_delay_seconds,
        ).setServiceParent(top)
    if config.egress is not None:
        # The local SOCKS5 proxy out through a gateway (docs/egress.md).
        host, port = config.egress.socks_listen
        host = "127.0.0.1" if host == "localhost" else host
        endpoint = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
        listener(
            endpoint(reactor, port, interface=host), SocksFactory(settings, links)
        ).setServiceParent(top)
        if not ipaddress.ip_address(host).is_loopback:
            log.warn(
                "Egress.SocksListen is {address}: the SOCKS5 proxy has no"
                " authentication, so anyone who reaches it connects out as this"
                " client; keep it on loopback",
                address=format_address(host, port),
            )
    if config.admin_socket is not None:
        # Imported only when configured: klein and twisted.web are about a
        # sixth of the client's memory and start-up (docs/performance.md).
        from threshold.client.admin import admin_site

        listener(
            UNIXServerEndpoint(reactor, config.admin_socket, mode=0o600, wantPID=True),
            admin_site(settings, links),
        ).setServiceParent(top)
    if not config.use_tls:
        for link in links:
            log.warn(
                "UseTls is false: the tunnel to {server} is not encrypted or"
                " authenticated",
                server=link.address,
            )
    return top

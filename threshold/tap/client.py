"""``twistd -n threshold-client -c client.json``: the tunnel client's service tree."""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXServerEndpoint,
    wrapClientTLS,
)
from twisted.logger import Logger

from threshold import logs
from threshold.client.admin import admin_site
from threshold.client.endpoints import local_tcp_endpoint
from threshold.client.service import reconnecting_service
from threshold.client.settings import ClientSettings
from threshold.config import ClientConfig, load_client_config
from threshold.logs import observer as log_observer
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
    """Build the client: a reconnecting session to the server."""
    return service_from_file(options, reactor, load_client_config, build_client)


def build_client(config: ClientConfig, reactor: Any) -> MultiService:
    """The client's service tree for a loaded configuration."""
    logs.set_debug(config.debug_log)
    server = f"{config.server_host}:{config.server_tunnel_control_port}"
    endpoint = HostnameEndpoint(
        reactor,
        config.server_host,
        config.server_tunnel_control_port,
        timeout=config.connect_timeout_seconds,
    )
    if config.use_tls:
        assert config.ca_certificate_file is not None
        assert config.client_tls_key_file is not None
        assert config.client_tls_certificate_file is not None
        creator = client_creator(
            config.ca_certificate_file,
            config.client_tls_key_file,
            config.client_tls_certificate_file,
            config.server_host,
            source=config.source,
        )
        endpoint = wrapClientTLS(creator, endpoint)
    settings = ClientSettings(
        client_id=config.client_id,
        services=dict(config.service_to_local_addr_map),
        server=server,
        clock=reactor,
        local_endpoint=local_tcp_endpoint(reactor, config.connect_timeout_seconds),
        session_config=session_config(config),
        hello_timeout=config.connect_timeout_seconds,
    )
    top = MultiService()
    service = reconnecting_service(
        settings,
        endpoint,
        reactor,
        initial_delay=config.reconnect_initial_delay_seconds,
        max_delay=config.reconnect_max_delay_seconds,
    )
    service.setServiceParent(top)
    if config.admin_socket is not None:
        listener(
            UNIXServerEndpoint(reactor, config.admin_socket, mode=0o600, wantPID=True),
            admin_site(settings),
        ).setServiceParent(top)
    if not config.use_tls:
        log.warn(
            "UseTls is false: the tunnel to {server} is not encrypted or authenticated",
            server=server,
        )
    return top

"""The twistd plugins' options and service makers, for both roles.

``twistd -n threshold-server -c server.json`` and
``twistd -n threshold-client -c client.json``. A configuration error stops
start-up with one line naming the file and the field, and exit status 1:
everything is loaded and checked here, before any socket is opened.
"""

from __future__ import annotations

import os
import sys
from functools import partial
from types import SimpleNamespace
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.endpoints import (
    HostnameEndpoint,
    SSL4ServerEndpoint,
    TCP4ServerEndpoint,
    UNIXServerEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python import usage

from threshold import logs, metrics
from threshold.client import (
    TunnelClient,
    local_tcp_endpoint,
    reconnecting_service,
)
from threshold.client_admin import admin_site
from threshold.config import (
    ClientConfig,
    ConfigError,
    ServerConfig,
    load_client_config,
    load_server_config,
)
from threshold.frontend import FrontendLimits
from threshold.logs import observer as log_observer
from threshold.management import ManagementAPI, management_site
from threshold.mux.session import SessionConfig
from threshold.server import (
    ControlSettings,
    StateFileError,
    TunnelServer,
    read_state,
)
from threshold.tls import client_creator, server_options

log = Logger(observer=log_observer)


class ServerOptions(usage.Options):
    """Command line of ``twistd threshold-server``."""

    optParameters = [
        ["config", "c", "config.json", "The server's JSON configuration file."],
    ]


class ClientOptions(usage.Options):
    """Command line of ``twistd threshold-client``."""

    optParameters = [
        ["config", "c", "config.json", "The client's JSON configuration file."],
    ]


def _fail(message: str) -> SystemExit:
    """One line on stderr, exit status 1, no traceback."""
    print(f"threshold: {message}", file=sys.stderr)
    return SystemExit(1)


def _endpoint(
    reactor: Any, host: str, port: int, tls: Any | None
) -> IStreamServerEndpoint:
    if tls is not None:
        return SSL4ServerEndpoint(reactor, port, tls, interface=host)
    return TCP4ServerEndpoint(reactor, port, interface=host)


def _session_config(config: ServerConfig | ClientConfig) -> SessionConfig:
    """Session settings from the fields both roles' configs share."""
    return SessionConfig(
        max_window=config.max_receive_window_bytes,
        max_streams=config.max_streams_per_session,
        keepalive_interval=config.keepalive_interval_seconds,
        keepalive_timeout=config.keepalive_timeout_seconds,
        debug_frames=config.debug_log,
    )


def _listener(
    endpoint: IStreamServerEndpoint, factory: Any
) -> StreamServerEndpointService:
    """A listening service that fails start-up at once if it cannot bind.

    twistd then stops with the error instead of running half-started.
    """
    service = StreamServerEndpointService(endpoint, factory)
    service._raiseSynchronously = True
    return service


def makeServerService(options: ServerOptions, reactor: Any = None) -> MultiService:  # noqa: N802
    """Build the server: control listener, management API, tunnels."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_server_config(options["config"])
        return build_server(config, reactor)
    except (ConfigError, StateFileError) as e:
        raise _fail(str(e)) from None


def build_server(config: ServerConfig, reactor: Any) -> MultiService:
    """The server's service tree for a loaded configuration."""
    logs.set_debug(config.debug_log)
    tls = None
    if config.use_tls:
        assert config.ca_certificate_file is not None
        assert config.server_tls_key_file is not None
        assert config.server_tls_certificate_file is not None
        tls = server_options(
            config.ca_certificate_file,
            config.server_tls_key_file,
            config.server_tls_certificate_file,
            source=config.source,
        )
    restore = []
    if config.state_file is not None:
        if os.path.exists(config.state_file):
            restore = read_state(config.state_file)

    def listen(host: str, port: int, factory: Any) -> Any:
        return TCP4ServerEndpoint(reactor, port, interface=host).listen(factory)

    settings = ControlSettings(
        use_tls=config.use_tls,
        domain=config.domain,
        handshake_timeout=config.handshake_timeout_seconds,
        max_clients=config.max_clients,
        max_pending_handshakes=config.max_pending_handshakes,
        session=_session_config(config),
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
        ),
        shutdown_grace=config.shutdown_grace_seconds,
    )
    top = MultiService()
    server.setServiceParent(top)
    _listener(
        _endpoint(reactor, config.listen_address, config.tunnel_control_port, tls),
        server.control_factory(),
    ).setServiceParent(top)
    api_options: dict[str, Any] = dict(
        max_body_bytes=config.max_management_body_bytes,
        apply=server.apply,
        metrics=partial(metrics.render, metrics.server_registry(server)),
        limit_hit=server.limit_hit,
    )
    if config.management_socket is not None:
        # The socket file's permissions (0600) are the access control.
        endpoint: IStreamServerEndpoint = UNIXServerEndpoint(
            reactor, config.management_socket, mode=0o600, wantPID=True
        )
        api = ManagementAPI(server.routes, server.registry, **api_options)
    else:
        endpoint = _endpoint(
            reactor, config.management_listen_address, config.management_port, tls
        )
        api = ManagementAPI(
            server.routes,
            server.registry,
            allowed_common_names=config.management_allowed_common_names,
            require_tls_identity=config.use_tls,
            **api_options,
        )
    _listener(endpoint, management_site(api)).setServiceParent(top)
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


def makeClientService(options: ClientOptions, reactor: Any = None) -> MultiService:  # noqa: N802
    """Build the client: a reconnecting session to the server."""
    if reactor is None:
        from twisted.internet import reactor
    try:
        config = load_client_config(options["config"])
        return build_client(config, reactor)
    except ConfigError as e:
        raise _fail(str(e)) from None


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
    tunnel = TunnelClient(
        config.client_id,
        config.service_to_local_addr_map,
        server,
        reactor,
        local_tcp_endpoint(reactor, config.connect_timeout_seconds),
        _session_config(config),
        hello_timeout=config.connect_timeout_seconds,
    )
    top = MultiService()
    service = reconnecting_service(
        tunnel,
        endpoint,
        reactor,
        initial_delay=config.reconnect_initial_delay_seconds,
        max_delay=config.reconnect_max_delay_seconds,
    )
    service.setServiceParent(top)
    if config.admin_socket is not None:
        _listener(
            UNIXServerEndpoint(reactor, config.admin_socket, mode=0o600, wantPID=True),
            admin_site(tunnel),
        ).setServiceParent(top)
    if not config.use_tls:
        log.warn(
            "UseTls is false: the tunnel to {server} is not encrypted or authenticated",
            server=server,
        )
    return top


#: What the twistd plugins point at (``threshold.tap.server`` and
#: ``threshold.tap.client``): each role's Options and makeService.
server = SimpleNamespace(Options=ServerOptions, makeService=makeServerService)
client = SimpleNamespace(Options=ClientOptions, makeService=makeClientService)

"""Tests for threshold.config: the server and client JSON config files."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from threshold.config import (
    CLIENT,  # the field tables, so the random tests draw every known name
    SERVER,
    ClientConfig,
    ConfigError,
    ServerConfig,
    load_client_config,
    load_server_config,
    parse_client_config,
    parse_host_port,
    parse_server_config,
)
from threshold.config.client import HealthCheck as ServiceCheck
from threshold.config.egress import EGRESS_POLICY, EgressSettings
from threshold.config.policy import ClientPolicy
from threshold.config.server import ClusterSettings
from threshold.config.webhooks import WEBHOOKS
from threshold.schema.policy_kinds import CIDR_LIST


class TempDirMixin:
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="threshold-config-test-")
        self.addCleanup(shutil.rmtree, self.dir)
        for name in ("ca.crt", "tls.key", "tls.crt"):
            self.write(name, b"placeholder\n")

    def write(self, name: str, data: bytes) -> str:
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def assertConfigError(self, call, *fragments: str) -> str:
        """Check ``call`` raises a one-line ConfigError holding ``fragments``."""
        with self.assertRaises(ConfigError) as cm:
            call()
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message


class ServerConfigTests(TempDirMixin, SynchronousTestCase):
    def tls(self, **fields) -> dict:
        base = {
            "CaCertificateFile": "ca.crt",
            "ServerTlsKeyFile": "tls.key",
            "ServerTlsCertificateFile": "tls.crt",
        }
        base.update(fields)
        return base

    def parse(self, obj: object) -> ServerConfig:
        return parse_server_config(obj, "server.json", self.dir)

    def error(self, obj: object, *fragments: str) -> str:
        return self.assertConfigError(lambda: self.parse(obj), *fragments)

    def test_defaults_with_tls(self):
        """Only the TLS files given: every other field has its default."""
        config = self.parse(self.tls())
        self.assertEqual(
            config,
            ServerConfig(
                ca_certificate_file=os.path.join(self.dir, "ca.crt"),
                server_tls_key_file=os.path.join(self.dir, "tls.key"),
                server_tls_certificate_file=os.path.join(self.dir, "tls.crt"),
                source="server.json",
            ),
        )
        self.assertTrue(config.use_tls)
        self.assertEqual(config.tunnel_control_port, 9056)
        self.assertEqual(config.management_port, 9057)
        self.assertEqual(config.listen_address, "0.0.0.0")
        self.assertEqual(config.management_listen_address, "0.0.0.0")
        self.assertIsNone(config.domain)
        self.assertIsNone(config.state_file)
        self.assertIsNone(config.management_allowed_common_names)
        self.assertFalse(config.debug_log)

    def test_defaults_without_tls(self):
        """Without TLS the management API listens on loopback by default."""
        config = self.parse({"UseTls": False})
        self.assertFalse(config.use_tls)
        self.assertEqual(config.management_listen_address, "127.0.0.1")
        self.assertEqual(config.listen_address, "0.0.0.0")
        self.assertIsNone(config.ca_certificate_file)

    def test_numeric_defaults(self):
        """Limits and timeouts default to the documented values."""
        config = self.parse({"UseTls": False})
        self.assertEqual(config.handshake_timeout_seconds, 10)
        self.assertEqual(config.keepalive_interval_seconds, 30)
        self.assertEqual(config.keepalive_timeout_seconds, 90)
        self.assertEqual(config.max_streams_per_session, 4096)
        self.assertEqual(config.max_receive_window_bytes, 16777216)
        self.assertEqual(config.sni_read_timeout_seconds, 10)
        self.assertEqual(config.max_client_hello_bytes, 16384)
        self.assertEqual(config.max_management_body_bytes, 1048576)
        self.assertEqual(config.max_clients, 1000)

    def test_every_field(self):
        """Every field, set to a non-default value, reaches its attribute."""
        os.mkdir(os.path.join(self.dir, "state"))
        obj = self.tls(
            DebugLog=True,
            TunnelControlPort=1,
            ManagementPort=65535,
            ListenAddress="::",
            ManagementListenAddress="10.1.2.3",
            UseTls=True,
            Domain="example.org",
            StateFile="state/tunnels.json",
            ManagementAllowedCommonNames=["operator", "admin"],
            HandshakeTimeoutSeconds=2.5,
            KeepaliveIntervalSeconds=5,
            KeepaliveTimeoutSeconds=15,
            MaxStreamsPerSession=1,
            MaxReceiveWindowBytes=262144,
            SniReadTimeoutSeconds=0.5,
            MaxClientHelloBytes=1024,
            MaxManagementBodyBytes=1024,
            MaxClients=1,
            MaxPendingHandshakes=2,
            MaxPendingHandshakesPerSourceIp=0,
            MaxPendingManagementConnections=3,
            MaxPendingManagementConnectionsPerSourceIp=4,
            ManagementRequestTimeoutSeconds=2,
            StatusSampleIntervalSeconds=5,
            MaxConnectionsPerTunnel=0,
            MaxConnectionsPerSourceIp=3,
            PublicIdleTimeoutSeconds=0,
            PublicFirstByteTimeoutSeconds=0,
            LogConnections=False,
            UdpFlowIdleSeconds=25,
            UdpMaxFlowsPerTunnel=10,
            UdpMaxFlowsPerSourceIp=2,
            UdpMaxDatagramBytes=1500,
            SourceIpv6PrefixLength=48,
            ShutdownGraceSeconds=1.5,
            ManagementSocket="mgmt.sock",
            DefaultAllowSourceCidrs=["192.0.2.0/24"],
            DefaultDenySourceCidrs=["2001:db8::/32"],
            DefaultMaxNewConnectionsPerSecondPerSourceIp=2.5,
            DefaultNewConnectionBurst=7,
            RateLimitMaxSources=2048,
            ClientPolicies={"home-a": {"QuotaBytes": 5, "QuotaPeriod": "day"}},
            DefaultClientPolicy={"BandwidthBytesPerSecond": 1000},
            QuotaSaveIntervalSeconds=3,
            Cluster={"EtcdEndpoints": ["http://127.0.0.1:2379"], "GatewayId": "eu-1"},
            ReusePort=False,
            EgressPolicy={"home-a": [{"Cidr": "0.0.0.0/0", "Ports": "25,587"}]},
            MaxEgressConnectionsPerClient=3,
            EgressConnectTimeoutSeconds=4,
            EventHistorySize=50,
            MaxEventSubscribers=2,
            MaxEventBacklog=20,
            EventKeepaliveSeconds=3,
            LimitEventIntervalSeconds=30,
            Webhooks=[{"Url": "https://hooks.example.net/in", "Events": ["client.*"]}],
        )
        config = self.parse(obj)
        expected = {
            "debug_log": True,
            "tunnel_control_port": 1,
            "management_port": 65535,
            "listen_address": "::",
            "management_listen_address": "10.1.2.3",
            "use_tls": True,
            "ca_certificate_file": os.path.join(self.dir, "ca.crt"),
            "server_tls_key_file": os.path.join(self.dir, "tls.key"),
            "server_tls_certificate_file": os.path.join(self.dir, "tls.crt"),
            "domain": "example.org",
            "state_file": os.path.join(self.dir, "state", "tunnels.json"),
            "management_allowed_common_names": ("operator", "admin"),
            "handshake_timeout_seconds": 2.5,
            "keepalive_interval_seconds": 5.0,
            "keepalive_timeout_seconds": 15.0,
            "max_streams_per_session": 1,
            "max_receive_window_bytes": 262144,
            "sni_read_timeout_seconds": 0.5,
            "max_client_hello_bytes": 1024,
            "max_management_body_bytes": 1024,
            "max_clients": 1,
            "max_pending_handshakes": 2,
            "max_pending_handshakes_per_source_ip": 0,
            "max_pending_management_connections": 3,
            "max_pending_management_connections_per_source_ip": 4,
            "management_request_timeout_seconds": 2.0,
            "status_sample_interval_seconds": 5,
            "max_connections_per_tunnel": 0,
            "max_connections_per_source_ip": 3,
            "public_idle_timeout_seconds": 0.0,
            "public_first_byte_timeout_seconds": 0.0,
            "log_connections": False,
            "udp_flow_idle_seconds": 25.0,
            "udp_max_flows_per_tunnel": 10,
            "udp_max_flows_per_source_ip": 2,
            "udp_max_datagram_bytes": 1500,
            "source_ipv6_prefix_length": 48,
            "shutdown_grace_seconds": 1.5,
            "management_socket": os.path.join(self.dir, "mgmt.sock"),
            "default_allow_source_cidrs": CIDR_LIST.check(["192.0.2.0/24"]),
            "default_deny_source_cidrs": CIDR_LIST.check(["2001:db8::/32"]),
            "default_new_connection_rate": 2.5,
            "default_new_connection_burst": 7,
            "rate_limit_max_sources": 2048,
            "client_policies": {
                "home-a": ClientPolicy(quota_bytes=5, quota_period="day")
            },
            "default_client_policy": dataclasses.asdict(ClientPolicy(bandwidth=1000)),
            "quota_save_interval_seconds": 3.0,
            "cluster": dataclasses.asdict(
                ClusterSettings(
                    etcd_endpoints=("http://127.0.0.1:2379",), gateway_id="eu-1"
                )
            ),
            "reuse_port": False,
            "egress_policy": EGRESS_POLICY.check(
                {"home-a": [{"Cidr": "0.0.0.0/0", "Ports": "25,587"}]}
            ),
            "max_egress_connections_per_client": 3,
            "egress_connect_timeout_seconds": 4.0,
            "event_history_size": 50,
            "max_event_subscribers": 2,
            "max_event_backlog": 20,
            "event_keepalive_seconds": 3.0,
            "limit_event_interval_seconds": 30.0,
            "webhooks": (dataclasses.asdict(WEBHOOKS.check(obj["Webhooks"])[0]),),
            "source": "server.json",
        }
        self.assertEqual(
            set(expected), {f.name for f in dataclasses.fields(ServerConfig)}
        )
        self.assertEqual(dataclasses.asdict(config), expected)
        self.assertEqual(set(obj), set(SERVER.names))

    def test_upper_bounds(self):
        """Values at the top of their ranges are accepted."""
        config = self.parse(
            self.tls(
                MaxClientHelloBytes=65536,
                MaxReceiveWindowBytes=2**32 - 1,
                KeepaliveTimeoutSeconds=365 * 24 * 3600,
            )
        )
        self.assertEqual(config.max_client_hello_bytes, 65536)
        self.assertEqual(config.max_receive_window_bytes, 2**32 - 1)

    def test_wrong_values(self):
        """Each mistyped or out-of-range value names the field and the value."""
        cases = [
            ("DebugLog", 1, "expected true or false, got 1"),
            ("DebugLog", "true", 'expected true or false, got "true"'),
            ("DebugLog", None, "got null"),
            ("UseTls", 0, "expected true or false, got 0"),
            ("TunnelControlPort", "abc", 'from 1 to 65535, got "abc"'),
            ("TunnelControlPort", 0, "from 1 to 65535, got 0"),
            ("TunnelControlPort", 65536, "from 1 to 65535, got 65536"),
            ("TunnelControlPort", 9056.0, "got 9056.0"),
            ("TunnelControlPort", True, "got true"),
            ("ManagementPort", -1, "from 1 to 65535"),
            ("ManagementPort", [9057], "got [9057]"),
            ("ListenAddress", "localhost", 'expected an IP address, got "localhost"'),
            ("ListenAddress", "", "non-empty string"),
            ("ListenAddress", 127, "got 127"),
            ("ManagementListenAddress", "1.2.3.4.5", "expected an IP address"),
            ("Domain", "", "non-empty string or null"),
            ("Domain", "a@b", "domain name"),
            ("Domain", "a b", "domain name"),
            ("Domain", 5, "got 5"),
            ("StateFile", 3, "got 3"),
            ("StateFile", "", "non-empty string"),
            ("ManagementAllowedCommonNames", "operator", "a list of strings or null"),
            ("ManagementAllowedCommonNames", {"a": 1}, "a list of strings"),
            ("HandshakeTimeoutSeconds", 0, "greater than 0"),
            ("HandshakeTimeoutSeconds", -1.5, "greater than 0"),
            ("HandshakeTimeoutSeconds", "10", 'got "10"'),
            ("HandshakeTimeoutSeconds", True, "got true"),
            ("KeepaliveIntervalSeconds", 0.0, "greater than 0"),
            ("KeepaliveTimeoutSeconds", 10**400, "at most 31536000"),
            ("SniReadTimeoutSeconds", None, "got null"),
            ("MaxStreamsPerSession", 0, "at least 1, got 0"),
            ("MaxStreamsPerSession", 1.5, "got 1.5"),
            ("MaxReceiveWindowBytes", 262143, "from 262144 to 4294967295"),
            ("MaxReceiveWindowBytes", 2**32, "from 262144 to 4294967295"),
            ("MaxClientHelloBytes", 1023, "from 1024 to 65536"),
            ("MaxClientHelloBytes", 65537, "from 1024 to 65536"),
            ("MaxManagementBodyBytes", 1023, "at least 1024"),
            ("MaxClients", 0, "at least 1"),
            ("MaxClients", False, "got false"),
            ("MaxPendingHandshakes", 0, "at least 1"),
            ("MaxConnectionsPerTunnel", -1, "at least 0"),
            ("MaxConnectionsPerSourceIp", 2.5, "got 2.5"),
            ("PublicIdleTimeoutSeconds", -1, "from 0 (off)"),
            ("ShutdownGraceSeconds", "5", 'got "5"'),
            ("CaCertificateFile", 5, "got 5"),
            ("ServerTlsKeyFile", "", "non-empty string"),
            ("ServerTlsCertificateFile", ["x"], 'got ["x"]'),
        ]
        for field, value, fragment in cases:
            message = self.error(self.tls(**{field: value}), fragment)
            self.assertTrue(
                message.startswith(f'server.json: field "{field}": '),
                f"{field}={value!r}: {message}",
            )

    def test_non_finite_numbers(self):
        """NaN and infinity (possible in Python objects) are refused."""
        for value in (math.nan, math.inf, -math.inf):
            self.error(self.tls(KeepaliveIntervalSeconds=value), "KeepaliveInterval")

    def test_common_names_items(self):
        """Each entry of ManagementAllowedCommonNames must be a non-empty string."""
        self.error(
            self.tls(ManagementAllowedCommonNames=["ok", ""]),
            'field "ManagementAllowedCommonNames[1]": expected a non-empty string',
        )
        self.error(
            self.tls(ManagementAllowedCommonNames=[7]),
            'field "ManagementAllowedCommonNames[0]"',
            "got 7",
        )

    def test_common_names_null_and_empty(self):
        """null means no restriction; an empty list is kept (nobody allowed)."""
        self.assertIsNone(
            self.parse(
                self.tls(ManagementAllowedCommonNames=None)
            ).management_allowed_common_names
        )
        self.assertEqual(
            self.parse(
                self.tls(ManagementAllowedCommonNames=[])
            ).management_allowed_common_names,
            (),
        )

    def test_ip_addresses_normalised(self):
        """IP addresses are stored in their canonical text form."""
        config = self.parse(
            self.tls(ListenAddress="0:0:0:0:0:0:0:1", ManagementListenAddress="::")
        )
        self.assertEqual(config.listen_address, "::1")
        self.assertEqual(config.management_listen_address, "::")

    def test_same_port_same_address(self):
        """The two listeners may not share a port on an overlapping address."""
        for listen, management in (
            ("0.0.0.0", "0.0.0.0"),
            ("0.0.0.0", "127.0.0.1"),
            ("127.0.0.1", "0.0.0.0"),
            ("::", "127.0.0.1"),
            ("::1", "::"),
            ("10.0.0.1", "10.0.0.1"),
        ):
            self.error(
                self.tls(
                    TunnelControlPort=9000,
                    ManagementPort=9000,
                    ListenAddress=listen,
                    ManagementListenAddress=management,
                ),
                'field "ManagementPort": must differ from "TunnelControlPort"',
                "9000",
            )

    def test_same_port_different_addresses(self):
        """The same port on two distinct addresses is fine."""
        for listen, management in (
            ("10.0.0.1", "127.0.0.1"),
            ("0.0.0.0", "::1"),
            ("::1", "127.0.0.1"),
        ):
            config = self.parse(
                self.tls(
                    TunnelControlPort=9000,
                    ManagementPort=9000,
                    ListenAddress=listen,
                    ManagementListenAddress=management,
                )
            )
            self.assertEqual(config.management_port, 9000)

    def test_default_ports_conflict(self):
        """Moving one port onto the other's default is caught too."""
        self.error(self.tls(ManagementPort=9056), "must differ")

    def test_tls_files_required(self):
        """With TLS each missing file is named."""
        for missing in (
            "CaCertificateFile",
            "ServerTlsKeyFile",
            "ServerTlsCertificateFile",
        ):
            obj = self.tls()
            del obj[missing]
            self.error(obj, f'field "{missing}": required when "UseTls" is true')
            obj[missing] = None
            self.error(obj, f'field "{missing}": required when "UseTls" is true')

    def test_tls_files_unused_without_tls(self):
        """Without TLS the file fields are optional and not opened."""
        config = self.parse({"UseTls": False, "CaCertificateFile": "nowhere.crt"})
        self.assertEqual(
            config.ca_certificate_file, os.path.join(self.dir, "nowhere.crt")
        )

    def test_tls_file_missing(self):
        """A TLS file that does not exist is named with the reason."""
        message = self.error(
            self.tls(ServerTlsKeyFile="missing.key"),
            'field "ServerTlsKeyFile": cannot read file',
            os.path.join(self.dir, "missing.key"),
            "No such file or directory",
        )
        self.assertTrue(message.startswith("server.json: "))

    def test_tls_file_is_directory(self):
        """A directory where a file belongs is refused."""
        os.mkdir(os.path.join(self.dir, "sub"))
        self.error(
            self.tls(CaCertificateFile="sub"),
            'field "CaCertificateFile": cannot read file',
        )

    def test_tls_file_unreadable(self):
        """A file without read permission is refused."""
        if os.geteuid() == 0:
            raise SkipTest("root can read any file")
        path = self.write("secret.key", b"x")
        os.chmod(path, 0)
        self.error(self.tls(ServerTlsKeyFile="secret.key"), "Permission denied")

    def test_absolute_paths_kept(self):
        """Absolute paths are used as they are."""
        path = self.write("abs/ca.crt", b"x")
        config = self.parse(self.tls(CaCertificateFile=path))
        self.assertEqual(config.ca_certificate_file, path)

    def test_state_file_directory_must_exist(self):
        """A StateFile in a directory that does not exist is refused."""
        self.error(
            self.tls(StateFile="nodir/state.json"),
            'field "StateFile": directory',
            "does not exist",
        )

    def test_state_file_null(self):
        """StateFile null means no state file."""
        self.assertIsNone(self.parse(self.tls(StateFile=None)).state_file)

    def test_unknown_field(self):
        """An unknown field is named, with the closest known one suggested."""
        self.error(
            self.tls(TunnelControlPrt=1),
            'server.json: unknown field "TunnelControlPrt"'
            ' (did you mean "TunnelControlPort"?)',
        )
        message = self.error(self.tls(Zzzz=1), 'server.json: unknown field "Zzzz"')
        self.assertNotIn("did you mean", message)

    def test_client_field_in_server_config(self):
        """A client-only field in the server config is unknown."""
        self.error(
            self.tls(ServerHost="x"),
            'unknown field "ServerHost" (a client config field:'
            " is this the client's config?)",
        )

    def test_top_level_not_object(self):
        """The top level must be an object."""
        for value in ([], "x", 1, None):
            self.error(value, "server.json: the top level must be a JSON object")


class ClientConfigTests(TempDirMixin, SynchronousTestCase):
    def base(self, **fields) -> dict:
        obj = {
            "ClientId": "TestClient1",
            "ServerHost": "tunnel.example.com",
            "CaCertificateFile": "ca.crt",
            "ClientTlsKeyFile": "tls.key",
            "ClientTlsCertificateFile": "tls.crt",
            "ServiceToLocalAddrMap": {"fooService": "127.0.0.1:8080"},
        }
        obj.update(fields)
        return {k: v for k, v in obj.items() if v is not _DELETE}

    def parse(self, obj: object) -> ClientConfig:
        return parse_client_config(obj, "client.json", self.dir)

    def error(self, obj: object, *fragments: str) -> str:
        return self.assertConfigError(lambda: self.parse(obj), *fragments)

    def test_defaults(self):
        """The required fields alone give the documented defaults."""
        config = self.parse(self.base())
        self.assertEqual(config.client_id, "TestClient1")
        self.assertEqual(config.server_host, "tunnel.example.com")
        self.assertEqual(config.server_tunnel_control_port, 9056)
        self.assertFalse(hasattr(config, "server_management_port"))
        self.assertTrue(config.use_tls)
        self.assertFalse(config.debug_log)
        self.assertEqual(
            dict(config.service_to_local_addr_map), {"fooService": ("127.0.0.1", 8080)}
        )
        self.assertEqual(config.keepalive_interval_seconds, 30)
        self.assertEqual(config.keepalive_timeout_seconds, 90)
        self.assertEqual(config.max_streams_per_session, 4096)
        self.assertEqual(config.max_receive_window_bytes, 16777216)
        self.assertEqual(config.reconnect_initial_delay_seconds, 1)
        self.assertEqual(config.reconnect_max_delay_seconds, 60)
        self.assertEqual(config.connect_timeout_seconds, 10)
        self.assertEqual(config.source, "client.json")

    def test_every_field(self):
        """Every field, set to a non-default value, reaches its attribute."""
        obj = self.base(
            DebugLog=True,
            ServerHost="192.0.2.7",
            ServerTunnelControlPort=443,
            ServerManagementPort=8443,
            UseTls=True,
            ServiceToLocalAddrMap={
                "web": "localhost:80",
                "ssh": "[::1]:22",
                "db": "10.0.0.5:5432",
            },
            KeepaliveIntervalSeconds=1,
            KeepaliveTimeoutSeconds=3.5,
            MaxStreamsPerSession=10,
            MaxReceiveWindowBytes=1048576,
            ReconnectInitialDelaySeconds=0.1,
            ReconnectMaxDelaySeconds=5,
            ConnectTimeoutSeconds=2,
            AdminSocket="admin.sock",
            HealthChecks={"web": {"IntervalSeconds": 3, "TimeoutSeconds": 1}},
            Egress={"SocksListen": "127.0.0.1:1080"},
        )
        # Servers is the other way to name the gateways (tests/test_client_config.py).
        self.assertEqual(set(obj) | {"ClientIdentifier", "Servers"}, set(CLIENT.names))
        config = self.parse(obj)
        expected = {
            "client_id": "TestClient1",
            "server_host": "192.0.2.7",
            "debug_log": True,
            "server_tunnel_control_port": 443,
            "use_tls": True,
            "ca_certificate_file": os.path.join(self.dir, "ca.crt"),
            "client_tls_key_file": os.path.join(self.dir, "tls.key"),
            "client_tls_certificate_file": os.path.join(self.dir, "tls.crt"),
            "service_to_local_addr_map": {
                "web": ("localhost", 80),
                "ssh": ("::1", 22),
                "db": ("10.0.0.5", 5432),
            },
            "keepalive_interval_seconds": 1.0,
            "keepalive_timeout_seconds": 3.5,
            "max_streams_per_session": 10,
            "max_receive_window_bytes": 1048576,
            "reconnect_initial_delay_seconds": 0.1,
            "reconnect_max_delay_seconds": 5.0,
            "admin_socket": os.path.join(self.dir, "admin.sock"),
            "connect_timeout_seconds": 2.0,
            "servers": None,
            "health_checks": {
                "web": ServiceCheck(interval_seconds=3, timeout_seconds=1)
            },
            "egress": EgressSettings(socks_listen=("127.0.0.1", 1080)),
            "source": "client.json",
        }
        self.assertEqual(
            set(expected), {f.name for f in dataclasses.fields(ClientConfig)}
        )
        actual = {
            f.name: getattr(config, f.name) for f in dataclasses.fields(ClientConfig)
        }
        actual["service_to_local_addr_map"] = dict(actual["service_to_local_addr_map"])
        self.assertEqual(actual, expected)

    def test_service_map_read_only(self):
        """The parsed service map cannot be changed behind the config's back."""
        config = self.parse(self.base())
        with self.assertRaises(TypeError):
            config.service_to_local_addr_map["x"] = ("h", 1)  # type: ignore[index]

    def test_client_identifier_alias(self):
        """ClientIdentifier is another name for ClientId."""
        config = self.parse(self.base(ClientId=_DELETE, ClientIdentifier="abc"))
        self.assertEqual(config.client_id, "abc")
        config = self.parse(self.base(ClientId="abc", ClientIdentifier="abc"))
        self.assertEqual(config.client_id, "abc")

    def test_client_id_conflict(self):
        """ClientId and ClientIdentifier with different values is an error."""
        self.error(
            self.base(ClientId="a", ClientIdentifier="b"),
            'field "ClientIdentifier": differs from "ClientId"',
        )

    def test_client_id_missing(self):
        """Without ClientId (or ClientIdentifier) the config is refused."""
        self.error(
            self.base(ClientId=_DELETE),
            'client.json: field "ClientId": required field is missing',
        )

    def test_client_id_values(self):
        """ClientId allows letters, digits, '.', '_' and '-', up to 128."""
        self.assertEqual(self.parse(self.base(ClientId="a.B_9-z")).client_id, "a.B_9-z")
        self.assertEqual(self.parse(self.base(ClientId="x" * 128)).client_id, "x" * 128)
        for bad in ("a@example.com", "x" * 129, "a b", "é", "a/b"):
            self.error(self.base(ClientId=bad), 'field "ClientId"', "not allowed")
        for bad in ("", 5, None, ["a"]):
            self.error(self.base(ClientId=bad), 'field "ClientId"')
        self.error(self.base(ClientIdentifier="a@b"), 'field "ClientIdentifier"')

    def test_server_host(self):
        """ServerHost takes a host name or an IP address."""
        for host in ("localhost", "a-b.example.com", "example.com.", "::1", "10.0.0.1"):
            self.assertEqual(self.parse(self.base(ServerHost=host)).server_host, host)
        for bad in ("bad host", "-x.com", "a..b", "[::1]", "x" * 64 + ".com"):
            self.error(
                self.base(ServerHost=bad),
                'field "ServerHost": expected a host name or IP address',
            )
        self.error(self.base(ServerHost=_DELETE), 'field "ServerHost": required field')
        self.error(self.base(ServerHost=""), 'field "ServerHost"', "non-empty")
        self.error(self.base(ServerHost=5), 'field "ServerHost"', "got 5")

    def test_wrong_values(self):
        """Each mistyped or out-of-range value names the field and the value."""
        cases = [
            ("DebugLog", 0, "expected true or false, got 0"),
            ("UseTls", "false", 'got "false"'),
            ("ServerTunnelControlPort", 0, "from 1 to 65535"),
            ("ServerTunnelControlPort", "9056", 'got "9056"'),
            ("ServerManagementPort", 70000, "from 1 to 65535"),
            ("ServerManagementPort", False, "got false"),
            ("KeepaliveIntervalSeconds", 0, "greater than 0"),
            ("KeepaliveTimeoutSeconds", "x", "greater than 0"),
            ("MaxStreamsPerSession", 0, "at least 1"),
            ("MaxReceiveWindowBytes", 1000, "from 262144"),
            ("ReconnectInitialDelaySeconds", -1, "greater than 0"),
            ("ReconnectMaxDelaySeconds", 0, "greater than 0"),
            ("ConnectTimeoutSeconds", True, "got true"),
            ("CaCertificateFile", 1, "got 1"),
            ("ClientTlsKeyFile", "", "non-empty"),
            ("ClientTlsCertificateFile", {}, "got {}"),
        ]
        for field, value, fragment in cases:
            message = self.error(self.base(**{field: value}), fragment)
            self.assertTrue(
                message.startswith(f'client.json: field "{field}": '),
                f"{field}={value!r}: {message}",
            )

    def test_reconnect_delays_ordered(self):
        """The initial reconnect delay may not exceed the maximum."""
        self.error(
            self.base(ReconnectInitialDelaySeconds=10, ReconnectMaxDelaySeconds=5),
            'field "ReconnectInitialDelaySeconds"',
            "ReconnectMaxDelaySeconds",
        )

    def test_service_map_required(self):
        """ServiceToLocalAddrMap is required but may be empty."""
        self.error(
            self.base(ServiceToLocalAddrMap=_DELETE),
            'field "ServiceToLocalAddrMap": required field is missing',
        )
        config = self.parse(self.base(ServiceToLocalAddrMap={}))
        self.assertEqual(dict(config.service_to_local_addr_map), {})

    def test_service_map_not_object(self):
        """ServiceToLocalAddrMap must be an object."""
        for value in ([], "a:1", None):
            self.error(
                self.base(ServiceToLocalAddrMap=value),
                'field "ServiceToLocalAddrMap": expected an object',
            )

    def test_service_map_bad_addresses(self):
        """A bad address names the service and shows the value."""
        self.error(
            self.base(ServiceToLocalAddrMap={"fooService": "nope"}),
            'client.json: field "ServiceToLocalAddrMap.fooService":'
            ' expected "host:port", got "nope"',
        )
        for bad in (
            "host:0",
            "host:65536",
            "host:",
            ":80",
            "host:8o",
            "host:+80",
            "::1:80",
            "[nothost]:80",
            "bad host:80",
            "host:٨٠",
        ):
            self.error(
                self.base(ServiceToLocalAddrMap={"s": bad}),
                'field "ServiceToLocalAddrMap.s": expected "host:port"',
            )
        self.error(
            self.base(ServiceToLocalAddrMap={"s": 8080}),
            'field "ServiceToLocalAddrMap.s": expected "host:port", got 8080',
        )

    def test_service_map_bad_names(self):
        """Service names must be 1 to 128 printable characters."""
        for name in ("", "x" * 129, "a\nb"):
            self.error(
                self.base(ServiceToLocalAddrMap={name: "h:1"}),
                'field "ServiceToLocalAddrMap": invalid service name',
            )
        config = self.parse(self.base(ServiceToLocalAddrMap={"x" * 128: "h:1"}))
        self.assertIn("x" * 128, config.service_to_local_addr_map)

    def test_tls_files_required(self):
        """With TLS each missing file is named; without TLS none is needed."""
        for missing in (
            "CaCertificateFile",
            "ClientTlsKeyFile",
            "ClientTlsCertificateFile",
        ):
            self.error(
                self.base(**{missing: _DELETE}),
                f'field "{missing}": required when "UseTls" is true',
            )
        config = self.parse(
            {
                "ClientId": "a",
                "ServerHost": "h",
                "UseTls": False,
                "ServiceToLocalAddrMap": {},
            }
        )
        self.assertIsNone(config.client_tls_key_file)

    def test_tls_file_missing(self):
        """A TLS file that does not exist is named."""
        self.error(
            self.base(ClientTlsCertificateFile="nope.crt"),
            'field "ClientTlsCertificateFile": cannot read file',
            os.path.join(self.dir, "nope.crt"),
        )

    def test_unknown_field(self):
        """A misspelt field is named with a suggestion."""
        self.error(
            self.base(ServerHostt="x"),
            'client.json: unknown field "ServerHostt" (did you mean "ServerHost"?)',
        )
        self.error(
            self.base(TunnelControlPort=1),
            'unknown field "TunnelControlPort" (a server config field:'
            " is this the server's config?)",
        )

    def test_top_level_not_object(self):
        """The top level must be an object."""
        self.error(["x"], "client.json: the top level must be a JSON object")


_DELETE = object()


class HostPortTests(SynchronousTestCase):
    def test_forms(self):
        """host:port, IPv4:port and [IPv6]:port are understood."""
        self.assertEqual(parse_host_port("example.com:80"), ("example.com", 80))
        self.assertEqual(parse_host_port("127.0.0.1:65535"), ("127.0.0.1", 65535))
        self.assertEqual(parse_host_port("[::1]:1"), ("::1", 1))
        self.assertEqual(parse_host_port("[fe80::1]:8080"), ("fe80::1", 8080))

    def test_errors(self):
        """Malformed addresses raise ValueError saying why."""
        for bad, why in (
            ("nope", "missing"),
            ("::1:80", "brackets"),
            ("h:99999", "65535"),
            ("[1.2.3.4]:80", "IPv6"),
        ):
            with self.assertRaises(ValueError) as cm:
                parse_host_port(bad)
            self.assertIn(why, str(cm.exception))


class ConfigErrorTests(TempDirMixin, SynchronousTestCase):
    """ConfigError carries the file and the field as data, not only in text."""

    def error(self, call) -> ConfigError:
        with self.assertRaises(ConfigError) as cm:
            call()
        return cm.exception

    def test_field_error(self):
        """A field error: source, field and message, and the one-line form."""
        e = self.error(lambda: parse_server_config({"UseTls": 1}, "s.json"))
        self.assertEqual(
            (e.source, e.field, e.message),
            ("s.json", "UseTls", "expected true or false, got 1"),
        )
        self.assertEqual(
            str(e), 's.json: field "UseTls": expected true or false, got 1'
        )

    def test_nested_field(self):
        """An entry inside a field is named with its path."""
        obj = {"ClientId": "a", "ServerHost": "h", "UseTls": False}
        obj["ServiceToLocalAddrMap"] = {"web": "nope"}
        e = self.error(lambda: parse_client_config(obj, "c.json"))
        self.assertEqual(e.field, "ServiceToLocalAddrMap.web")
        self.assertTrue(e.message.startswith('expected "host:port", got "nope"'))

    def test_unknown_and_whole_file(self):
        """An unknown field is the field; a problem of the whole file has none."""
        e = self.error(lambda: parse_server_config({"Zz": 1}, "s.json"))
        self.assertEqual((e.field, str(e)), ("Zz", 's.json: unknown field "Zz"'))
        path = self.write("bad.json", b"[")
        e = self.error(lambda: load_server_config(path))
        self.assertEqual((e.source, e.field), (path, None))
        self.assertTrue(e.message.startswith("not valid JSON: "))

    def test_constructed(self):
        """Code outside config (tls) builds them from parts; the old form works."""
        e = ConfigError("s.json", "cannot load key", "ServerTlsKeyFile")
        self.assertEqual(str(e), 's.json: field "ServerTlsKeyFile": cannot load key')
        self.assertEqual(str(ConfigError("s.json", "unreadable")), "s.json: unreadable")
        old = ConfigError("one whole line")
        self.assertEqual(
            (str(old), old.field, old.message),
            ("one whole line", None, "one whole line"),
        )


class LoadFileTests(TempDirMixin, SynchronousTestCase):
    def test_load_server(self):
        """A server config file loads; relative paths resolve next to it."""
        self.write("conf/certs/ca.crt", b"x")
        self.write("conf/certs/server.key", b"x")
        self.write("conf/certs/server.crt", b"x")
        path = self.write(
            "conf/server.json",
            json.dumps(
                {
                    "CaCertificateFile": "certs/ca.crt",
                    "ServerTlsKeyFile": "./certs/server.key",
                    "ServerTlsCertificateFile": "certs/../certs/server.crt",
                    "StateFile": "state.json",
                }
            ).encode(),
        )
        # The current directory must not matter.
        self.assertNotEqual(os.getcwd(), os.path.dirname(path))
        config = load_server_config(path)
        conf = os.path.join(self.dir, "conf")
        self.assertEqual(
            config.ca_certificate_file, os.path.join(conf, "certs", "ca.crt")
        )
        self.assertEqual(
            config.server_tls_key_file, os.path.join(conf, "certs", "server.key")
        )
        self.assertEqual(
            config.server_tls_certificate_file,
            os.path.join(conf, "certs", "server.crt"),
        )
        self.assertEqual(config.state_file, os.path.join(conf, "state.json"))
        self.assertEqual(config.source, path)

    def test_load_client(self):
        """A client config file loads; relative paths resolve next to it."""
        self.write("c/ca.crt", b"x")
        self.write("c/me.key", b"x")
        self.write("c/me.crt", b"x")
        path = self.write(
            "c/client.json",
            json.dumps(
                {
                    "ClientIdentifier": "TestClient1",
                    "ServerHost": "localhost",
                    "CaCertificateFile": "ca.crt",
                    "ClientTlsKeyFile": "me.key",
                    "ClientTlsCertificateFile": "me.crt",
                    "ServiceToLocalAddrMap": {"web": "localhost:8080"},
                }
            ).encode(),
        )
        config = load_client_config(path)
        self.assertEqual(config.client_id, "TestClient1")
        self.assertEqual(
            config.client_tls_key_file, os.path.join(self.dir, "c", "me.key")
        )

    def test_missing_file(self):
        """A config file that cannot be read gives the OS reason."""
        path = os.path.join(self.dir, "server.json")
        self.assertConfigError(
            lambda: load_server_config(path),
            f"{path}: cannot read file: [Errno 2] No such file or directory",
        )
        self.assertConfigError(
            lambda: load_client_config(self.dir),
            f"{self.dir}: cannot read file: [Errno 21]",
        )

    def test_invalid_json(self):
        """Invalid JSON gives the parser's reason with line and column."""
        path = self.write(
            "server.json", b'{\n  "UseTls": false,\n    "DebugLog" true\n}'
        )
        self.assertConfigError(
            lambda: load_server_config(path),
            f"{path}: not valid JSON: Expecting ':' delimiter at line 3 column 16",
        )
        path = self.write("s2.json", b'{\n  "UseTls": false\n    "DebugLog": true\n}')
        self.assertConfigError(
            lambda: load_server_config(path),
            "not valid JSON: Expecting ',' delimiter at line 3 column 5",
        )

    def test_empty_file(self):
        """An empty file is invalid JSON."""
        path = self.write("server.json", b"")
        self.assertConfigError(lambda: load_server_config(path), "not valid JSON")

    def test_not_object(self):
        """A file holding a list is refused."""
        path = self.write("client.json", b"[]")
        self.assertConfigError(
            lambda: load_client_config(path),
            f"{path}: the top level must be a JSON object",
        )

    def test_not_utf8(self):
        """A file that is not UTF-8 is refused."""
        path = self.write("server.json", b'{"Domain": "\xff"}')
        self.assertConfigError(lambda: load_server_config(path), "not valid UTF-8")

    def test_bom_accepted(self):
        """A UTF-8 byte order mark (from some editors) is accepted."""
        path = self.write("server.json", b'\xef\xbb\xbf{"UseTls": false}')
        self.assertFalse(load_server_config(path).use_tls)

    def test_duplicate_field(self):
        """A field given twice is refused rather than silently overridden."""
        path = self.write("server.json", b'{"UseTls": false, "UseTls": true}')
        self.assertConfigError(
            lambda: load_server_config(path), 'field "UseTls": appears more than once'
        )

    def test_nan_refused(self):
        """The non-standard NaN and Infinity literals are refused."""
        path = self.write("server.json", b'{"UseTls": false, "MaxClients": NaN}')
        self.assertConfigError(
            lambda: load_server_config(path), "not valid JSON", "NaN"
        )

    def test_deep_nesting(self):
        """Deeply nested JSON gives a ConfigError, not a crash."""
        path = self.write("client.json", b"[" * 100000 + b"]" * 100000)
        self.assertConfigError(lambda: load_client_config(path), "not valid JSON")


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["ca.crt", "127.0.0.1", "::", "h:1", "[::1]:80", "a@b"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def config_objects(fields: list[str]):
    """Objects with mostly known field names and random values."""
    keys = st.sampled_from(fields) | st.text(max_size=10)
    return st.dictionaries(keys, json_values, max_size=8)


class RandomInputTests(TempDirMixin, SynchronousTestCase):
    def check(self, parse, obj) -> None:
        try:
            parse(obj, "random.json", self.dir)
        except ConfigError as e:
            message = str(e)
            self.assertTrue(message.startswith("random.json: "), message)
            self.assertNotIn("\n", message)

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values | config_objects(SERVER.names))
    def test_server_random(self, obj):
        """Random JSON values parse as a server config or raise ConfigError."""
        self.check(parse_server_config, obj)

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
    @given(json_values | config_objects(CLIENT.names))
    def test_client_random(self, obj):
        """Random JSON values parse as a client config or raise ConfigError."""
        self.check(parse_client_config, obj)

    @settings(max_examples=200)
    @given(st.binary(max_size=100))
    def test_random_file(self, data):
        """Random file contents load or raise ConfigError, nothing else."""
        path = self.write("random.json", data)
        for load in (load_server_config, load_client_config):
            try:
                load(path)
            except ConfigError as e:
                self.assertNotIn("\n", str(e))

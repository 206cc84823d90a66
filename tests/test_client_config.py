"""The client config's Servers and HealthChecks, and keepalive down to seconds."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from threshold.config import ConfigError, parse_client_config
from threshold.config.client import (
    CLIENT,
    HEALTH_CHECK,
    MAX_SERVERS,
    SERVER_ENTRY,
    HealthCheck,
    ServerEntry,
)
from threshold.tap.common import session_config


def base(**fields: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "ClientId": "home-a",
        "UseTls": False,
        "ServiceToLocalAddrMap": {"web": "127.0.0.1:8080", "db": "[::1]:5432"},
    }
    obj.update(fields)
    return obj


class ServersTests(SynchronousTestCase):
    def parse(self, obj):
        return parse_client_config(obj, "client.json")

    def error(self, obj, *fragments: str) -> str:
        with self.assertRaises(ConfigError) as caught:
            self.parse(obj)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        self.assertTrue(message.startswith("client.json: "), message)
        return message

    def test_server_host_is_a_list_of_one(self):
        """ServerHost and ServerTunnelControlPort mean Servers with one entry."""
        config = self.parse(base(ServerHost="gw.example", ServerTunnelControlPort=443))
        self.assertIsNone(config.servers)
        self.assertEqual(
            config.gateways, (ServerEntry(host="gw.example", tunnel_control_port=443),)
        )
        config = self.parse(base(ServerHost="::1"))
        self.assertEqual(config.gateways[0].address, "[::1]:9056")

    def test_servers(self):
        """Servers lists every gateway, the port defaulting to 9056."""
        config = self.parse(
            base(
                Servers=[
                    {"Host": "gw1.example", "TunnelControlPort": 9056},
                    {"Host": "gw2.example"},
                    {"Host": "192.0.2.1", "TunnelControlPort": 443},
                    {"Host": "gw1.example", "TunnelControlPort": 9057},
                ]
            )
        )
        self.assertIsNone(config.server_host)
        self.assertEqual(
            [g.address for g in config.gateways],
            [
                "gw1.example:9056",
                "gw2.example:9056",
                "192.0.2.1:443",
                "gw1.example:9057",
            ],
        )
        self.assertEqual(
            CLIENT["servers"].kind.to_json(config.servers)[1],
            {"Host": "gw2.example", "TunnelControlPort": 9056},
        )

    def test_both_ways_refused(self):
        """Servers with ServerHost or ServerTunnelControlPort names the fields."""
        self.error(
            base(Servers=[{"Host": "a"}], ServerHost="b"),
            'field "ServerHost": give either "Servers" or "ServerHost", not both',
        )
        self.error(
            base(Servers=[{"Host": "a"}], ServerTunnelControlPort=1),
            'field "ServerTunnelControlPort": give either "Servers" or',
        )

    def test_neither_refused(self):
        """Without either, the config says what is missing."""
        self.error(
            base(), 'field "ServerHost": required field is missing (or give "Servers")'
        )
        self.error(base(Servers=None), 'field "ServerHost": required field is missing')

    def test_duplicates_refused(self):
        """The same gateway twice (case, final dot, IPv6 spelling aside) is refused."""
        for first, second in [
            (
                {"Host": "gw.example"},
                {"Host": "GW.example.", "TunnelControlPort": 9056},
            ),
            ({"Host": "::1"}, {"Host": "0:0::1"}),
            (
                {"Host": "a", "TunnelControlPort": 1},
                {"Host": "a", "TunnelControlPort": 1},
            ),
        ]:
            self.error(
                base(Servers=[{"Host": "other"}, first, second]),
                'field "Servers[2]": the gateway',
                "is already entry 1",
            )

    def test_limits(self):
        """From 1 to MAX_SERVERS entries."""
        many = [{"Host": f"gw{i}.example"} for i in range(MAX_SERVERS)]
        self.assertEqual(len(self.parse(base(Servers=many)).gateways), MAX_SERVERS)
        for value in ([], many + [{"Host": "one-more"}], {"Host": "a"}, "gw"):
            self.error(
                base(Servers=value), 'field "Servers": expected a list of 1 to 16'
            )

    def test_bad_entries(self):
        """An entry's error names the entry and its field."""
        cases = [
            (["gw"], 'field "Servers[0]": expected an object, got "gw"'),
            ([{}], 'field "Servers[0].Host": required field is missing'),
            ([{"Host": "a b"}], 'field "Servers[0].Host": expected a host name'),
            (
                [{"Host": "a", "TunnelControlPort": 0}],
                'field "Servers[0].TunnelControlPort"',
            ),
            (
                [{"Host": "a"}, {"Hots": "b"}],
                'field "Servers[1]": unknown field "Hots" (did you mean "Host"?)',
            ),
        ]
        for servers, fragment in cases:
            self.error(base(Servers=servers), fragment)


class HealthChecksTests(SynchronousTestCase):
    def parse(self, obj):
        return parse_client_config(obj, "client.json")

    def error(self, checks, *fragments: str) -> None:
        with self.assertRaises(ConfigError) as caught:
            self.parse(base(ServerHost="gw", HealthChecks=checks))
        for fragment in fragments:
            self.assertIn(fragment, str(caught.exception))

    def test_defaults(self):
        """An empty entry checks every 5 s with a 2 s timeout; none by default."""
        self.assertEqual(dict(self.parse(base(ServerHost="gw")).health_checks), {})
        config = self.parse(base(ServerHost="gw", HealthChecks={"web": {}}))
        self.assertEqual(
            dict(config.health_checks),
            {"web": HealthCheck(interval_seconds=5.0, timeout_seconds=2.0)},
        )
        with self.assertRaises(TypeError):
            config.health_checks["db"] = HealthCheck()  # type: ignore[index]

    def test_bounds(self):
        """IntervalSeconds at least 1; TimeoutSeconds above 0, at most the interval."""
        config = self.parse(
            base(
                ServerHost="gw",
                HealthChecks={
                    "web": {"IntervalSeconds": 1, "TimeoutSeconds": 1},
                    "db": {"IntervalSeconds": 60, "TimeoutSeconds": 0.25},
                },
            )
        )
        self.assertEqual(config.health_checks["web"].interval_seconds, 1.0)
        self.assertEqual(config.health_checks["db"].timeout_seconds, 0.25)
        self.error(
            {"web": {"IntervalSeconds": 0.5}},
            'field "HealthChecks.web.IntervalSeconds": 0.5 is less than 1 second',
        )
        self.error(
            {"web": {"IntervalSeconds": 2, "TimeoutSeconds": 3}},
            'field "HealthChecks.web.TimeoutSeconds": 3 is more than',
            '"IntervalSeconds" (2)',
        )
        self.error(
            {"web": {"TimeoutSeconds": 0}},
            'field "HealthChecks.web.TimeoutSeconds"',
            "greater than 0",
        )
        self.error(
            {"web": {"IntervalSeconds": "5"}},
            'field "HealthChecks.web.IntervalSeconds"',
        )

    def test_service_must_be_mapped(self):
        """A check of a service not in ServiceToLocalAddrMap names it."""
        self.error(
            {"mail": {}},
            'field "HealthChecks.mail": service "mail" is not in',
            '"ServiceToLocalAddrMap"',
        )

    def test_bad_shapes(self):
        """Not an object, an entry not an object, an unknown key, a bad name."""
        self.error([], 'field "HealthChecks": expected an object')
        self.error({"web": 5}, 'field "HealthChecks.web": expected an object, got 5')
        self.error(
            {"web": {"Interval": 5}},
            'field "HealthChecks.web": unknown field "Interval"',
            '(did you mean "IntervalSeconds"?)',
        )
        self.error({"": {}}, 'field "HealthChecks": invalid service name ""')

    def test_too_many_to_report(self):
        """Checks whose health cannot fit in one control line are refused."""
        names = [f"{i:03d}" + "s" * 125 for i in range(40)]
        services = {name: "127.0.0.1:1" for name in names}
        with self.assertRaises(ConfigError) as caught:
            self.parse(
                {
                    "ClientId": "a",
                    "UseTls": False,
                    "ServerHost": "gw",
                    "ServiceToLocalAddrMap": services,
                    "HealthChecks": dict.fromkeys(names, {}),
                }
            )
        self.assertIn(
            'field "HealthChecks": the health of 40 services cannot',
            str(caught.exception),
        )

    def test_tables(self):
        """The nested tables document every field with its default."""
        self.assertIn("| `IntervalSeconds` | seconds | `5` |", HEALTH_CHECK.markdown())
        self.assertIn(
            "| `Host` | host name or IP | required |", SERVER_ENTRY.markdown()
        )


class KeepaliveTests(SynchronousTestCase):
    def test_seconds(self):
        """Keepalive detection may be set down to a few seconds on the client."""
        config = parse_client_config(
            base(
                ServerHost="gw", KeepaliveIntervalSeconds=1, KeepaliveTimeoutSeconds=2
            ),
            "client.json",
        )
        session = session_config(config)
        self.assertEqual(
            (session.keepalive_interval, session.keepalive_timeout), (1.0, 2.0)
        )

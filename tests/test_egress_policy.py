"""EgressPolicy: parsing, errors naming the field, rule matching, special ranges."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from threshold.config import ConfigError, parse_server_config
from threshold.config.egress import (
    EGRESS_POLICY,
    SPECIAL_RANGES,
    special_range,
)
from threshold.schema.policy_kinds import parse_ip


def rules(*items: tuple[str, str]):
    """One client's compiled rules."""
    policy = EGRESS_POLICY.check(
        {"c": [{"Cidr": cidr, "Ports": ports} for cidr, ports in items]}
    )
    return policy["c"]


class PortsTests(SynchronousTestCase):
    def test_lists_and_ranges(self):
        """Ports, ranges and spaces; the text is written back normalised."""
        egress = rules(("0.0.0.0/0", " 25, 465 ,587,1000-2000 "))
        rule = egress.rules[0]
        for port in (25, 465, 587, 1000, 1500, 2000):
            self.assertIn(port, rule.ports)
        for port in (24, 26, 999, 2001, 65535):
            self.assertNotIn(port, rule.ports)
        self.assertEqual(
            rule.to_json(), {"Cidr": "0.0.0.0/0", "Ports": "25,465,587,1000-2000"}
        )

    def test_bad_ports(self):
        """Every malformed Ports value fails naming the rule's field."""
        for bad in (
            "",
            " ",
            "0",
            "65536",
            "25,",
            "a",
            "25-",
            "-25",
            "30-20",
            "1.5",
            25,
            None,
            ["25"],
        ):
            with self.assertRaises(ConfigError) as e:
                parse_server_config(
                    {
                        "UseTls": False,
                        "EgressPolicy": {
                            "home-a": [{"Cidr": "0.0.0.0/0", "Ports": bad}]
                        },
                    },
                    "server.json",
                )
            self.assertIn('"EgressPolicy.home-a[0].Ports"', str(e.exception), bad)


class ConfigErrorTests(SynchronousTestCase):
    def error(self, policy: object) -> str:
        with self.assertRaises(ConfigError) as e:
            parse_server_config(
                {"UseTls": False, "EgressPolicy": policy}, "server.json"
            )
        return str(e.exception)

    def test_errors_name_the_field(self):
        """Each mistake names the field it is in."""
        cases = [
            ([], '"EgressPolicy"'),
            ({"bad id": []}, "invalid ClientId"),
            ({"a": {}}, '"EgressPolicy.a"'),
            ({"a": [5]}, '"EgressPolicy.a[0]"'),
            ({"a": [{"Ports": "25"}]}, '"EgressPolicy.a[0].Cidr"'),
            ({"a": [{"Cidr": "10.0.0.0/8"}]}, '"EgressPolicy.a[0].Ports"'),
            ({"a": [{"Cidr": "10.0.0.1/8", "Ports": "25"}]}, "host bits set"),
            (
                {"a": [{"Cidr": "300.0.0.0/8", "Ports": "25"}]},
                '"EgressPolicy.a[0].Cidr"',
            ),
            (
                {"a": [{"Cidr": "0.0.0.0/0", "Ports": "25", "Port": 1}]},
                'unknown field "Port"',
            ),
            (
                {"a": [{"Cidr": "0.0.0.0/0", "Ports": "25"}] * 1001},
                "more than 1000 rules",
            ),
        ]
        for policy, expected in cases:
            self.assertIn(expected, self.error(policy), policy)

    def test_default_is_nothing(self):
        """Without EgressPolicy no client has an entry."""
        config = parse_server_config({"UseTls": False}, "server.json")
        self.assertEqual(dict(config.egress_policy), {})
        self.assertEqual(config.max_egress_connections_per_client, 64)
        self.assertEqual(config.egress_connect_timeout_seconds, 10)

    def test_round_trip(self):
        """The policy written back is what was given (normalised)."""
        given = {"home-a": [{"Cidr": "2001:db8::/32", "Ports": "25"}]}
        self.assertEqual(EGRESS_POLICY.to_json(EGRESS_POLICY.check(given)), given)

    def test_bare_address(self):
        """A bare address is a /32 (or /128)."""
        egress = rules(("192.0.2.7", "25"), ("2001:db8::1", "25"))
        self.assertEqual(
            [r.cidr for r in egress.rules], ["192.0.2.7/32", "2001:db8::1/128"]
        )


class MatchingTests(SynchronousTestCase):
    def test_public_destination(self):
        """0.0.0.0/0 on the mail ports reaches a public address on them only."""
        egress = rules(("0.0.0.0/0", "25,465,587"))
        self.assertIsNotNone(egress.allowing("198.41.0.4", 25))
        self.assertIsNotNone(egress.allowing("198.41.0.4", 587))
        self.assertIsNone(egress.allowing("198.41.0.4", 80))
        self.assertIsNone(egress.allowing("2001:4860::1", 25))  # no IPv6 rule

    def test_special_ranges_need_a_rule_within_them(self):
        """0.0.0.0/0 and ::/0 reach no special address; a rule within does."""
        broad = rules(("0.0.0.0/0", "1-65535"), ("::/0", "1-65535"))
        for host in (
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",  # IPv4-mapped: matched as IPv4
            "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        ):
            self.assertIsNone(broad.allowing(host, 25), host)
        self.assertIsNotNone(broad.allowing("8.8.8.8", 25))
        self.assertIsNotNone(broad.allowing("2001:4860::1", 25))

    def test_explicit_rules(self):
        """A rule within a special range reaches it (and only it)."""
        egress = rules(
            ("127.0.0.0/8", "8080"), ("10.0.0.5/32", "25"), ("::1/128", "25")
        )
        self.assertIsNotNone(egress.allowing("127.0.0.1", 8080))
        self.assertIsNotNone(egress.allowing("127.9.9.9", 8080))
        self.assertIsNotNone(egress.allowing("::ffff:127.0.0.1", 8080))
        self.assertIsNotNone(egress.allowing("10.0.0.5", 25))
        self.assertIsNone(egress.allowing("10.0.0.6", 25))
        self.assertIsNotNone(egress.allowing("::1", 25))
        self.assertIsNone(egress.allowing("127.0.0.1", 25))

    def test_rule_wider_than_the_range(self):
        """A rule holding a special range (8.0.0.0/5 holds 10/8) does not name it,
        nor does ::/96 name ::1 inside it."""
        egress = rules(("8.0.0.0/5", "25"), ("::/96", "25"))
        self.assertIsNone(egress.allowing("10.0.0.1", 25))
        self.assertIsNotNone(egress.allowing("9.0.0.1", 25))
        self.assertIsNone(egress.allowing("::1", 25))
        self.assertIsNotNone(egress.allowing("::5", 25))  # IPv4-compatible, named

    def test_names_are_never_matched(self):
        """Only IP addresses match (a name is resolved first, on the gateway)."""
        egress = rules(("0.0.0.0/0", "25"))
        self.assertIsNone(egress.allowing("smtp.example.net", 25))

    def test_every_special_range_is_found(self):
        """special_range finds each listed range for its first address."""
        import ipaddress

        for text in SPECIAL_RANGES:
            net = ipaddress.ip_network(text)
            found = special_range(parse_ip(str(net.network_address)))
            self.assertIsNotNone(found, text)
            self.assertTrue(ipaddress.ip_network(found).subnet_of(net) or found == text)

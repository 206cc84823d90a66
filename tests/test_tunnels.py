"""Tests for threshold.server.tunnels: parsing and validating tunnel entries."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.tunnels import (
    TUNNEL,
    Balance,
    Tunnel,
    TunnelError,
    parse_tunnels,
)
from threshold.wire.handshake import (
    HandshakeError,
    encode_hello,
    encode_stream_header,
)


def entry(**fields: Any) -> dict[str, Any]:
    """A valid PUT entry, with fields overridden (None removes one)."""
    base: dict[str, Any] = {
        "ClientId": "TestClient1",
        "ListenAddress": "127.0.0.1",
        "ListenPort": 9000,
        "ListenHostnameGlob": "*",
        "BackEndService": "fooService",
        "HaProxyProxyProtocol": True,
    }
    base.update(fields)
    return {k: v for k, v in base.items() if v is not None}


def tunnel(**fields: Any) -> Tunnel:
    """A Tunnel built directly, with fields overridden."""
    base: dict[str, Any] = dict(
        client_ids=("TestClient1",),
        listen_address="127.0.0.1",
        listen_port=9000,
        hostname_glob="*",
        backend_service="fooService",
        proxy_protocol=False,
    )
    base.update(fields)
    return Tunnel(**base)


class ParseTunnelsTests(SynchronousTestCase):
    """parse_tunnels validates the PUT body field by field."""

    def assertRefused(
        self, body: object, status: int, index: int | None, field: str | None
    ) -> TunnelError:
        with self.assertRaises(TunnelError) as cm:
            parse_tunnels(body)
        error = cm.exception
        self.assertEqual(
            (error.status, error.index, error.field),
            (status, index, field),
            error.message,
        )
        self.assertEqual(
            error.to_json(), {"error": error.message, "index": index, "field": field}
        )
        if field is not None:
            self.assertIn(field, error.message)
        return error

    def test_full_entry(self):
        """A complete entry becomes a Tunnel with every field carried over."""
        [t] = parse_tunnels([entry(HaProxyProxyProtocolVersion=2)])
        self.assertEqual(
            t,
            Tunnel(
                client_ids=("TestClient1",),
                listen_address="127.0.0.1",
                listen_port=9000,
                hostname_glob="*",
                backend_service="fooService",
                proxy_protocol=True,
                proxy_protocol_version=2,
            ),
        )
        self.assertEqual(t.group, ("127.0.0.1", 9000))

    def test_to_json_round_trip(self):
        """to_json uses the original field names and parses back to the same."""
        [t] = parse_tunnels([entry(ListenHostnameGlob="*.Example.COM.")])
        js = t.to_json()
        mine = {k: v for k, v in js.items() if k in {f.json for f in TUNNEL.fields[:9]}}
        self.assertEqual(
            mine,
            {
                "ClientIds": ["TestClient1"],
                "ClientId": "TestClient1",
                "ListenAddress": "127.0.0.1",
                "ListenPort": 9000,
                "ListenHostnameGlob": "*.example.com",
                "BackEndService": "fooService",
                "HaProxyProxyProtocol": True,
                "HaProxyProxyProtocolVersion": 1,
                "Balance": "failover",
            },
        )
        self.assertEqual(parse_tunnels([js]), [t])

    def test_defaults(self):
        """Missing optional fields get 0.0.0.0, '*', no PROXY header, version 1."""
        [t] = parse_tunnels(
            [{"ClientId": "c", "ListenPort": 80, "BackEndService": "web"}]
        )
        self.assertEqual(t.listen_address, "0.0.0.0")
        self.assertEqual(t.hostname_glob, "*")
        self.assertFalse(t.proxy_protocol)
        self.assertEqual(t.proxy_protocol_version, 1)

    def test_empty_list(self):
        """An empty list is valid: it removes every tunnel."""
        self.assertEqual(parse_tunnels([]), [])

    def test_not_a_list(self):
        """A body that is not a list is 422 without an index."""
        for body in ({"ClientId": "x"}, "tunnels", 3, None, True):
            self.assertRefused(body, 422, None, None)

    def test_entry_not_object(self):
        """An entry that is not an object is 422 with its index."""
        self.assertRefused([entry(), [1, 2]], 422, 1, None)
        self.assertRefused(["x"], 422, 0, None)

    def test_unknown_field(self):
        """An unknown field is 400 naming it."""
        error = self.assertRefused([entry(), entry(Colour="blue")], 400, 1, "Colour")
        self.assertIn("unknown field", error.message)

    def test_client_identifier_alias(self):
        """ClientIdentifier is another name for ClientId."""
        [t] = parse_tunnels([entry(ClientId=None, ClientIdentifier="TestClient2")])
        self.assertEqual(t.client_id, "TestClient2")

    def test_client_id_and_identifier_agree(self):
        """Both names with the same value are accepted."""
        [t] = parse_tunnels([entry(ClientIdentifier="TestClient1")])
        self.assertEqual(t.client_id, "TestClient1")

    def test_client_id_and_identifier_differ(self):
        """Both names with different values are 400."""
        self.assertRefused(
            [entry(ClientIdentifier="TestClient2")], 400, 0, "ClientIdentifier"
        )

    def test_client_id_invalid(self):
        """No client at all, or a ClientId empty or not a string, is 400."""
        error = self.assertRefused([entry(ClientId=None)], 400, 0, "ClientIds")
        self.assertIn('"ClientId"', error.message)
        self.assertRefused([entry(ClientId="")], 400, 0, "ClientId")
        self.assertRefused([entry(ClientId=7)], 400, 0, "ClientId")
        self.assertRefused(
            [entry(ClientId=None, ClientIdentifier=[])], 400, 0, "ClientIdentifier"
        )

    def test_listen_address_normalised(self):
        """ListenAddress is kept in ipaddress's normal form."""
        [t] = parse_tunnels([entry(ListenAddress="0:0::0:1")])
        self.assertEqual(t.listen_address, "::1")

    def test_listen_address_invalid(self):
        """ListenAddress that is not an IP address is 400."""
        for value in ("localhost", "1.2.3", "300.1.1.1", "", 12, None):
            body = [entry(ListenAddress=value)]
            if value is None:
                body[0]["ListenAddress"] = None
            self.assertRefused(body, 400, 0, "ListenAddress")

    def test_listen_port_invalid(self):
        """ListenPort missing, out of range, a bool or not an integer is 400."""
        self.assertRefused([entry(ListenPort=None)], 400, 0, "ListenPort")
        for value in (0, 65536, -1, True, 80.0, "80"):
            self.assertRefused([entry(ListenPort=value)], 400, 0, "ListenPort")

    def test_listen_port_bounds(self):
        """Ports 1 and 65535 are valid."""
        self.assertEqual(parse_tunnels([entry(ListenPort=1)])[0].listen_port, 1)
        self.assertEqual(parse_tunnels([entry(ListenPort=65535)])[0].listen_port, 65535)

    def test_glob_normalised(self):
        """Globs are lowercased, lose a trailing dot, and '' means '*'."""
        cases = {
            "": "*",
            "*": "*",
            "*.": "*",
            "WWW.Example.com.": "www.example.com",
            "*.EXAMPLE.com": "*.example.com",
            "xn--bcher-kva.example": "xn--bcher-kva.example",
        }
        for given_glob, expected in cases.items():
            [t] = parse_tunnels([entry(ListenHostnameGlob=given_glob)])
            self.assertEqual(t.hostname_glob, expected)

    def test_glob_invalid(self):
        """A star not as the whole leftmost label, a bad label or too long is 400."""
        bad = [
            "a.*.example.com",
            "*example.com",
            "w*.example.com",
            "*.*.example.com",
            "example.*",
            "a..example.com",
            "-a.example.com",
            "a-.example.com",
            "a_b.example.com",
            "b\u00fccher.example",
            "a" * 64 + ".example.com",
            ".".join(["abcdefghi"] * 26),  # 259 characters
            12,
            None,
        ]
        for value in bad:
            body = [entry()]
            body[0]["ListenHostnameGlob"] = value
            self.assertRefused(body, 400, 0, "ListenHostnameGlob")

    def test_glob_max_length(self):
        """A 253-character name is valid."""
        name = ".".join(["a" * 63] * 3 + ["b" * 61])
        self.assertEqual(len(name), 253)
        [t] = parse_tunnels([entry(ListenHostnameGlob=name)])
        self.assertEqual(t.hostname_glob, name)

    def test_backend_service_invalid(self):
        """BackEndService missing, empty, too long or not a string is 400."""
        self.assertRefused([entry(BackEndService=None)], 400, 0, "BackEndService")
        for value in ("", "s" * 129, 5, ["x"]):
            self.assertRefused([entry(BackEndService=value)], 400, 0, "BackEndService")
        [t] = parse_tunnels([entry(BackEndService="s" * 128)])
        self.assertEqual(t.backend_service, "s" * 128)

    def test_backend_service_control_characters(self):
        """A control, format or line-separator character is 400 (issue 11, item 5).

        The stream header would refuse such a name after the stream is open.
        """
        for value in ("web\u0007x", "web\n", "\tweb", "w\u2028b", "w\u200bb", "\x7f"):
            error = self.assertRefused(
                [entry(), entry(ListenPort=9001, BackEndService=value)],
                400,
                1,
                "BackEndService",
            )
            self.assertIn("printable", error.message)
        [t] = parse_tunnels([entry(BackEndService="web service \u00e9")])
        self.assertEqual(t.backend_service, "web service \u00e9")

    def test_client_id_rule(self):
        """ClientId follows the hello's rule: no "@", spaces or other characters."""
        for value in ("a@b", "a b", "x" * 129, "caf\u00e9", "a\n"):
            error = self.assertRefused([entry(ClientId=value)], 400, 0, "ClientId")
            self.assertIn('"@" is not allowed', error.message)

    @given(st.text(max_size=140))
    def test_service_rule_is_the_stream_header_rule(self, name):
        """A service name is accepted here exactly when a stream header takes it."""
        try:
            encode_stream_header(name)
        except HandshakeError:
            with self.assertRaises(TunnelError):
                parse_tunnels([entry(BackEndService=name)])
        else:
            [t] = parse_tunnels([entry(BackEndService=name)])
            self.assertEqual(t.backend_service, name)

    @given(st.text(max_size=140))
    def test_client_id_rule_is_the_hello_rule(self, name):
        """A ClientId is accepted here exactly when a hello takes it."""
        try:
            encode_hello(name)
        except HandshakeError:
            with self.assertRaises(TunnelError):
                parse_tunnels([entry(ClientId=name)])
        else:
            self.assertEqual(parse_tunnels([entry(ClientId=name)])[0].client_id, name)

    def test_to_json_is_the_table(self):
        """to_json writes every field of the table, in its order (ClientId
        only for a tunnel of one client)."""
        [one] = parse_tunnels([entry()])
        fields = [f.json for f in TUNNEL.fields if f.json is not None]
        self.assertEqual(list(one.to_json()), fields)
        [two] = parse_tunnels([entry(ClientId=None, ClientIds=["a", "b"])])
        self.assertEqual(list(two.to_json()), [f for f in fields if f != "ClientId"])

    def test_proxy_protocol_invalid(self):
        """HaProxyProxyProtocol must be a boolean."""
        for value in ("true", 1, 0, None):
            body = [entry()]
            body[0]["HaProxyProxyProtocol"] = value
            self.assertRefused(body, 400, 0, "HaProxyProxyProtocol")

    def test_proxy_protocol_version_invalid(self):
        """HaProxyProxyProtocolVersion must be the integer 1 or 2."""
        for value in (0, 3, True, 1.0, "2", None):
            body = [entry()]
            body[0]["HaProxyProxyProtocolVersion"] = value
            self.assertRefused(body, 400, 0, "HaProxyProxyProtocolVersion")

    def test_error_names_later_index(self):
        """The index of the first invalid entry is reported."""
        body = [entry(ListenPort=9001), entry(ListenPort=9002), entry(ListenPort=0)]
        self.assertRefused(body, 400, 2, "ListenPort")

    def test_duplicate_route(self):
        """Two entries with the same group and glob are 400 naming both."""
        body = [
            entry(ListenHostnameGlob="a.example.com"),
            entry(ListenPort=9001),
            entry(ListenHostnameGlob="A.example.com.", ClientId="TestClient2"),
        ]
        error = self.assertRefused(body, 400, 2, "ListenHostnameGlob")
        self.assertIn("entries 0 and 2", error.message)
        self.assertIn("127.0.0.1:9000", error.message)

    def test_duplicate_default_glob(self):
        """An empty glob and '*' in one group are duplicates."""
        body = [entry(ListenHostnameGlob=""), entry(ListenHostnameGlob=None)]
        self.assertRefused(body, 400, 1, "ListenHostnameGlob")

    def test_same_glob_other_group(self):
        """The same glob on two groups is fine."""
        body = [entry(), entry(ListenPort=9001), entry(ListenAddress="::1")]
        self.assertEqual(len(parse_tunnels(body)), 3)

    def test_star_fallback_in_sni_group(self):
        """A group may hold named globs and one '*' fallback."""
        body = [
            entry(ListenHostnameGlob="a.example.com"),
            entry(ListenHostnameGlob="*.example.com"),
            entry(ListenHostnameGlob="*"),
        ]
        self.assertEqual(
            [t.hostname_glob for t in parse_tunnels(body)],
            ["a.example.com", "*.example.com", "*"],
        )

    def test_tunnel_constructor_validates(self):
        """Building a Tunnel directly validates too, naming the field."""
        with self.assertRaises(TunnelError) as cm:
            tunnel(listen_port=0)
        self.assertEqual((cm.exception.status, cm.exception.field), (400, "ListenPort"))
        self.assertIsNone(cm.exception.index)


class SeveralClientsTests(SynchronousTestCase):
    """ClientIds, the single ClientId of older automation, and Balance."""

    def refused(self, body: object) -> TunnelError:
        with self.assertRaises(TunnelError) as cm:
            parse_tunnels(body)
        self.assertEqual(cm.exception.status, 400)
        return cm.exception

    def test_client_ids(self):
        """ClientIds lists the clients in order; client_id is the first."""
        [t] = parse_tunnels([entry(ClientId=None, ClientIds=["home-a", "home-b"])])
        self.assertEqual(t.client_ids, ("home-a", "home-b"))
        self.assertEqual(t.client_id, "home-a")
        self.assertIs(t.balance, Balance.FAILOVER)

    def test_single_client_id_is_a_list_of_one(self):
        """ClientId (or ClientIdentifier) alone means ClientIds of one."""
        [a] = parse_tunnels([entry(ClientId="home-a")])
        [b] = parse_tunnels([entry(ClientId=None, ClientIdentifier="home-a")])
        [c] = parse_tunnels([entry(ClientId=None, ClientIds=["home-a"])])
        self.assertEqual(a, b)
        self.assertEqual(a, c)
        self.assertEqual(a.client_ids, ("home-a",))

    def test_both_agreeing(self):
        """ClientId with ClientIds of that one client is accepted (re-PUT)."""
        [t] = parse_tunnels([entry(ClientId="home-a", ClientIds=["home-a"])])
        self.assertEqual(t.client_ids, ("home-a",))

    def test_both_differing(self):
        """ClientId and a different ClientIds: 400 naming both fields."""
        for listed in (["home-b"], ["home-a", "home-b"]):
            error = self.refused([entry(ClientId="home-a", ClientIds=listed)])
            self.assertEqual((error.index, error.field), (0, "ClientId"))
            self.assertIn('"ClientIds"', error.message)
            self.assertIn('"ClientId"', error.message)
        error = self.refused(
            [entry(ClientId=None, ClientIdentifier="x", ClientIds=["y"])]
        )
        self.assertEqual(error.field, "ClientIdentifier")

    def test_client_ids_bounds(self):
        """1 to 16 clients: an empty list or 17 are 400."""
        sixteen = [f"c{i}" for i in range(16)]
        [t] = parse_tunnels([entry(ClientId=None, ClientIds=sixteen)])
        self.assertEqual(len(t.client_ids), 16)
        for bad in ([], [*sixteen, "c16"], "home-a", None, {"a": 1}):
            body = [entry(ClientId=None)]
            body[0]["ClientIds"] = bad
            error = self.refused(body)
            self.assertEqual(error.field, "ClientIds", error.message)

    def test_client_ids_unique(self):
        """A client listed twice is 400 naming the repeat."""
        error = self.refused([entry(ClientId=None, ClientIds=["a", "b", "a"])])
        self.assertEqual(error.field, "ClientIds[2]")
        self.assertIn("listed twice", error.message)

    def test_client_ids_rule(self):
        """Each ClientId follows the hello's rule, its place named."""
        error = self.refused([entry(ClientId=None, ClientIds=["a", "b@c"])])
        self.assertEqual(error.field, "ClientIds[1]")
        self.assertIn('"@" is not allowed', error.message)

    def test_balance(self):
        """Balance is one of the three modes, by name; anything else is 400."""
        for mode in Balance:
            [t] = parse_tunnels([entry(Balance=mode.value)])
            self.assertIs(t.balance, mode)
            self.assertEqual(t.to_json()["Balance"], mode.value)
        for bad in ("Failover", "random", 1, None, True):
            body = [entry()]
            body[0]["Balance"] = bad
            self.assertEqual(self.refused(body).field, "Balance")

    def test_several_clients_round_trip(self):
        """to_json of several clients has no ClientId and parses back the same."""
        [t] = parse_tunnels(
            [entry(ClientId=None, ClientIds=["b", "a"], Balance="least-connections")]
        )
        js = t.to_json()
        self.assertNotIn("ClientId", js)
        self.assertEqual(js["ClientIds"], ["b", "a"])
        self.assertEqual(parse_tunnels([js]), [t])

    def test_constructor(self):
        """A Tunnel built from Python takes a list and keeps a tuple."""
        t = tunnel(client_ids=["a", "b"], balance=Balance.ROUND_ROBIN)
        self.assertEqual(t.client_ids, ("a", "b"))
        with self.assertRaises(TunnelError) as cm:
            tunnel(client_ids=None)
        self.assertEqual(cm.exception.field, "ClientIds")

    def test_duplicates_across_entries(self):
        """Two entries of one group and glob are duplicates whatever clients."""
        body = [
            entry(ClientId=None, ClientIds=["a", "b"]),
            entry(ClientId=None, ClientIds=["c"]),
        ]
        self.assertEqual(self.refused(body).field, "ListenHostnameGlob")

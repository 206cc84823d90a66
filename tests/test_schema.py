"""Tests for threshold.schema: the field tables and the validators per kind."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.config import CLIENT, SERVER, ConfigError, parse_client_config
from threshold.mux.settings import SESSION, SessionConfig
from threshold.schema import (
    BOOLEAN,
    CLIENT_ID,
    DOMAIN,
    HOST,
    HOST_GLOB,
    IP_ADDRESS,
    PORT,
    SERVICE_MAP,
    SERVICE_NAME,
    STRING_LIST,
    Bytes,
    Choice,
    FilePath,
    Integer,
    Schema,
    SchemaError,
    Seconds,
    UnknownField,
    Wrong,
    field,
    format_address,
    is_dns_name,
    like,
    show,
)
from threshold.server.tunnels import TUNNEL
from threshold.wire.handshake import HandshakeError, parse_hello


@dataclass(frozen=True, kw_only=True)
class Sample:
    """A small object to exercise the machinery."""

    name: str = field("Name", CLIENT_ID, aliases=("Label",), doc="The name.")
    port: int = field("Port", PORT, 80, doc="A port.")
    note: str | None = field("Note", DOMAIN, None, nullable=True, doc="A domain.")
    fixed: int = field(None, Integer(0), 3, doc="Not in JSON.")
    extra: str = "not a field"


SAMPLE = Schema(Sample)


@dataclass(frozen=True, kw_only=True)
class Checked:
    """Validated by its constructor, like Tunnel and SessionConfig."""

    port: int = field("Port", PORT, doc="A port.")
    glob: str = field("Glob", HOST_GLOB, "*", aliases=("Pattern",), doc="A glob.")

    def __post_init__(self) -> None:
        CHECKED.validate(self)


CHECKED = Schema(Checked, checked_by_init=True)


class SchemaTests(SynchronousTestCase):
    def refused(self, obj: dict, field: str | None, *fragments: str) -> SchemaError:
        with self.assertRaises(SchemaError) as cm:
            SAMPLE.parse(obj)
        self.assertEqual(cm.exception.field, field)
        for fragment in fragments:
            self.assertIn(fragment, str(cm.exception))
        self.assertNotIn("\n", str(cm.exception))
        return cm.exception

    def test_parse_defaults(self):
        """Absent fields get their defaults; non-JSON fields keep theirs."""
        self.assertEqual(SAMPLE.parse({"Name": "a"}), Sample(name="a"))
        self.assertEqual(SAMPLE.parse({"Name": "a"}).fixed, 3)

    def test_parse_every_field(self):
        """Each JSON name reaches its attribute; extra attributes pass through."""
        obj = {"Name": "a", "Port": 1, "Note": "example.org"}
        parsed = SAMPLE.parse(obj, extra="x")
        self.assertEqual(
            parsed, Sample(name="a", port=1, note="example.org", extra="x")
        )
        self.assertEqual(SAMPLE.to_json(parsed), obj)

    def test_names(self):
        """Every accepted JSON name, aliases included, in table order."""
        self.assertEqual(SAMPLE.names, ("Name", "Label", "Port", "Note"))

    def test_unknown_field(self):
        """An unknown key is named, with the closest known name suggested."""
        error = self.refused({"Name": "a", "Prot": 1}, "Prot")
        self.assertIsInstance(error, UnknownField)
        self.assertEqual(str(error), 'unknown field "Prot" (did you mean "Port"?)')
        self.assertEqual(
            str(error.at(2)), 'entry 2: unknown field "Prot" (did you mean "Port"?)'
        )
        error = self.refused({"Name": "a", 7: 1}, "7")
        self.assertEqual(str(error), "unknown field 7")

    def test_wrong_type(self):
        """A wrong value names the field, what was expected and the value."""
        error = self.refused({"Name": "a", "Port": "80"}, "Port")
        self.assertEqual(
            str(error), 'field "Port": expected an integer from 1 to 65535, got "80"'
        )
        self.assertIsInstance(error, Wrong)
        self.assertEqual(
            (error.expected, error.value), ("an integer from 1 to 65535", "80")
        )
        self.refused({"Name": "a", "Port": 0}, "Port", "got 0")
        self.refused({"Name": "a", "Port": True}, "Port", "got true")

    def test_value_shown_briefly(self):
        """A long hostile value is cut, control characters escaped."""
        error = self.refused({"Name": "x\n" * 1000}, "Name")
        self.assertLess(len(str(error)), 200)
        self.assertIn("\\n", str(error))

    def test_missing(self):
        """A required field that is absent is named."""
        self.refused({"Port": 1}, "Name", "required field is missing")

    def test_nullable(self):
        """null means absent where the field is nullable, and is wrong elsewhere."""
        self.assertIsNone(SAMPLE.parse({"Name": "a", "Note": None}).note)
        self.refused({"Name": "a", "Port": None}, "Port", "got null")
        self.refused({"Name": "a", "Note": 5}, "Note", "string or null, got 5")
        self.refused({"Name": "a", "Note": "a b"}, "Note", "domain name (", "or null")

    def test_alias(self):
        """An alias fills the attribute; both with different values are refused."""
        self.assertEqual(SAMPLE.parse({"Label": "b"}).name, "b")
        self.assertEqual(SAMPLE.parse({"Name": "b", "Label": "b"}).name, "b")
        self.refused({"Name": "a", "Label": "b"}, "Label", 'differs from "Name"')
        self.refused({"Label": "a@b"}, "Label", '"@" is not allowed')

    def test_checked_by_init(self):
        """Constructor-checked objects: parse and direct construction agree."""
        self.assertEqual(
            CHECKED.parse({"Port": 1, "Glob": "A.B."}), Checked(port=1, glob="a.b")
        )
        with self.assertRaises(SchemaError) as cm:
            Checked(port=0)
        self.assertEqual(cm.exception.field, "Port")
        with self.assertRaises(SchemaError) as cm:
            CHECKED.parse({"Port": 1, "Pattern": "a.*"})
        self.assertEqual(cm.exception.field, "Pattern", "named as given")

    def test_checked_once(self):
        """A constructor-checked object's parse runs each kind once, not twice."""
        calls = []

        class Counting(Integer):
            def check(self, value, base_dir=None):
                calls.append(value)
                return super().check(value, base_dir)

        @dataclass(frozen=True)
        class Once:
            n: int = field("N", Counting(0), doc="n")

            def __post_init__(self) -> None:
                ONCE.validate(self)

        ONCE = Schema(Once, checked_by_init=True)
        ONCE.parse({"N": 5})
        self.assertEqual(calls, [5])

    def test_like(self):
        """A field taken from another table keeps name, default and doc."""

        @dataclass(frozen=True)
        class Taker:
            window: int = like(SESSION["max_window"])
            quiet: float = like(SESSION["keepalive_interval"], kind=Seconds())

        table = Schema(Taker)
        self.assertEqual(table["window"].json, "MaxReceiveWindowBytes")
        self.assertEqual(Taker().window, SessionConfig().max_window)
        self.assertEqual(table["window"].doc, SESSION["max_window"].doc)
        with self.assertRaises(SchemaError):
            table.parse({"KeepaliveIntervalSeconds": 0})

    def test_markdown(self):
        """One row per JSON name (fixed settings by attribute), in order."""
        rows = SAMPLE.markdown().splitlines()
        self.assertEqual(rows[0], "| Field | Type | Default | Meaning |")
        self.assertEqual(
            rows[2:],
            [
                "| `Name` | client id | required | The name. |",
                "| `Label` | client id | | Another name for `Name`. Giving both with"
                " different values is an error. |",
                "| `Port` | integer 1–65535 | `80` | A port. |",
                "| `Note` | domain name, or null | `null` | A domain. |",
                "| `fixed` (fixed) | integer ≥ 0 | `3` | Not in JSON. |",
            ],
        )

    def test_error_forms(self):
        """SchemaError's one line: field and entry as data and in the text."""
        error = SchemaError("bad", "Service")
        self.assertEqual(str(error), 'field "Service": bad')
        self.assertEqual(str(error.at(3)), 'entry 3: field "Service": bad')
        self.assertEqual(str(error.within("Map.")), 'field "Map.Service": bad')
        self.assertEqual(str(SchemaError("whole")), "whole")


class ShowTests(SynchronousTestCase):
    def test_show(self):
        """JSON on one line, cut, never raising."""
        self.assertEqual(show("a\nb"), '"a\\nb"')
        self.assertEqual(show(None), "null")
        self.assertEqual(len(show("x" * 500)), 60)
        self.assertEqual(show(10**5000), "an integer of 16610 bits")
        self.assertEqual(show(object()), "object")
        deep: list = []
        for _ in range(100_000):
            deep = [deep]
        self.assertEqual(show(deep), "list")


class KindTests(SynchronousTestCase):
    """Each kind accepts and refuses what its rule says."""

    def assertKind(self, kind, good: dict, bad: list) -> None:
        for value, expected in good.items():
            self.assertEqual(kind.check(value), expected, value)
            self.assertEqual(kind.check(kind.check(value)), expected, "idempotent")
        for value in bad:
            with self.assertRaises(SchemaError, msg=show(value)):
                kind.check(value)

    def test_boolean(self):
        self.assertKind(BOOLEAN, {True: True, False: False}, [0, 1, "true", None])

    def test_integers(self):
        self.assertKind(
            PORT, {1: 1, 65535: 65535}, [0, 65536, True, 1.0, "1", 10**5000]
        )
        self.assertKind(Bytes(1024), {1024: 1024, 10**30: 10**30}, [1023, -1])
        self.assertKind(Choice(1, 2), {1: 1, 2: 2}, [0, 3, True, 1.0])
        self.assertEqual(Choice(1, 2).expected, "1 or 2")

    def test_seconds(self):
        self.assertKind(
            Seconds(),
            {1: 1.0, 0.5: 0.5, 31536000: 31536000.0},
            [0, -1, 31536001, 10**400, float("nan"), float("inf"), True, "1"],
        )
        self.assertKind(Seconds(zero_ok=True), {0: 0.0}, [-0.1])

    def test_client_id(self):
        self.assertKind(
            CLIENT_ID,
            {"a": "a", "A.b_c-9": "A.b_c-9", "x" * 128: "x" * 128},
            ["", "a@b", "a b", "x" * 129, "caf\u00e9", "a\n", 5, None],
        )

    def test_service_name(self):
        self.assertKind(
            SERVICE_NAME,
            {
                "web": "web",
                "my web": "my web",
                "\u00e9": "\u00e9",
                "s" * 128: "s" * 128,
            },
            [
                "",
                "s" * 129,
                "a\x07",
                "a\n",
                "\t",
                "\x7f",
                "a\u200bb",
                "a\u2028",
                "\ud800",
                5,
            ],
        )

    def test_host_glob(self):
        self.assertKind(
            HOST_GLOB,
            {"": "*", "*.": "*", "A.Example.COM.": "a.example.com", "*.b.c": "*.b.c"},
            [
                "a.*.b",
                "*b.c",
                "*.*.b",
                "a..b",
                "-a.b",
                "a_b.c",
                "b\u00fccher.de",
                "a" * 64,
                5,
            ],
        )

    def test_dns_names(self):
        """One label rule: LDH, 1 to 63, at most 253; "_" only for resolver names."""
        self.assertTrue(is_dns_name(".".join(["a" * 63] * 3 + ["b" * 61])))
        self.assertFalse(is_dns_name(".".join(["a" * 63] * 4)))
        self.assertFalse(is_dns_name("my_host"))
        self.assertTrue(is_dns_name("my_host", resolver=True))
        self.assertFalse(is_dns_name("-a", resolver=True))

    def test_addresses(self):
        self.assertKind(
            IP_ADDRESS, {"0:0::1": "::1", "10.0.0.1": "10.0.0.1"}, ["localhost", "", 1]
        )
        self.assertKind(
            HOST, {"my_box": "my_box", "::1": "::1", "a.b.": "a.b."}, ["a b", "", "-x"]
        )
        self.assertEqual(format_address("::1", 80), "[::1]:80")
        self.assertEqual(format_address("10.0.0.1", 80), "10.0.0.1:80")

    def test_string_list(self):
        self.assertKind(STRING_LIST, {("a",): ("a",)}, ["a", [""], [1]])
        with self.assertRaises(SchemaError) as cm:
            STRING_LIST.check(["ok", ""])
        self.assertEqual(cm.exception.field, "[1]")

    def test_service_map(self):
        value = SERVICE_MAP.check({"web": "[::1]:80"})
        self.assertEqual(dict(value), {"web": ("::1", 80)})
        self.assertEqual(SERVICE_MAP.to_json(value), {"web": "[::1]:80"})
        with self.assertRaises(SchemaError) as cm:
            SERVICE_MAP.check({"web": "nope"})
        self.assertEqual(cm.exception.field, ".web")
        with self.assertRaises(SchemaError) as cm:
            SERVICE_MAP.check({"w\neb": "a:1"})
        self.assertIn("printable", cm.exception.message)

    def test_file_path(self):
        base = os.path.abspath(self.mktemp())
        os.mkdir(base)
        self.assertEqual(FilePath().check("a/b", base), os.path.join(base, "a", "b"))
        self.assertEqual(FilePath().check("/x/y", base), "/x/y")
        with self.assertRaises(SchemaError):
            FilePath().check("a\x00b", base)
        with self.assertRaises(SchemaError) as cm:
            FilePath(folder_must_exist=True).check("missing/sock", base)
        self.assertIn("does not exist", cm.exception.message)


class OneRuleTests(SynchronousTestCase):
    """Every parser of a kind of value uses the same validator."""

    def test_tables_use_the_shared_kinds(self):
        """ClientId and the service name are the shared kind in every table."""
        client_id = next(f for f in TUNNEL.fields if f.json == "ClientId")
        self.assertIs(client_id.kind, CLIENT_ID)
        self.assertIs(CLIENT["client_id"].kind, CLIENT_ID)
        self.assertIs(TUNNEL["backend_service"].kind, SERVICE_NAME)
        self.assertIs(TUNNEL["hostname_glob"].kind, HOST_GLOB)
        self.assertIs(SERVER["listen_address"].kind, IP_ADDRESS)

    def test_defaults_once(self):
        """The configs' session fields are the session's (name, default, doc)."""
        for config in (SERVER, CLIENT):
            for attr, session_attr in (
                ("keepalive_interval_seconds", "keepalive_interval"),
                ("keepalive_timeout_seconds", "keepalive_timeout"),
                ("max_streams_per_session", "max_streams"),
                ("max_receive_window_bytes", "max_window"),
            ):
                mine, theirs = config[attr], SESSION[session_attr]
                self.assertEqual(
                    (mine.json, mine.default, mine.doc),
                    (theirs.json, theirs.default, theirs.doc),
                )
        self.assertEqual(
            CLIENT["server_tunnel_control_port"].default,
            SERVER["tunnel_control_port"].default,
        )

    @given(st.text(max_size=140))
    def test_client_id_config_and_hello_agree(self, name):
        """A ClientId a config file takes is one a hello takes, and back."""
        obj = {
            "ClientId": name,
            "ServerHost": "h",
            "UseTls": False,
            "ServiceToLocalAddrMap": {},
        }
        try:
            parse_hello(b'{"version": 1, "clientId": %s}' % show(name, 10_000).encode())
        except HandshakeError:
            with self.assertRaises(ConfigError):
                parse_client_config(obj, "c.json")
        else:
            self.assertEqual(parse_client_config(obj, "c.json").client_id, name)

    def test_session_config_checked(self):
        """SessionConfig refuses out-of-range settings, naming them."""
        with self.assertRaises(SchemaError) as cm:
            SessionConfig(max_window=1)
        self.assertEqual(cm.exception.field, "MaxReceiveWindowBytes")
        with self.assertRaises(ValueError):
            SessionConfig(max_frame_send=0)
        self.assertEqual(
            dataclasses.replace(SessionConfig(), max_streams=2).max_streams, 2
        )

"""Tests for threshold.wire.control: the health line and the control parser."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.wire.control import (
    MAX_DETAIL,
    ControlError,
    Health,
    Unknown,
    clean_detail,
    encode_health,
    health_line_fits,
    parse_control_line,
)
from threshold.wire.handshake import (
    MAX_LINE,
    HandshakeError,
    HelloReply,
    encode_hello_reply,
    parse_hello_reply,
)

service_names = st.text(
    alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Cf", "Co")),
    min_size=1,
    max_size=128,
).filter(str.isprintable)


class EncodeHealthTests(SynchronousTestCase):
    def test_exact_line(self):
        """The line is compact JSON, health then detail, ending in one newline."""
        self.assertEqual(
            encode_health(
                {"web": True, "db": False},
                {"db": "connection refused at 127.0.0.1:5432"},
            ),
            b'{"health":{"web":true,"db":false},'
            b'"detail":{"db":"connection refused at 127.0.0.1:5432"}}\n',
        )

    def test_no_detail(self):
        """Without detail (or only for healthy services) there is no detail key."""
        self.assertEqual(encode_health({"web": True}), b'{"health":{"web":true}}\n')
        self.assertEqual(
            encode_health({"web": True}, {"web": "was down", "gone": "x"}),
            b'{"health":{"web":true}}\n',
        )

    def test_nothing_checked(self):
        """An empty state says "no service is checked now" (all checks removed)."""
        self.assertEqual(encode_health({}), b'{"health":{}}\n')

    def test_detail_cleaned(self):
        """A detail text loses line breaks and control characters and is cut."""
        line = encode_health({"db": False}, {"db": "a\nb\x00c\u2028" + "x" * 500})
        detail = json.loads(line)["detail"]["db"]
        self.assertEqual(len(detail), MAX_DETAIL)
        self.assertTrue(detail.startswith("a?b?c?xxx"))
        self.assertTrue(detail.endswith("..."))

    def test_bad_names_and_states(self):
        """A service name the validator refuses, or a state not a bool, is refused."""
        for states, words in [
            ({"": True}, "invalid service name"),
            ({"a\nb": True}, "invalid service name"),
            ({"x" * 129: True}, "invalid service name"),
            ({"web": 1}, "health.web: expected true or false, got 1"),
            ({"web": None}, "health.web: expected true or false, got null"),
        ]:
            with self.assertRaises(ControlError) as caught:
                encode_health(states)
            self.assertIn(words, str(caught.exception))
        with self.assertRaises(ControlError):
            encode_health({"db": False}, {"db": 3})  # type: ignore[dict-item]

    def test_long_details_shortened_then_dropped(self):
        """Details that would overflow the line are shortened, then left out."""
        many = {f"service-{i:02d}": False for i in range(40)}
        detail = {name: "y" * 300 for name in many}
        line = encode_health(many, detail)
        self.assertLessEqual(len(line) - 1, MAX_LINE)
        self.assertEqual(json.loads(line)["health"], many)
        texts = json.loads(line)["detail"]
        self.assertEqual(set(texts), set(many))
        self.assertTrue(all(len(t) == 40 for t in texts.values()))
        more = {f"service-{i:03d}": False for i in range(150)}
        line = encode_health(more, dict.fromkeys(more, "z" * 200))
        self.assertNotIn("detail", json.loads(line))
        self.assertEqual(json.loads(line)["health"], more)

    def test_states_too_long(self):
        """States that cannot fit in one line are a ControlError, named as such."""
        names = [f"{i:03d}" + "s" * 124 for i in range(40)]
        self.assertFalse(health_line_fits(names))
        self.assertTrue(health_line_fits(names[:20]))
        with self.assertRaises(ControlError) as caught:
            encode_health(dict.fromkeys(names, True))
        self.assertIn("longer than 4096", str(caught.exception))


class ParseControlLineTests(SynchronousTestCase):
    def test_health(self):
        """A health line gives its states and the details of unhealthy services."""
        message = parse_control_line(
            b'{"health":{"web":true,"db":false},"detail":{"db":"refused"}}\n'
        )
        self.assertIsInstance(message, Health)
        assert isinstance(message, Health)
        self.assertEqual(dict(message.states), {"web": True, "db": False})
        self.assertEqual(dict(message.detail), {"db": "refused"})

    def test_roundtrip(self):
        """What encode_health writes, parse_control_line reads back."""
        states = {"web": True, "db": False, "ünï cödé": False}
        detail = {"db": "no answer within 2s from 127.0.0.1:5432"}
        message = parse_control_line(encode_health(states, detail))
        self.assertEqual(message, Health(states, detail))

    def test_detail_optional_and_filtered(self):
        """No detail, a null one, details of healthy or unlisted services: dropped."""
        for line in [
            b'{"health":{"db":false}}',
            b'{"health":{"db":false},"detail":null}',
            b'{"health":{"db":false,"web":true},"detail":{"web":"x","other":"y"}}',
        ]:
            message = parse_control_line(line)
            assert isinstance(message, Health)
            self.assertEqual(dict(message.detail), {})

    def test_detail_cleaned(self):
        """A received detail text is made printable and cut, as a sent one is."""
        text = "bad\r\nline" + "q" * 400
        line = json.dumps({"health": {"db": False}, "detail": {"db": text}})
        message = parse_control_line(line.encode())
        assert isinstance(message, Health)
        self.assertEqual(message.detail["db"], clean_detail(text))
        self.assertEqual(len(message.detail["db"]), MAX_DETAIL)
        self.assertTrue(message.detail["db"].startswith("bad??line"))

    def test_unknown_keys_ignored(self):
        """Keys other than health and detail are ignored (later versions)."""
        message = parse_control_line(b'{"health":{"web":true},"seq":7,"x":{}}')
        self.assertEqual(message, Health({"web": True}, {}))

    def test_unknown_kind(self):
        """An object without health is Unknown, carrying its keys."""
        self.assertEqual(
            parse_control_line(b'{"notice":"draining","at":3}'),
            Unknown(("at", "notice")),
        )
        self.assertEqual(parse_control_line(b"{}"), Unknown(()))

    def test_malformed(self):
        """Every malformed line is one ControlError saying what was wrong."""
        for line, words in [
            (b"not json", "not valid JSON"),
            (b"[1, 2]", "must be a JSON object, got list"),
            (b'"health"', "must be a JSON object, got str"),
            (b'{"health": 1}', "health: expected an object, got 1"),
            (b'{"health": [true]}', "health: expected an object"),
            (b'{"health": {"web": "yes"}}', "health.web: expected true or false"),
            (b'{"health": {"": true}}', "invalid service name"),
            (b'{"health": {"a\\u0000": true}}', "invalid service name"),
            (b'{"health": {"db": false}, "detail": "down"}', "detail: expected"),
            (b'{"health": {"db": false}, "detail": {"db": 5}}', "must be a string"),
            (b'{"health": {}, "health": {}}', "more than once"),
            (b'{"health": {"a": true, "a": false}}', "more than once"),
            (b'\xff{"health": {}}', "not UTF-8"),
            (b'{"health": {"a": NaN}}', "not valid JSON"),
            (b"{" + b" " * MAX_LINE + b"}", "longer than 4096"),
        ]:
            with self.assertRaises(ControlError, msg=line) as caught:
                parse_control_line(line)
            self.assertIn(words, str(caught.exception), line)

    def test_not_bytes(self):
        """Text instead of bytes is refused clearly."""
        with self.assertRaises(ControlError):
            parse_control_line('{"health": {}}')  # type: ignore[arg-type]

    def test_exact_limit(self):
        """A line of exactly MAX_LINE bytes (newline excluded) is accepted."""
        line = b'{"pad":"' + b"p" * (MAX_LINE - 10) + b'"}'
        self.assertEqual(len(line), MAX_LINE)
        self.assertEqual(parse_control_line(line + b"\n"), Unknown(("pad",)))

    @settings(max_examples=100, deadline=None)
    @given(
        st.dictionaries(service_names, st.booleans(), max_size=8),
        st.dictionaries(service_names, st.text(max_size=300), max_size=8),
    )
    def test_roundtrip_random(self, states, detail):
        """Any states and details encode within the limit and parse back."""
        try:
            line = encode_health(states, detail)
        except ControlError:
            # Only when the states alone do not fit in one line.
            self.assertGreater(len(_encode_full(states, {})), MAX_LINE)
            return
        self.assertLessEqual(len(line) - 1, MAX_LINE)
        self.assertTrue(line.endswith(b"\n"))
        self.assertNotIn(b"\n", line[:-1])
        message = parse_control_line(line)
        assert isinstance(message, Health)
        self.assertEqual(dict(message.states), states)
        for name, text in message.detail.items():
            self.assertFalse(states[name])
            self.assertTrue(text.isprintable())
            self.assertLessEqual(len(text), MAX_DETAIL)
        expected = {
            n: clean_detail(t) for n, t in detail.items() if states.get(n) is False
        }
        if dict(message.detail) != expected:
            # Only when the whole line would not fit are details shortened.
            self.assertGreater(len(_encode_full(states, expected)), MAX_LINE)

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300))
    def test_random_bytes(self, data):
        """Random bytes parse or raise ControlError, nothing else."""
        try:
            parse_control_line(data)
        except ControlError:
            pass


def _encode_full(states, detail) -> bytes:
    obj = {"health": states}
    if detail:
        obj["detail"] = detail
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True).encode()


class HelloReplyGatewayTests(SynchronousTestCase):
    """The optional gateway id of an accepting hello reply."""

    def test_sent_and_read(self):
        """An accepting reply may name its gateway; the client reads it back."""
        line = encode_hello_reply(True, gateway="eu-1")
        self.assertEqual(line, b'{"ok":true,"gateway":"eu-1"}\n')
        self.assertEqual(parse_hello_reply(line), HelloReply(True, gateway="eu-1"))

    def test_absent(self):
        """An older gateway's reply has no id: None."""
        self.assertEqual(encode_hello_reply(True), b'{"ok":true}\n')
        self.assertIsNone(parse_hello_reply(b'{"ok":true}').gateway)
        self.assertIsNone(parse_hello_reply(b'{"ok":true,"gateway":null}').gateway)

    def test_invalid(self):
        """An id that is not 1 to 128 of [A-Za-z0-9._-] is a bad reply."""
        for value in ['"a b"', "5", '""', '"x\\n"']:
            with self.assertRaises(HandshakeError) as caught:
                parse_hello_reply(b'{"ok":true,"gateway":' + value.encode() + b"}")
            self.assertIn('field "gateway"', str(caught.exception))
        with self.assertRaises(HandshakeError):
            encode_hello_reply(True, gateway="no spaces")

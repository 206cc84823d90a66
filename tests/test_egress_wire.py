"""The egress request and answer lines (threshold.wire.egress)."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.wire.egress import (
    MAX_LINE,
    EgressAnswer,
    EgressError,
    EgressRefusal,
    EgressRequest,
    encode_answer,
    encode_refusal,
    encode_request,
    parse_answer,
    parse_request,
)


class RequestTests(SynchronousTestCase):
    def test_round_trip(self):
        """Names, IPv4 and IPv6 (in brackets) come back as sent."""
        for host in ("smtp.example.net", "192.0.2.7", "2001:db8::1"):
            line = encode_request(host, 25)
            self.assertTrue(line.endswith(b"\n"))
            self.assertEqual(parse_request(line), EgressRequest(host, 25))
        self.assertEqual(
            json.loads(encode_request("2001:db8::1", 587)),
            {"connect": "[2001:db8::1]:587"},
        )

    def test_unknown_keys_ignored(self):
        """Later versions may add keys."""
        line = b'{"connect": "a.example:25", "future": 1}'
        self.assertEqual(parse_request(line), EgressRequest("a.example", 25))

    def test_name_normalised(self):
        """Case and a final dot do not matter."""
        self.assertEqual(
            parse_request(b'{"connect": "A.Example.:25"}').host, "a.example"
        )

    def test_malformed(self):
        """Each malformed request raises EgressError saying why."""
        for line in (
            b"",
            b"not json",
            b"[]",
            b'{"connect": 25}',
            b'{"connect": "a.example"}',
            b'{"connect": "a.example:0"}',
            b'{"connect": "a.example:65536"}',
            b'{"connect": "2001:db8::1:25"}',
            b'{"connect": "[a.example]:25"}',
            b'{"connect": "bad name:25"}',
            b'{"connect": ":25"}',
            b'{"connect": "a:25", "connect": "b:25"}',
            b'{"connect": "\xff:25"}',
            b'{"other": "a.example:25"}',
            b'{"connect": "' + b"a" * MAX_LINE + b':25"}',
        ):
            with self.assertRaises(EgressError, msg=line[:40]):
                parse_request(line)

    @given(st.binary(max_size=200))
    def test_random_bytes(self, line):
        """Random bytes raise EgressError or parse; nothing else."""
        try:
            parse_request(line)
        except EgressError:
            pass


class AnswerTests(SynchronousTestCase):
    def test_ok(self):
        """An ok answer carries the bound address."""
        self.assertEqual(
            parse_answer(encode_answer("203.0.113.7", 40312)),
            EgressAnswer(True, bound=("203.0.113.7", 40312)),
        )
        self.assertEqual(
            parse_answer(encode_answer("2001:db8::7", 1)).bound, ("2001:db8::7", 1)
        )

    def test_refusals(self):
        """Each reason comes back; an unknown one reads as failed."""
        for reason in EgressRefusal:
            answer = parse_answer(encode_refusal(reason, "why"))
            self.assertEqual(answer, EgressAnswer(False, reason=reason, error="why"))
        answer = parse_answer(b'{"ok": false, "reason": "new_reason"}')
        self.assertEqual(answer.reason, EgressRefusal.FAILED)

    def test_long_error_fits(self):
        """A long error is cut so that the line stays within MAX_LINE."""
        line = encode_refusal(EgressRefusal.NOT_ALLOWED, "x" * 10000)
        self.assertLessEqual(len(line), MAX_LINE)

    def test_malformed(self):
        """Malformed answers raise EgressError."""
        for line in (
            b"{}",
            b'{"ok": 1}',
            b'{"ok": true}',
            b'{"ok": true, "bound": "nowhere"}',
            b"nope",
        ):
            with self.assertRaises(EgressError, msg=line):
                parse_answer(line)

"""Tests for threshold.wire.strictjson: every refusal is a JsonError, in one line."""

from __future__ import annotations

import json
import sys

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from threshold.wire import strictjson


class LoadsTests(SynchronousTestCase):
    def refused(self, data: bytes, *fragments: str) -> strictjson.JsonError:
        with self.assertRaises(strictjson.JsonError) as cm:
            strictjson.loads(data)
        message = str(cm.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return cm.exception

    def test_valid(self):
        """Ordinary JSON decodes as json.loads would."""
        text = '{"a": [1, -2, 3.5, 1e10, -0, true, null, "x\\u00e9"], "b": {}}'
        self.assertEqual(strictjson.loads(text.encode()), json.loads(text))

    def test_duplicate_key(self):
        """A key given twice is refused, naming it."""
        error = self.refused(b'{"a": 1, "b": {"c": 1, "c": 2}}', "'c'")
        self.assertIsInstance(error, strictjson.DuplicateKey)

    def test_constants(self):
        """NaN and the infinities are not JSON numbers."""
        for literal in (b"NaN", b"Infinity", b"-Infinity"):
            self.refused(b"[" + literal + b"]", literal.decode())

    def test_huge_integer(self):
        """An integer past Python's digit limit is a JsonError, not a ValueError.

        Before, int() raised a bare ValueError that callers did not expect:
        a 500 from the API, a traceback from the state file and config.
        """
        limit = sys.get_int_max_str_digits()
        for text in ("1" * 5000, "-" + "9" * 5000, "[" + "7" * (limit + 1) + "]"):
            self.refused(text.encode(), "digits is too long", f"at most {limit}")
        self.assertEqual(strictjson.loads(b"9" * limit), int("9" * limit))

    def test_float_overflow(self):
        """A number too large for a float is refused instead of becoming inf."""
        for text in (b"1e400", b"-1e400", b'{"x": [2e308]}', b"1" * 400 + b".0"):
            self.refused(text, "too large")
        self.assertEqual(strictjson.loads(b"1e308"), 1e308)
        self.assertEqual(strictjson.loads(b"1e-400"), 0.0)

    def test_deep_nesting(self):
        """Nesting past the recursion limit is a JsonError."""
        for data in (b"[" * 100_000, b'{"a":' * 100_000, b"[{}," * 50_000):
            self.refused(data, "nested too deeply")

    def test_not_utf8(self):
        """Bytes that are not UTF-8 are NotUtf8, with the offset."""
        error = self.refused(b'["\xff"]', "byte 2")
        self.assertIsInstance(error, strictjson.NotUtf8)

    @given(st.binary(max_size=200))
    def test_bytes_never_raise_anything_else(self, data):
        """Random bytes either decode or raise JsonError."""
        try:
            strictjson.loads(data)
        except strictjson.JsonError as e:
            self.assertNotIn("\n", str(e))

    @given(
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda inner: (
                st.lists(inner, max_size=3)
                | st.dictionaries(st.text(max_size=3), inner, max_size=3)
            ),
        )
    )
    def test_round_trip(self, value):
        """Whatever json.dumps writes (without NaN), strictjson reads back."""
        self.assertEqual(strictjson.loads(json.dumps(value).encode()), value)

"""The egress fuzz target on a seed corpus: SOCKS5 greetings and requests,
egress lines and EgressPolicy documents, and mutations of each.

``tests/fuzz/run`` fuzzes the same target coverage-guided (atheris).
"""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.targets import TARGETS
from tests.test_fuzz_targets import mutations
from threshold.wire.egress import (
    EgressRefusal,
    encode_answer,
    encode_refusal,
    encode_request,
)

SEEDS = [
    b"\x05\x01\x00\x05\x01\x00\x03\x0bmx.example.\x00\x19EHLO",
    b"\x05\x02\x00\x02\x05\x01\x00\x01\x7f\x00\x00\x01\x1f\x90",
    b"\x05\x01\x00\x05\x01\x00\x04" + b"\x00" * 15 + b"\x01\x00\x19",
    encode_request("smtp.example.net", 25),
    encode_request("2001:db8::1", 587),
    encode_answer("203.0.113.7", 40312),
    encode_refusal(EgressRefusal.NOT_ALLOWED, "no rule"),
    json.dumps(
        {"home-a": [{"Cidr": "0.0.0.0/0", "Ports": "25,465,587"}, {"Cidr": "::1"}]}
    ).encode(),
]


class EgressFuzzTests(SynchronousTestCase):
    def test_seeds_and_mutations(self):
        """Every seed and 500 mutations each end in a value or the parser's
        own error, never another exception."""
        target = TARGETS["egress"]
        rnd = random.Random("egress")
        for seed in SEEDS:
            target(seed)
            for data in mutations(seed, rnd, 500):
                target(data)
        self.assertEqual(self.flushLoggedErrors(), [])

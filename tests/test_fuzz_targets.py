"""The fuzz targets run on a seed corpus: valid inputs and their mutations.

Coverage-guided fuzzing (``tests/fuzz/run``) explores further; this keeps
the targets working and checks the seeds and thousands of deterministic
mutations of them in every test run.
"""

from __future__ import annotations

import json
import random

from twisted.trial.unittest import SynchronousTestCase

from tests.fuzz.targets import TARGETS
from tests.tlshello import python_hello
from threshold.testing import Frame, encode_frame
from threshold.wire import frames as F
from threshold.wire import handshake


def seeds() -> dict[str, list[bytes]]:
    frames = b"".join(
        [
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_SYN, 2, 0),
            encode_frame(Frame(F.TYPE_DATA, 0, 2, 5, b"hello")),
            F.encode_header(F.TYPE_PING, F.FLAG_SYN, 0, 7),
            F.encode_header(F.TYPE_WINDOW_UPDATE, F.FLAG_FIN, 2, 0),
            F.encode_header(F.TYPE_GO_AWAY, 0, 0, 0),
        ]
    )
    tunnels = [
        {
            "ClientId": "c",
            "ListenPort": 9000,
            "ListenHostnameGlob": "*.example.com",
            "BackEndService": "web",
            "HaProxyProxyProtocol": True,
        }
    ]
    server = {"UseTls": False, "TunnelControlPort": 9000, "MaxClients": 3}
    client = {
        "ClientId": "c",
        "ServerHost": "example.net",
        "UseTls": False,
        "ServiceToLocalAddrMap": {"web": "127.0.0.1:80"},
    }
    return {
        "frames": [frames, frames[:30], b""],
        "handshake": [
            handshake.encode_hello("TestClient1"),
            handshake.encode_hello_reply(False, "nope"),
            handshake.encode_stream_header("web"),
        ],
        "clienthello": [python_hello("a.example.com"), python_hello("x")],
        "config": [json.dumps(server).encode(), json.dumps(client).encode()],
        "api": [json.dumps(tunnels).encode(), b"[]", b"{}"],
    }


def mutations(seed: bytes, rnd: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(seed)
        for _ in range(rnd.randrange(1, 4)):
            action = rnd.randrange(4)
            if action == 0 and data:
                data[rnd.randrange(len(data))] ^= 1 << rnd.randrange(8)
            elif action == 1 and data:
                del data[rnd.randrange(len(data)) :]
            elif action == 2:
                data.insert(rnd.randrange(len(data) + 1), rnd.randrange(256))
            elif data:
                i = rnd.randrange(len(data))
                data[i] = rnd.choice([0, 0xFF, 0x7F, 0x80])
        out.append(bytes(data))
    return out


class FuzzTargetTests(SynchronousTestCase):
    def check(self, name: str) -> None:
        target = TARGETS[name]
        rnd = random.Random(name)
        for seed in seeds()[name]:
            target(seed)
            for data in mutations(seed, rnd, 400):
                target(data)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_frames(self):
        """Frames and sessions take mutated frame streams without raising."""
        self.check("frames")

    def test_handshake(self):
        """Handshake lines, mutated, end in values or HandshakeError."""
        self.check("handshake")

    def test_clienthello(self):
        """Mutated real ClientHellos never raise, answers never flip."""
        self.check("clienthello")

    def test_config(self):
        """Mutated config documents end in a config or ConfigError."""
        self.check("config")

    def test_api(self):
        """Mutated PUT /tunnels bodies end in tunnels or a clear API error."""
        self.check("api")

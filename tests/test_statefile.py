"""The state file: atomic writes off the reactor thread, in order; clear errors."""

from __future__ import annotations

import json
import os
import threading

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from threshold.server import statefile
from threshold.server.routes import parse_tunnels
from threshold.server.statefile import (
    StateFile,
    StateFileError,
    read_state,
    write_state,
)

TUNNELS = parse_tunnels(
    [
        {"ClientId": "a", "ListenPort": 9000, "BackEndService": "s"},
        {
            "ClientId": "b",
            "ListenAddress": "::1",
            "ListenPort": 9001,
            "ListenHostnameGlob": "*.example.com",
            "BackEndService": "t",
            "HaProxyProxyProtocol": True,
            "HaProxyProxyProtocolVersion": 2,
        },
    ]
)


def content(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def at_once(f, *args):
    """A thread runner that runs in the caller's thread (in-memory tests)."""
    return maybeDeferred(f, *args)


class ReadWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "state.json")

    def test_round_trip(self):
        """A written tunnel set reads back equal, mode 0600, no temporary left."""
        write_state(self.path, TUNNELS)
        self.assertEqual(read_state(self.path), TUNNELS)
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_api_json(self):
        """The file is the API's JSON list, readable by any tool."""
        write_state(self.path, TUNNELS)
        with open(self.path) as f:
            self.assertEqual(json.load(f), [t.to_json() for t in TUNNELS])

    def test_not_json(self):
        """A file that is not JSON is a one-line error naming the file."""
        with open(self.path, "w") as f:
            f.write("{not json")
        with self.assertRaisesRegex(StateFileError, "state.json: not valid JSON"):
            read_state(self.path)

    def test_not_tunnels(self):
        """A JSON file that is not a tunnel list names the field."""
        with open(self.path, "w") as f:
            json.dump([{"ClientId": "a"}], f)
        with self.assertRaisesRegex(StateFileError, "ListenPort"):
            read_state(self.path)

    def test_huge_number(self):
        """A 5,000-digit number is a one-line error, not a traceback."""
        with open(self.path, "w") as f:
            f.write('[{"ClientId": "a", "ListenPort": ' + "9" * 5000 + "}]")
        with self.assertRaises(StateFileError) as caught:
            read_state(self.path)
        self.assertNotIn("\n", str(caught.exception))

    def test_missing(self):
        """A missing file is a clear read error; StateFile.load says empty."""
        with self.assertRaisesRegex(StateFileError, "cannot read"):
            read_state(self.path)
        self.assertEqual(StateFile(self.path).load(), [])

    def test_failed_write_keeps_the_old_file(self):
        """A write that fails leaves the previous content and no temporary."""
        write_state(self.path, TUNNELS)
        before = content(self.path)

        def broken_fsync(fd):
            raise OSError(28, "No space left on device")

        self.patch(statefile.os, "fsync", broken_fsync)
        with self.assertRaisesRegex(StateFileError, "cannot write: No space left"):
            write_state(self.path, TUNNELS[:1])
        self.assertEqual(content(self.path), before)
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_missing_directory(self):
        """A directory that does not exist is a write error, not a traceback."""
        path = os.path.join(self.dir, "nowhere", "state.json")
        with self.assertRaisesRegex(StateFileError, "cannot write"):
            write_state(path, TUNNELS)


class OrderTests(SynchronousTestCase):
    def test_saves_one_at_a_time_in_order(self):
        """A second save starts only when the first is written."""
        started: list[list] = []
        pending: list[Deferred[None]] = []

        def runner(f, path, tunnels):
            started.append(tunnels)
            pending.append(Deferred())
            return pending[-1]

        state = StateFile("unused", runner)
        first = state.save(TUNNELS)
        second = state.save(TUNNELS[:1])
        self.assertEqual(started, [TUNNELS])
        pending[0].callback(None)
        self.assertEqual(started, [TUNNELS, TUNNELS[:1]])
        pending[1].callback(None)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_failure_reported_and_next_save_runs(self):
        """A failed save fails its caller; the next one still runs."""
        path = os.path.join(self.mktemp(), "state.json")
        state = StateFile(path, at_once)
        self.failureResultOf(state.save(TUNNELS), StateFileError)
        os.makedirs(os.path.dirname(path))
        self.successResultOf(state.save(TUNNELS))
        self.assertEqual(read_state(path), TUNNELS)


class ThreadTests(TestCase):
    async def test_written_off_the_reactor_thread(self):
        """By default the blocking write runs in a thread, not the reactor's."""
        threads = []
        real = statefile.write_state

        def spy(path, tunnels):
            threads.append(threading.get_ident())
            real(path, tunnels)

        self.patch(statefile, "write_state", spy)
        path = os.path.join(self.mktemp(), "state.json")
        os.makedirs(os.path.dirname(path))
        await StateFile(path).save(TUNNELS)
        self.assertEqual(read_state(path), TUNNELS)
        self.assertEqual(len(threads), 1)
        self.assertNotEqual(threads[0], threading.get_ident())

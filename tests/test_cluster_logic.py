"""threshold.cluster logic without etcd: codecs, endpoints, the watch, leases.

The watch and the leased records are driven by hand with a Clock and a
fake client, so every order of events can be set up exactly.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import ResponseDone

from tests.certs import test_pki
from threshold.cluster import watch as watch_module
from threshold.cluster.etcd import EtcdClient
from threshold.cluster.kv import (
    Compacted,
    Compare,
    EtcdError,
    EtcdUnavailable,
    Event,
    EventType,
    Lease,
    LeaseNotFound,
    RangeResult,
    TxnResult,
    b64,
    prefix_end,
)
from threshold.cluster.membership import LeasedRecords, RecordsState
from threshold.cluster.transport import parse_endpoint
from threshold.cluster.watch import Watch, WatchState
from threshold.config import ConfigError


class CodecTests(SynchronousTestCase):
    def test_prefix_end(self) -> None:
        """The range end after every key with the prefix, as etcd's clients make it."""
        self.assertEqual(prefix_end(b"/a/"), b"/a0")
        self.assertEqual(prefix_end(b"a\xff"), b"b")
        self.assertEqual(prefix_end(b"a\xfe\xff\xff"), b"a\xff")
        self.assertEqual(prefix_end(b"\xff\xff"), b"\0")

    def test_defaults_left_out(self) -> None:
        """Fields at their default are absent from the gateway's JSON."""
        result = RangeResult.from_json({"header": {"revision": "9"}})
        self.assertEqual((result.kvs, result.revision, result.more), ((), 9, False))
        event = Event.from_json({"kv": {"key": b64(b"k"), "mod_revision": "4"}})
        self.assertEqual(event.type, EventType.PUT)
        self.assertEqual((event.kv.value, event.revision, event.kv.lease), (b"", 4, 0))
        txn = TxnResult.from_json({"header": {"revision": "3"}})
        self.assertFalse(txn.succeeded)

    def test_malformed(self) -> None:
        """Answers that are not the gateway's JSON raise ValueError, named."""
        bad: list[tuple[Any, str]] = [
            ({"kvs": "x"}, "kvs"),
            ({"kvs": [{"key": "%%%"}]}, "base64"),
            ({"kvs": [{"key": "", "mod_revision": "ten"}]}, "mod_revision"),
            ({"kvs": [{"key": "", "version": True}]}, "version"),
            ({"header": []}, "header"),
        ]
        for raw, word in bad:
            with self.assertRaises(ValueError) as caught:
                RangeResult.from_json(raw)
            self.assertIn(word, str(caught.exception))
        with self.assertRaises(ValueError):
            Event.from_json({"type": "EXPLODE", "kv": {}})

    def test_compare_json(self) -> None:
        """Compares as the gateway wants them: enum names, int64 as strings."""
        self.assertEqual(
            Compare.mod_revision(b"k", 12).to_json(),
            {"key": "aw==", "target": "MOD", "result": "EQUAL", "mod_revision": "12"},
        )
        self.assertEqual(Compare.absent("k").to_json()["create_revision"], "0")

    def test_errors_say_where(self) -> None:
        """Each error names the endpoints and the cause in one line."""
        e = EtcdUnavailable(["http://a:1", "http://b:2"], "refused", True)
        self.assertEqual(
            str(e),
            "etcd unavailable at http://a:1, http://b:2: refused"
            " (the change may have been applied)",
        )
        self.assertEqual(str(Compacted(7)), "etcd history compacted up to revision 7")
        self.assertEqual(LeaseNotFound("http://a:1", 5).code, 5)


class EndpointTests(SynchronousTestCase):
    def test_normalised(self) -> None:
        self.assertEqual(parse_endpoint("http://10.0.0.5"), "http://10.0.0.5:2379")
        self.assertEqual(parse_endpoint("https://[::1]:2380/"), "https://[::1]:2380")

    def test_refused(self) -> None:
        """A bad endpoint is a ConfigError on EtcdEndpoints, naming it."""
        for bad in (
            "10.0.0.5:2379",
            "ftp://host",
            "http://",
            "http://host/v3",
            "http://host:99999",
            "http://u:p@host",
        ):
            with self.assertRaises(ConfigError) as caught:
                parse_endpoint(bad, "server.json")
            self.assertEqual(caught.exception.field, "EtcdEndpoints")
            self.assertIn(repr(bad), str(caught.exception))

    def test_https_needs_tls(self) -> None:
        with self.assertRaises(ConfigError) as caught:
            EtcdClient(["https://127.0.0.1:2379"], Clock())
        self.assertIn("EtcdCaCertificateFile", str(caught.exception))
        with self.assertRaises(ConfigError):
            EtcdClient([], Clock())

    def test_tls_files_named_as_etcd_fields(self) -> None:
        """A bad TLS file is reported under the Etcd* field that named it."""
        pki = test_pki()
        cases = [
            (
                (
                    "/nonexistent",
                    pki.client_cert("operator"),
                    pki.client_key("operator"),
                ),
                "EtcdCaCertificateFile",
            ),
            (
                (pki.ca_cert, "/nonexistent", pki.client_key("operator")),
                "EtcdClientCertificateFile",
            ),
            (
                (
                    pki.ca_cert,
                    pki.client_cert("operator"),
                    pki.client_key("TestClient1"),
                ),
                "EtcdClientKeyFile",
            ),
        ]
        for tls, field in cases:
            with self.assertRaises(ConfigError) as caught:
                EtcdClient(
                    ["https://127.0.0.1:2379"], Clock(), tls=tls, source="s.json"
                )
            self.assertEqual(caught.exception.field, field)
            self.assertEqual(caught.exception.source, "s.json")


# -- the watch, by hand ------------------------------------------------------


class FakeResponse:
    code = 200

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.protocol: Any = None

    def deliverBody(self, protocol: Any) -> None:  # noqa: N802
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, message: dict[str, Any]) -> None:
        self.protocol.dataReceived(json.dumps(message).encode() + b"\n")


class FakeOpener:
    timeout = 1.0

    def __init__(self) -> None:
        self.opens: list[tuple[dict[str, Any], Deferred[Any]]] = []
        self.demoted: list[str] = []

    async def open_stream(self, path: str, body: dict[str, Any]) -> Any:
        d: Deferred[Any] = Deferred()
        self.opens.append((body["create_request"], d))
        return await d

    def demote(self, endpoint: str) -> None:
        self.demoted.append(endpoint)

    def accept(self) -> FakeResponse:
        response = FakeResponse()
        self.opens[-1][1].callback(("http://e1:2379", response))
        return response


def result(revision: int, **fields: Any) -> dict[str, Any]:
    return {"result": {"header": {"revision": str(revision)}, **fields}}


def put(key: bytes, revision: int, value: bytes = b"v") -> dict[str, Any]:
    kv = {"key": b64(key), "value": b64(value), "mod_revision": str(revision)}
    return {"kv": kv}


class WatchLogicTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.opener = FakeOpener()
        self.events: list[Event] = []
        self.watch = self.make(self.events.append)

    def make(self, callback: Any, start: int = 5) -> Watch:
        watch = Watch(
            self.opener,
            self.clock,
            b"/p/",
            b"/p0",
            start,
            callback,
            backoff=lambda attempt: 0.5 * (attempt + 1),
        )
        watch.start()
        return watch

    def revisions(self) -> list[int]:
        return [e.revision for e in self.events]

    def test_request(self) -> None:
        """The watch asks for the range from its revision, with progress notices."""
        request = self.opener.opens[0][0]
        self.assertEqual(request["start_revision"], "5")
        self.assertEqual(request["range_end"], b64(b"/p0"))
        self.assertTrue(request["progress_notify"])
        self.assertIs(self.watch.state, WatchState.CONNECTING)

    def test_resume_drops_what_was_seen(self) -> None:
        """A new stream starts after the last event; older ones are dropped."""
        stream = self.opener.accept()
        stream.send(result(6, created=True))
        self.assertIs(self.watch.state, WatchState.WATCHING)
        stream.send(result(6, events=[put(b"/p/a", 5), put(b"/p/b", 6)]))
        stream.protocol.connectionLost(Failure(ResponseDone()))
        self.assertIs(self.watch.state, WatchState.WAITING)
        self.clock.advance(0.5)
        self.assertEqual(self.opener.opens[-1][0]["start_revision"], "7")
        again = self.opener.accept()
        again.send(result(8, created=True))
        again.send(
            result(8, events=[put(b"/p/b", 6), put(b"/p/c", 7), put(b"/p/d", 8)])
        )
        self.assertEqual(self.revisions(), [5, 6, 7, 8])
        self.assertEqual(self.watch.next_revision, 9)

    def test_progress_moves_the_resume_point(self) -> None:
        """A progress notice (no events) means nothing before its revision is left."""
        stream = self.opener.accept()
        stream.send(result(4, created=True))
        stream.send(result(40))
        self.assertEqual(self.watch.next_revision, 41)
        stream.protocol.connectionLost(Failure(ResponseDone()))
        self.clock.advance(0.5)
        self.assertEqual(self.opener.opens[-1][0]["start_revision"], "41")

    def test_from_now(self) -> None:
        """Start 0: the created header's revision + 1 is where a resume starts."""
        watch = self.make(self.events.append, start=0)
        self.assertNotIn("start_revision", self.opener.opens[-1][0])
        self.opener.accept().send(result(12, created=True))
        self.assertEqual(watch.next_revision, 13)

    def test_no_created_in_time(self) -> None:
        """A stream that says nothing within the timeout is dropped, endpoint last."""
        stream = self.opener.accept()
        self.clock.advance(1.0)
        self.assertIs(self.watch.state, WatchState.WAITING)
        self.assertEqual(stream.transport.producerState, "stopped")
        self.assertEqual(self.opener.demoted, ["http://e1:2379"])
        self.assertIn("no answer", self.watch.last_error or "")

    def test_backoff_grows_then_resets(self) -> None:
        """Failed opens wait longer each time; a created stream resets it."""
        self.opener.opens[-1][1].errback(EtcdUnavailable(["e"], "refused"))
        self.clock.advance(0.49)
        self.assertEqual(len(self.opener.opens), 1)
        self.clock.advance(0.01)
        self.opener.opens[-1][1].errback(EtcdUnavailable(["e"], "refused"))
        self.clock.advance(0.99)
        self.assertEqual(len(self.opener.opens), 2)
        self.clock.advance(0.01)
        self.assertEqual(self.watch.failures, 2)
        self.opener.accept().send(result(5, created=True))
        self.assertEqual((self.watch.failures, self.watch.last_error), (0, None))

    def test_malformed_and_error_lines(self) -> None:
        """A line that is not a watch answer, or an error, drops the stream."""
        cases = [
            (b"nonsense\n", "malformed watch answer"),
            (b'{"error": {"message": "boom"}}\n', "etcd: boom"),
            (b"[1]\n", "malformed watch answer: not an object"),
        ]
        for line, why in cases:
            stream = self.opener.accept()
            stream.protocol.dataReceived(line)
            self.assertIs(self.watch.state, WatchState.WAITING)
            self.assertEqual(stream.transport.producerState, "stopped")
            self.assertIn(why, self.watch.last_error or "")
            self.clock.advance(10)

    def test_line_bound(self) -> None:
        """An answer line over the bound drops the stream instead of buffering."""
        self.patch(watch_module, "MAX_LINE_BYTES", 100)
        stream = self.opener.accept()
        stream.protocol.dataReceived(b"x" * 101)
        self.assertIs(self.watch.state, WatchState.WAITING)
        self.assertIn("over 100 bytes", self.watch.last_error or "")

    def test_split_lines(self) -> None:
        """Answers split across reads at any byte are put together."""
        stream = self.opener.accept()
        data = (
            json.dumps(result(6, created=True)).encode()
            + b"\n"
            + json.dumps(result(6, events=[put(b"/p/a", 6)])).encode()
            + b"\n"
        )
        for i in range(len(data)):
            stream.protocol.dataReceived(data[i : i + 1])
        self.assertEqual(self.revisions(), [6])

    def test_compacted(self) -> None:
        """etcd cancels for compaction: done fails with Compacted, no retry."""
        stream = self.opener.accept()
        stream.send(result(9, created=True))
        stream.send(result(9, canceled=True, compact_revision="8"))
        failure = self.failureResultOf(self.watch.done, Compacted)
        self.assertEqual(failure.value.revision, 8)
        self.assertIs(self.watch.state, WatchState.STOPPED)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_callback_error_in_a_transaction(self) -> None:
        """The callback raises on a revision's 2nd key: resume at that revision."""
        calls: list[Event] = []

        def second_fails(event: Event) -> None:
            calls.append(event)
            if len(calls) == 2:
                raise RuntimeError("consumer")

        watch = self.make(second_fails)
        stream = self.opener.accept()
        stream.send(result(8, created=True))
        stream.send(result(8, events=[put(b"/p/a", 8), put(b"/p/b", 8)]))
        self.failureResultOf(watch.done, RuntimeError)
        self.assertEqual(watch.next_revision, 8)

    def test_cancel_leaves_nothing(self) -> None:
        """cancel() while waiting: done fires, no timer left, no reopen."""
        self.opener.opens[-1][1].errback(EtcdUnavailable(["e"], "refused"))
        self.watch.cancel()
        self.assertIsNone(self.successResultOf(self.watch.done))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.watch.cancel()  # twice is harmless

    def test_idle_timeout(self) -> None:
        """With idle_timeout, a silent stream is replaced (a frozen member)."""
        watch = Watch(
            self.opener,
            self.clock,
            b"/p/",
            None,
            5,
            self.events.append,
            backoff=lambda attempt: 0.1,
            idle_timeout=3.0,
        )
        watch.start()
        stream = self.opener.accept()
        stream.send(result(5, created=True))
        self.clock.advance(2.9)
        stream.send(result(5))
        self.clock.advance(2.9)
        self.assertIs(watch.state, WatchState.WATCHING)
        self.clock.advance(0.2)
        self.assertIs(watch.state, WatchState.WAITING)
        self.assertIn("no message for 3 s", watch.last_error or "")


# -- leased records, by hand ---------------------------------------------------


class FakeEtcd:
    """Records calls; each answers with a Deferred the test fires."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.pending: list[Deferred[Any]] = []
        self.next_lease = 100

    def _call(self, *call: Any) -> Deferred[Any]:
        self.calls.append(call)
        d: Deferred[Any] = Deferred()
        self.pending.append(d)
        return d

    def lease_grant(self, ttl: int) -> Deferred[Lease]:
        self.calls.append(("grant", ttl))
        self.next_lease += 1
        return succeed(Lease(self.next_lease, ttl))

    def delete(self, key: bytes, *, prefix: bool = False) -> Deferred[int]:
        if prefix:
            self.calls.append(("clear", key))
            return succeed(0)
        return self._call("delete", key)

    def put(self, key: bytes, value: bytes, lease: int = 0) -> Deferred[int]:
        return self._call("put", key, value, lease)

    def lease_keepalive(self, lease_id: int) -> Deferred[int]:
        return self._call("keepalive", lease_id)

    def lease_revoke(self, lease_id: int) -> Deferred[None]:
        self.calls.append(("revoke", lease_id))
        return succeed(None)

    def answer(self, value: Any = 1) -> None:
        self.pending.pop(0).callback(value)

    def refuse(self, error: Exception) -> None:
        self.pending.pop(0).errback(error)

    def writes(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in ("put", "delete")]


class LeasedRecordsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.etcd = FakeEtcd()
        self.records = LeasedRecords(self.etcd, self.clock, 6, [b"/mine/"])
        self.records.start()

    def test_first_lease_clears_the_last_run(self) -> None:
        self.assertEqual(self.etcd.calls, [("grant", 6), ("clear", b"/mine/")])
        self.assertIs(self.records.state, RecordsState.LIVE)

    def test_one_write_at_a_time_in_order(self) -> None:
        """A put and a later delete of one key are sent one after the other."""
        self.records.set(b"k", b"1")
        self.records.remove(b"k")
        self.assertEqual(self.etcd.writes(), [("put", b"k", b"1", 101)])
        self.etcd.answer()
        self.assertEqual(self.etcd.writes()[-1], ("delete", b"k"))
        self.etcd.answer()
        self.assertEqual(self.records.pending, 0)

    def test_bursts_coalesce(self) -> None:
        """Changes while a write is out cost one more write of the latest value."""
        self.records.set(b"k", b"1")
        for i in range(2, 10):
            self.records.set(b"k", str(i).encode())
        self.etcd.answer()
        self.etcd.answer()
        self.assertEqual(
            self.etcd.writes(), [("put", b"k", b"1", 101), ("put", b"k", b"9", 101)]
        )

    def test_unreachable_then_back(self) -> None:
        """etcd unreachable: DEGRADED; the next renewal that works writes."""
        self.records.set(b"k", b"1")
        self.etcd.refuse(EtcdUnavailable(["e"], "refused"))
        self.assertIs(self.records.state, RecordsState.DEGRADED)
        self.assertEqual(self.records.pending, 1)
        self.clock.advance(2)  # ttl / 3: renew and retry
        self.etcd.answer()  # the retried put
        self.etcd.answer(6)  # the keepalive
        self.assertIs(self.records.state, RecordsState.LIVE)
        self.assertEqual(self.records.pending, 0)

    def test_lease_lost_on_renewal(self) -> None:
        """A renewal finds the lease gone: a new one, every record again."""
        self.records.set(b"a", b"1")
        self.records.set(b"b", b"2")
        self.etcd.answer()
        self.etcd.answer()
        self.clock.advance(2)
        self.assertEqual(self.etcd.calls[-1], ("keepalive", 101))
        self.etcd.refuse(LeaseNotFound("e", 101))
        self.etcd.answer()
        self.etcd.answer()
        self.assertEqual(
            self.etcd.writes()[-2:],
            [("put", b"a", b"1", 102), ("put", b"b", b"2", 102)],
        )
        self.assertEqual((self.records.leases, self.records.lease_id), (2, 102))
        self.assertIs(self.records.state, RecordsState.LIVE)

    def test_lease_lost_on_put(self) -> None:
        """A put refused for its lease gets a new lease and is sent again."""
        self.records.set(b"a", b"1")
        self.etcd.refuse(EtcdError("e", 5, "etcdserver: requested lease not found"))
        self.assertEqual(self.etcd.writes()[-1], ("put", b"a", b"1", 102))
        self.etcd.answer()
        self.assertIs(self.records.state, RecordsState.LIVE)

    def test_stop_revokes(self) -> None:
        """stop() revokes the lease and leaves no timer."""
        self.successResultOf(self.records.stop())
        self.assertEqual(self.etcd.calls[-1], ("revoke", 101))
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertIs(self.records.state, RecordsState.STOPPED)

    def test_ttl_bound(self) -> None:
        with self.assertRaises(ValueError):
            LeasedRecords(self.etcd, self.clock, 1)

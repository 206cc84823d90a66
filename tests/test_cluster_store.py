"""ClusterStore against a real etcd: the tunnel set, apply status, presence.

The shared member serves tests under their own KeyPrefix; tests that kill
etcd or a gateway process start their own.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.etcdkit import etcd_for_test, shared_etcd
from tests.etcdtest import sleep, unique_prefix, wait_until
from threshold.cluster.etcd import EtcdClient
from threshold.cluster.kv import EtcdUnavailable
from threshold.cluster.membership import RecordsState
from threshold.cluster.mirror import MirrorState, Update
from threshold.cluster.store import (
    ClusterStore,
    Conflict,
    InvalidDocument,
    TunnelSet,
    encode,
)


def fast_backoff(attempt: int) -> float:
    return min(0.05 * 2**attempt, 0.4)


def tunnels(n: int, client: str = "TestClient1") -> list[dict[str, object]]:
    """``n`` tunnel entries as the management API takes them."""
    return [
        {
            "ClientId": client,
            "ListenAddress": "127.0.0.1",
            "ListenPort": 20000 + i,
            "ListenHostnameGlob": "*",
            "BackEndService": f"service{i}",
            "HaProxyProxyProtocol": True,
        }
        for i in range(n)
    ]


class StoreCase(TestCase):
    def setUp(self) -> None:
        self.etcd = shared_etcd()
        self.key_prefix = unique_prefix()
        self.store = self.store_of(self.etcd.url)

    def store_of(self, *urls: str, timeout: float = 2.0) -> ClusterStore:
        client = EtcdClient(list(urls), reactor, timeout=timeout)
        self.addCleanup(client.close)
        return ClusterStore(client, reactor, self.key_prefix, backoff=fast_backoff)

    def records(self, store: ClusterStore, gateway: str, ttl: int = 10):  # noqa: ANN201
        records = store.gateway(gateway, ttl=ttl)
        records.start()
        self.addCleanup(records.stop)
        return records


class TunnelSetTests(StoreCase):
    async def test_empty(self) -> None:
        """Before any write the set is absent: document None, revision 0."""
        self.assertEqual(await self.store.read_tunnels(), TunnelSet(None, 0))

    async def test_write_then_read(self) -> None:
        """A write answers the set's new revision; a read returns both."""
        revision = await self.store.write_tunnels(tunnels(2), 0)
        self.assertEqual(
            await self.store.read_tunnels(), TunnelSet(tunnels(2), revision)
        )
        again = await self.store.write_tunnels(tunnels(1), revision)
        self.assertGreater(again, revision)
        self.assertEqual((await self.store.read_tunnels()).document, tunnels(1))

    async def test_stale_revision_conflicts(self) -> None:
        """A write based on an older revision fails with the current one."""
        first = await self.store.write_tunnels(tunnels(1), 0)
        second = await self.store.write_tunnels(tunnels(2), first)
        with self.assertRaises(Conflict) as caught:
            await self.store.write_tunnels(tunnels(3), first)
        self.assertEqual(caught.exception.current_revision, second)
        self.assertEqual(caught.exception.expected_revision, first)
        with self.assertRaises(Conflict) as caught:
            await self.store.write_tunnels(tunnels(3), 0)  # "none yet": there is
        self.assertEqual(caught.exception.current_revision, second)
        self.assertEqual((await self.store.read_tunnels()).document, tunnels(2))

    async def test_racing_gateways(self) -> None:
        """Two gateways write on one revision at once: one wins, one Conflict."""
        base = await self.store.write_tunnels(tunnels(1), 0)
        other = self.store_of(self.etcd.url)
        outcomes = await defer.DeferredList(
            [
                self.store.write_tunnels(tunnels(2, "A"), base),
                other.write_tunnels(tunnels(2, "B"), base),
            ],
            consumeErrors=True,
        )
        wins = [value for ok, value in outcomes if ok]
        losses = [value.value for ok, value in outcomes if not ok]
        self.assertEqual(len(wins), 1)
        self.assertEqual(len(losses), 1)
        self.assertIsInstance(losses[0], Conflict)
        self.assertEqual(losses[0].current_revision, wins[0])
        final = await other.read_tunnels()
        self.assertEqual(final.revision, wins[0])

    async def test_not_json(self) -> None:
        """A key holding something else (another tool) reads as InvalidDocument."""
        await self.store.client.put(self.store.tunnels_key, b"{not json")
        with self.assertRaises(InvalidDocument) as caught:
            await self.store.read_tunnels()
        self.assertIn("tunnels", str(caught.exception))

    async def test_thousand_tunnels(self) -> None:
        """1,000 tunnels in one document write and read back whole."""
        document = tunnels(1000)
        began = time.monotonic()
        revision = await self.store.write_tunnels(document, 0)
        read = await self.store.read_tunnels()
        self.assertLess(time.monotonic() - began, 5.0)
        self.assertEqual(read, TunnelSet(document, revision))


class TunnelWatchTests(StoreCase):
    async def test_reports_each_set_once(self) -> None:
        """The current set first, then every write, in order."""
        first = await self.store.write_tunnels(tunnels(1), 0)
        sets: list[TunnelSet] = []
        mirror = self.store.watch_tunnels(sets.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        second = await self.store.write_tunnels(tunnels(2), first)
        third = await self.store.write_tunnels(tunnels(3), second)
        await wait_until(lambda: len(sets) == 3, "three sets")
        await sleep(0.1)
        self.assertEqual(
            sets,
            [
                TunnelSet(tunnels(1), first),
                TunnelSet(tunnels(2), second),
                TunnelSet(tunnels(3), third),
            ],
        )

    async def test_applied_revision_not_again(self) -> None:
        """A set this gateway already applied (its local copy) is not reported."""
        first = await self.store.write_tunnels(tunnels(1), 0)
        sets: list[TunnelSet] = []
        mirror = self.store.watch_tunnels(sets.append, applied_revision=first)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        await sleep(0.1)
        self.assertEqual(sets, [])
        second = await self.store.write_tunnels(tunnels(2), first)
        await wait_until(lambda: sets, "the new set")
        self.assertEqual(sets, [TunnelSet(tunnels(2), second)])

    async def test_invalid_then_valid(self) -> None:
        """Garbage written by another tool is reported apart, then a set again."""
        sets: list[TunnelSet] = []
        invalid: list[InvalidDocument] = []
        mirror = self.store.watch_tunnels(sets.append, on_invalid=invalid.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        bad = await self.store.client.put(self.store.tunnels_key, b"\xff")
        await wait_until(lambda: invalid, "the invalid document")
        self.assertEqual(invalid[0].revision, bad)
        good = await self.store.write_tunnels(tunnels(1), bad)
        await wait_until(lambda: sets, "the set")
        self.assertEqual(sets, [TunnelSet(tunnels(1), good)])

    async def test_deleted_set(self) -> None:
        """A deleted tunnels key is reported as no set (None, 0)."""
        first = await self.store.write_tunnels(tunnels(1), 0)
        sets: list[TunnelSet] = []
        mirror = self.store.watch_tunnels(sets.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        await self.store.client.delete(self.store.tunnels_key)
        await wait_until(lambda: len(sets) == 2, "the deletion")
        self.assertEqual(sets, [TunnelSet(tunnels(1), first), TunnelSet(None, 0)])


class TunnelWatchFaultTests(TestCase):
    """The tunnel watch across an etcd restart and a compaction."""

    async def test_compaction_resync(self) -> None:
        """History compacted while the watch was away: read again, report once.

        etcd is killed; while it restarts and before the watch can return
        (the reactor stands still), the set is written twice and the history
        compacted. The watch then finds its revision gone, the store reads
        the set again and reports the newest one, once; nothing is reported
        twice and the watch carries on.
        """
        etcd = etcd_for_test(self)
        client = EtcdClient([etcd.url], reactor, timeout=2.0)
        self.addCleanup(client.close)
        store = ClusterStore(client, reactor, "/t/", backoff=fast_backoff)
        first = await store.write_tunnels(tunnels(1), 0)
        sets: list[TunnelSet] = []
        mirror = store.watch_tunnels(sets.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        etcd.kill()
        await wait_until(lambda: not mirror.connected, "the watch to notice")
        etcd.restart_blocking()
        second = etcd.put(store.tunnels_key, encode(tunnels(2)))
        third = etcd.put(store.tunnels_key, encode(tunnels(3)))
        etcd.compact()
        await wait_until(lambda: mirror.resyncs == 1 and mirror.connected, "resync")
        fourth = await store.write_tunnels(tunnels(4), third)
        await wait_until(lambda: len(sets) == 3, "the set after the resync")
        await sleep(0.1)
        self.assertEqual(
            sets,
            [
                TunnelSet(tunnels(1), first),
                TunnelSet(tunnels(3), third),
                TunnelSet(tunnels(4), fourth),
            ],
        )
        self.assertLess(second, third)
        self.assertIs(mirror.state, MirrorState.WATCHING)

    async def test_outage_keeps_last_set(self) -> None:
        """etcd down: writes fail typed, the copy stays; etcd back: it resumes."""
        etcd = etcd_for_test(self)
        client = EtcdClient([etcd.url], reactor, timeout=1.0)
        self.addCleanup(client.close)
        store = ClusterStore(client, reactor, "/t/", backoff=fast_backoff)
        first = await store.write_tunnels(tunnels(1), 0)
        sets: list[TunnelSet] = []
        mirror = store.watch_tunnels(sets.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        etcd.kill()
        with self.assertRaises(EtcdUnavailable):
            await store.write_tunnels(tunnels(2), first)
        await wait_until(lambda: not mirror.connected, "the watch to notice")
        self.assertEqual(
            store.tunnel_set(mirror.kvs[store.tunnels_key]).revision, first
        )
        await etcd.restart(reactor)
        await wait_until(lambda: mirror.connected, "the watch back")
        second = await store.write_tunnels(tunnels(2), first)
        await wait_until(lambda: len(sets) == 2, "the set after the outage")
        self.assertEqual(sets[1], TunnelSet(tunnels(2), second))
        self.assertEqual(mirror.resyncs, 0)


class PresenceTests(StoreCase):
    async def test_connect_disconnect(self) -> None:
        """Clients come and go; the fleet's view follows, per gateway."""
        a = self.records(self.store, "gw-a")
        b = self.records(self.store, "gw-b")
        a.client_connected("TestClient1", {"since": 1})
        a.client_connected("TestClient2", {"since": 2})
        b.client_connected("TestClient1", {"since": 3})
        await wait_until(lambda: a.records.pending == b.records.pending == 0, "writes")
        self.assertEqual(
            await self.store.read_presence(),
            {
                "TestClient1": {"gw-a": {"since": 1}, "gw-b": {"since": 3}},
                "TestClient2": {"gw-a": {"since": 2}},
            },
        )
        a.client_disconnected("TestClient1")
        await wait_until(lambda: a.records.pending == 0, "the delete")
        self.assertEqual(
            await self.store.read_presence(),
            {
                "TestClient1": {"gw-b": {"since": 3}},
                "TestClient2": {"gw-a": {"since": 2}},
            },
        )
        self.assertIs(a.state, RecordsState.LIVE)

    async def test_stop_drops_all(self) -> None:
        """A gateway that stops revokes its lease: its records go at once."""
        a = self.records(self.store, "gw-a")
        a.client_connected("TestClient1", {})
        a.set_status({"revision": 7, "errors": []})
        await wait_until(lambda: a.records.pending == 0, "writes")
        await a.stop()
        self.assertEqual(await self.store.read_presence(), {})
        self.assertEqual(await self.store.read_statuses(), {})

    async def test_quick_changes_end_as_last_said(self) -> None:
        """Connect, disconnect, connect in one turn: etcd ends as the last one."""
        a = self.records(self.store, "gw-a")
        await wait_until(lambda: a.state is RecordsState.LIVE, "the lease")
        for i in range(5):
            a.client_connected("TestClient1", {"n": i})
            a.client_disconnected("TestClient1")
            a.client_connected("TestClient2", {"n": i})
        a.client_disconnected("TestClient2")
        a.client_connected("TestClient2", {"n": "last"})
        await wait_until(lambda: a.records.pending == 0, "writes")
        self.assertEqual(
            await self.store.read_presence(), {"TestClient2": {"gw-a": {"n": "last"}}}
        )

    async def test_status(self) -> None:
        """Each gateway's apply status, read and watched."""
        updates: list[Update] = []
        mirror = self.store.watch_statuses(updates.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        a = self.records(self.store, "gw-a")
        a.set_status({"revision": 5, "errors": ["port 80: in use"]})
        await wait_until(lambda: self.store.statuses(mirror.kvs), "the status")
        self.assertEqual(
            await self.store.read_statuses(),
            {"gw-a": {"revision": 5, "errors": ["port 80: in use"]}},
        )
        self.assertEqual(
            self.store.statuses(mirror.kvs),
            {"gw-a": {"revision": 5, "errors": ["port 80: in use"]}},
        )

    async def test_watch_presence(self) -> None:
        """A presence mirror follows connects and disconnects as they happen."""
        mirror = self.store.watch_presence(lambda update: None)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        a = self.records(self.store, "gw-a")
        a.client_connected("TestClient1", {"x": 1})
        await wait_until(lambda: self.store.presence(mirror.kvs), "the client")
        self.assertEqual(
            self.store.presence(mirror.kvs), {"TestClient1": {"gw-a": {"x": 1}}}
        )
        a.client_disconnected("TestClient1")
        await wait_until(lambda: not self.store.presence(mirror.kvs), "its leaving")

    async def test_restart_clears_previous_run(self) -> None:
        """A gateway that comes back under its id drops what its last run left."""
        old = self.records(self.store, "gw-a")
        old.client_connected("TestClient1", {})
        await wait_until(lambda: old.records.pending == 0, "writes")
        new = self.records(self.store_of(self.etcd.url), "gw-a")
        new.client_connected("TestClient2", {})
        await wait_until(lambda: new.records.pending == 0, "writes")
        self.assertEqual(
            await self.store.read_presence(), {"TestClient2": {"gw-a": {}}}
        )

    async def test_lease_lost_rewrites(self) -> None:
        """A lease found gone (revoked, expired) is replaced, every record rewritten."""
        a = self.records(self.store, "gw-a", ttl=3)
        a.client_connected("TestClient1", {"v": 1})
        a.set_status({"revision": 1})
        await wait_until(lambda: a.records.pending == 0, "writes")
        lost = a.records.lease_id
        assert lost is not None
        await self.store.client.lease_revoke(lost)
        await wait_until(
            lambda: a.records.leases == 2 and a.records.pending == 0,
            "a new lease",
            timeout=5,
        )
        self.assertNotEqual(a.records.lease_id, lost)
        self.assertEqual(
            await self.store.read_presence(), {"TestClient1": {"gw-a": {"v": 1}}}
        )
        self.assertEqual(await self.store.read_statuses(), {"gw-a": {"revision": 1}})


class PresenceFaultTests(TestCase):
    """Presence across etcd outages (a member per test)."""

    def setUp(self) -> None:
        self.etcd = etcd_for_test(self)
        client = EtcdClient([self.etcd.url], reactor, timeout=1.0)
        self.addCleanup(client.close)
        self.store = ClusterStore(client, reactor, "/p/", backoff=fast_backoff)

    async def test_written_when_etcd_returns(self) -> None:
        """Changes made while etcd is down wait, then land, in order."""
        records = self.store.gateway("gw-a", ttl=3)
        records.start()
        self.addCleanup(records.stop)
        records.client_connected("TestClient1", {})
        await wait_until(lambda: records.state is RecordsState.LIVE, "live")
        self.etcd.kill()
        records.client_connected("TestClient2", {"late": True})
        records.client_disconnected("TestClient1")
        await wait_until(lambda: records.state is RecordsState.DEGRADED, "degraded")
        self.assertIn(self.etcd.url, records.records.last_error or "")
        self.assertEqual(records.records.pending, 2)
        await self.etcd.restart(reactor)
        # The next renewal (every TTL / 3) finds etcd back and writes.
        await wait_until(lambda: records.state is RecordsState.LIVE, "live again")
        self.assertEqual(
            await self.store.read_presence(), {"TestClient2": {"gw-a": {"late": True}}}
        )

    async def test_resync_reports_deletes(self) -> None:
        """Keys deleted while the watch was away are reported by the reread."""
        records = self.store.gateway("gw-a", ttl=10)
        records.start()
        self.addCleanup(records.stop)
        records.client_connected("TestClient1", {})
        records.client_connected("TestClient2", {})
        await wait_until(lambda: records.records.pending == 0, "writes")
        updates: list[Update] = []
        mirror = self.store.watch_presence(updates.append)
        self.addCleanup(mirror.stop)
        await mirror.ready()
        self.etcd.kill()
        await wait_until(lambda: not mirror.connected, "the watch to notice")
        self.etcd.restart_blocking()
        gone = self.store.presence_key("gw-a", "TestClient1")
        self.etcd.call("/v3/kv/deleterange", {"key": _b64(gone)})
        # Compact past the delete, so the watch cannot resume from before it.
        self.etcd.put(b"/elsewhere", b"x")
        self.etcd.compact()
        await wait_until(lambda: mirror.resyncs == 1, "the resync")
        self.assertEqual(updates[-1].changes, {gone: None})
        self.assertTrue(updates[-1].resync)
        self.assertEqual(self.store.presence(mirror.kvs), {"TestClient2": {"gw-a": {}}})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_GATEWAY_SCRIPT = """
import sys
from twisted.internet import reactor
from threshold.cluster.etcd import EtcdClient
from threshold.cluster.kv import EtcdUnavailable
from threshold.cluster.store import ClusterStore

def main():
    client = EtcdClient([sys.argv[1]], reactor, timeout=2.0)
    store = ClusterStore(client, reactor, sys.argv[2])
    records = store.gateway("gw-dies", ttl=2)
    records.start()
    records.client_connected("TestClient1", {"pid": 1})

reactor.callWhenRunning(main)
reactor.run()
"""


class GatewayDiesTests(StoreCase):
    async def test_killed_gateway_drops_out(self) -> None:
        """A gateway process killed: its clients go within the lease TTL (2 s)."""
        proc = subprocess.Popen(
            [sys.executable, "-c", _GATEWAY_SCRIPT, self.etcd.url, self.key_prefix],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        )
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        mirror = self.store.watch_presence(lambda update: None)
        self.addCleanup(mirror.stop)
        await wait_until(lambda: mirror.kvs, "the gateway's record")
        self.assertEqual(
            self.store.presence(mirror.kvs), {"TestClient1": {"gw-dies": {"pid": 1}}}
        )
        proc.send_signal(signal.SIGKILL)
        began = time.monotonic()
        await wait_until(lambda: not mirror.kvs, "the lease to expire", timeout=6)
        gone_after = time.monotonic() - began
        # TTL 2 s; etcd checks for expired leases every 500 ms.
        self.assertLess(gone_after, 3.5)


class KeyLayoutTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = ClusterStore(object(), None, "/threshold/")

    def test_layout(self) -> None:
        """The keys as docs/cluster.md and the store's docstring state them."""
        self.assertEqual(self.store.tunnels_key, b"/threshold/tunnels")
        self.assertEqual(
            self.store.status_key("eu-1"), b"/threshold/gateways/eu-1/status"
        )
        self.assertEqual(
            self.store.presence_key("eu-1", "TestClient1"),
            b"/threshold/presence/eu-1/TestClient1",
        )
        self.assertEqual(
            self.store.parse_presence_key(b"/threshold/presence/eu-1/TestClient1"),
            ("eu-1", "TestClient1"),
        )
        self.assertIsNone(self.store.parse_presence_key(b"/threshold/tunnels"))
        self.assertEqual(
            self.store.parse_status_key(b"/threshold/gateways/eu-1/status"), "eu-1"
        )

    def test_ids_cannot_shift_the_layout(self) -> None:
        """A GatewayId or ClientId with a slash (or empty) is refused."""
        for bad in ("a/b", "", "x" * 129, "é"):
            with self.assertRaises(ValueError):
                self.store.status_key(bad)
            with self.assertRaises(ValueError):
                self.store.presence_key("eu-1", bad)

    def test_prefix_must_end_with_slash(self) -> None:
        with self.assertRaises(ValueError):
            ClusterStore(object(), None, "/threshold")

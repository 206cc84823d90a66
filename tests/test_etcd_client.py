"""EtcdClient against a real etcd on loopback: KV, transactions, leases, watches.

Reads and writes share one member per test process, each test under its
own key prefix; tests that kill, freeze or compact etcd start their own.
"""

from __future__ import annotations

import time

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.certs import test_pki
from tests.etcdkit import etcd_for_test, free_port, shared_etcd
from tests.etcdtest import Collector, sleep, unique_prefix, wait_until
from threshold.cluster.etcd import EtcdClient
from threshold.cluster.kv import (
    Compacted,
    Compare,
    Delete,
    EtcdError,
    EtcdUnavailable,
    EventType,
    LeaseNotFound,
    MalformedAnswer,
    Put,
    Range,
)
from threshold.cluster.watch import WatchState


def fast_backoff(attempt: int) -> float:
    return min(0.05 * 2**attempt, 0.4)


class ClientCase(TestCase):
    """A client of the shared member, closed after the test."""

    tls = False

    def setUp(self) -> None:
        self.etcd = shared_etcd(tls=self.tls)
        self.client = self.make_client([self.etcd.url])
        self.prefix = unique_prefix()

    def make_client(self, endpoints: list[str], **kwargs: object) -> EtcdClient:
        if self.tls and "tls" not in kwargs:
            kwargs["tls"] = self.etcd.tls.client()  # type: ignore[union-attr]
        kwargs.setdefault("timeout", 2.0)
        client = EtcdClient(endpoints, reactor, **kwargs)  # type: ignore[arg-type]
        self.addCleanup(client.close)
        return client

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()


class KeyValueTests(ClientCase):
    async def test_put_then_get(self) -> None:
        """A put answers the new revision; get returns value and revisions."""
        revision = await self.client.put(self.key("a"), b"one")
        result = await self.client.get(self.key("a"))
        kv = result.single
        assert kv is not None
        self.assertEqual((kv.key, kv.value), (self.key("a"), b"one"))
        self.assertEqual(kv.mod_revision, revision)
        self.assertEqual(kv.create_revision, revision)
        self.assertGreaterEqual(result.revision, revision)

    async def test_get_absent(self) -> None:
        """An absent key reads as no KeyValue, with the store's revision."""
        result = await self.client.get(self.key("nothing"))
        self.assertIsNone(result.single)
        self.assertGreater(result.revision, 0)

    async def test_binary_values(self) -> None:
        """Values are bytes end to end (base64 on the wire)."""
        value = bytes(range(256)) * 4
        await self.client.put(self.key("bin"), value)
        kv = (await self.client.get(self.key("bin"))).single
        self.assertEqual(kv.value if kv else None, value)

    async def test_get_prefix(self) -> None:
        """A prefix read returns its keys in order, not a neighbour's."""
        for name in ("b", "a", "c/d"):
            await self.client.put(self.key("dir/" + name), name.encode())
        await self.client.put(self.key("dir0"), b"neighbour")
        await self.client.put(self.key("dis"), b"neighbour")
        result = await self.client.get_prefix(self.prefix + "dir/")
        self.assertEqual(
            [kv.key for kv in result.kvs],
            [self.key("dir/a"), self.key("dir/b"), self.key("dir/c/d")],
        )

    async def test_delete(self) -> None:
        """delete answers how many keys went; prefix=True takes the subtree."""
        await self.client.put(self.key("x/1"), b"1")
        await self.client.put(self.key("x/2"), b"2")
        await self.client.put(self.key("y"), b"3")
        self.assertEqual(await self.client.delete(self.key("x/1")), 1)
        self.assertEqual(await self.client.delete(self.key("x/1")), 0)
        await self.client.put(self.key("x/3"), b"3")
        self.assertEqual(await self.client.delete(self.key("x/"), prefix=True), 2)
        left = await self.client.get_prefix(self.prefix)
        self.assertEqual([kv.key for kv in left.kvs], [self.key("y")])

    async def test_not_etcd(self) -> None:
        """An endpoint that is not etcd's client port: MalformedAnswer, shown."""
        client = self.make_client([self.etcd.peer_url])
        for call in (client.get(self.key("x")), client.put(self.key("x"), b"x")):
            with self.assertRaises(MalformedAnswer) as caught:
                await call
            self.assertIn(
                "HTTP 404, not a JSON object: b'404 page not found",
                str(caught.exception),
            )

    async def test_status(self) -> None:
        """The member's status names its version (Debian ships 3.4)."""
        status = await self.client.status()
        self.assertRegex(status["version"], r"^3\.\d+\.")


class TransactionTests(ClientCase):
    async def test_compare_mod_revision(self) -> None:
        """A txn on the right revision writes; on a stale one it reads instead."""
        key = self.key("doc")
        first = await self.client.put(key, b"v1")
        won = await self.client.txn(
            [Compare.mod_revision(key, first)], [Put(key, b"v2")], [Range(key)]
        )
        self.assertTrue(won.succeeded)
        self.assertEqual(won.ranges, ())
        lost = await self.client.txn(
            [Compare.mod_revision(key, first)], [Put(key, b"v3")], [Range(key)]
        )
        self.assertFalse(lost.succeeded)
        current = lost.ranges[0].single
        assert current is not None
        self.assertEqual((current.value, current.mod_revision), (b"v2", won.revision))

    async def test_compare_absent(self) -> None:
        """create_revision == 0: only the first creator wins."""
        key = self.key("new")
        first = await self.client.txn([Compare.absent(key)], [Put(key, b"a")])
        second = await self.client.txn([Compare.absent(key)], [Put(key, b"b")])
        self.assertEqual((first.succeeded, second.succeeded), (True, False))
        kv = (await self.client.get(key)).single
        self.assertEqual(kv.value if kv else None, b"a")

    async def test_racing_writers(self) -> None:
        """Two clients write on the same revision at once: exactly one wins."""
        key = self.key("race")
        base = await self.client.put(key, b"base")
        other = self.make_client([self.etcd.url])
        results = await defer.gatherResults(
            [
                c.txn([Compare.mod_revision(key, base)], [Put(key, v)], [Range(key)])
                for c, v in ((self.client, b"A"), (other, b"B"))
            ]
        )
        self.assertEqual(sorted(r.succeeded for r in results), [False, True])
        winner = next(r for r in results if r.succeeded)
        loser = next(r for r in results if not r.succeeded)
        seen = loser.ranges[0].single
        self.assertEqual(seen.mod_revision if seen else None, winner.revision)

    async def test_delete_in_txn(self) -> None:
        """A txn may delete a subtree together with a write."""
        await self.client.put(self.key("t/1"), b"1")
        result = await self.client.txn(
            [], [Delete(self.key("t/"), prefix=True), Put(self.key("u"), b"u")]
        )
        self.assertTrue(result.succeeded)
        self.assertEqual((await self.client.get_prefix(self.prefix + "t/")).kvs, ())


class LeaseTests(ClientCase):
    async def test_grant_keepalive_revoke(self) -> None:
        """Keys under a lease go when it is revoked; a gone lease is typed."""
        lease = await self.client.lease_grant(30)
        self.assertEqual(lease.ttl, 30)
        await self.client.put(self.key("p"), b"here", lease=lease.id)
        kv = (await self.client.get(self.key("p"))).single
        self.assertEqual(kv.lease if kv else None, lease.id)
        self.assertEqual(await self.client.lease_keepalive(lease.id), 30)
        await self.client.lease_revoke(lease.id)
        self.assertIsNone((await self.client.get(self.key("p"))).single)
        with self.assertRaises(LeaseNotFound):
            await self.client.lease_keepalive(lease.id)
        with self.assertRaises(LeaseNotFound):
            await self.client.lease_revoke(lease.id)

    async def test_put_under_unknown_lease(self) -> None:
        """etcd's refusal is an EtcdError with its gRPC code and message."""
        with self.assertRaises(EtcdError) as caught:
            await self.client.put(self.key("p"), b"x", lease=12345)
        self.assertEqual(caught.exception.code, 5)
        self.assertIn("lease not found", str(caught.exception))
        self.assertIn(self.etcd.url, str(caught.exception))

    async def test_expiry_deletes_keys(self) -> None:
        """A lease not kept alive expires and takes its keys (TTL 2 s)."""
        lease = await self.client.lease_grant(2)
        start = await self.client.put(self.key("gone"), b"x", lease=lease.id)
        seen = Collector()
        self.client.watch(self.key("gone"), start + 1, seen, prefix=False)
        began = time.monotonic()
        await seen.wait_for(1, timeout=6)
        self.assertEqual(seen.events[0].type, EventType.DELETE)
        self.assertLess(time.monotonic() - began, 4.0)


class WatchTests(ClientCase):
    async def test_events_in_order(self) -> None:
        """PUT and DELETE events arrive in revision order, with their values."""
        seen = Collector()
        first = await self.client.put(self.key("w/a"), b"1")
        watch = self.client.watch(self.prefix + "w/", first, seen)
        await self.client.put(self.key("w/b"), b"2")
        await self.client.put(self.key("other"), b"not watched")
        await self.client.delete(self.key("w/a"))
        await seen.wait_for(3)
        self.assertEqual(
            seen.summary(),
            [
                ("PUT", self.key("w/a"), b"1"),
                ("PUT", self.key("w/b"), b"2"),
                ("DELETE", self.key("w/a"), b""),
            ],
        )
        revisions = [e.revision for e in seen.events]
        self.assertEqual(revisions, sorted(revisions))
        self.assertEqual(watch.next_revision, revisions[-1] + 1)
        self.assertIs(watch.state, WatchState.WATCHING)

    async def test_from_now(self) -> None:
        """start_revision 0 watches from now: older changes are not replayed."""
        await self.client.put(self.key("old"), b"old")
        seen = Collector()
        watch = self.client.watch(self.prefix, 0, seen)
        await wait_until(lambda: watch.state is WatchState.WATCHING, "created")
        await self.client.put(self.key("new"), b"new")
        await seen.wait_for(1)
        await sleep(0.1)
        self.assertEqual(seen.summary(), [("PUT", self.key("new"), b"new")])

    async def test_cancel(self) -> None:
        """cancel() stops the watch: done fires None, no event after it."""
        seen = Collector()
        watch = self.client.watch(self.prefix, 0, seen)
        await wait_until(lambda: watch.state is WatchState.WATCHING, "created")
        watch.cancel()
        self.assertIsNone(await watch.done)
        await self.client.put(self.key("after"), b"x")
        await sleep(0.2)
        self.assertEqual(seen.events, [])
        self.assertIs(watch.state, WatchState.STOPPED)

    async def test_callback_error_stops(self) -> None:
        """A callback that raises ends the watch with its error, event kept."""

        def explode(event: object) -> None:
            raise ValueError("consumer bug")

        revision = await self.client.put(self.key("k"), b"x")
        watch = self.client.watch(self.prefix, revision, explode)
        with self.assertRaises(ValueError):
            await watch.done.addTimeout(5, reactor)
        self.assertEqual(watch.next_revision, revision)

    async def test_close_cancels_watches(self) -> None:
        """Closing the client stops its watches and refuses calls, typed."""
        watch = self.client.watch(self.prefix, 0, Collector())
        await wait_until(lambda: watch.state is WatchState.WATCHING, "created")
        await self.client.close()
        self.assertIsNone(await watch.done)
        with self.assertRaises(EtcdUnavailable) as caught:
            await self.client.get(self.key("x"))
        self.assertIn("closed", str(caught.exception))


class FailoverTests(ClientCase):
    async def test_dead_endpoint_first(self) -> None:
        """A refused endpoint listed first is skipped, for reads and writes."""
        dead = f"http://127.0.0.1:{free_port()}"
        client = self.make_client([dead, self.etcd.url])
        self.assertEqual(client.endpoint, dead)
        await client.put(self.key("f"), b"via the second")
        self.assertEqual(client.endpoint, self.etcd.url)
        kv = (await client.get(self.key("f"))).single
        self.assertEqual(kv.value if kv else None, b"via the second")

    async def test_watch_fails_over(self) -> None:
        """A watch opens on the live endpoint when the first is dead."""
        dead = f"http://127.0.0.1:{free_port()}"
        client = self.make_client([dead, self.etcd.url])
        seen = Collector()
        watch = client.watch(self.prefix, 0, seen)
        await wait_until(lambda: watch.state is WatchState.WATCHING, "created")
        self.assertEqual(watch.endpoint, self.etcd.url)
        await self.client.put(self.key("w"), b"x")
        await seen.wait_for(1)

    async def test_all_dead(self) -> None:
        """No endpoint answers: EtcdUnavailable names them all, at once."""
        dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
        client = self.make_client(dead)
        began = time.monotonic()
        with self.assertRaises(EtcdUnavailable) as caught:
            await client.put(self.key("x"), b"x")
        self.assertLess(time.monotonic() - began, 1.0)
        error = caught.exception
        self.assertEqual(error.endpoints, tuple(dead))
        self.assertFalse(error.outcome_unknown)  # refused: never sent
        self.assertIn("refused", error.last_error.lower())


class TlsTests(ClientCase):
    tls = True

    async def test_mutual_tls(self) -> None:
        """Reads, writes and watches over TLS with a client certificate."""
        self.assertTrue(self.etcd.url.startswith("https://"))
        seen = Collector()
        self.client.watch(self.prefix, 0, seen)
        await sleep(0.1)
        await self.client.put(self.key("s"), b"secret")
        kv = (await self.client.get(self.key("s"))).single
        self.assertEqual(kv.value if kv else None, b"secret")
        await seen.wait_for(1)

    async def test_certificate_of_another_ca(self) -> None:
        """etcd refuses a client certificate it does not trust: unavailable."""
        pki = test_pki()
        client = self.make_client(
            [self.etcd.url],
            tls=(pki.ca_cert, pki.other_client_cert, pki.other_client_key),
        )
        with self.assertRaises(EtcdUnavailable) as caught:
            await client.put(self.key("x"), b"x")
        # The handshake failed, so the write surely did not happen.
        self.assertFalse(caught.exception.outcome_unknown)

    async def test_server_not_trusted(self) -> None:
        """An etcd whose certificate is not from our CA is never talked to."""
        pki = test_pki()
        client = self.make_client(
            [self.etcd.url],
            tls=(
                pki.other_ca_cert,
                pki.client_cert("operator"),
                pki.client_key("operator"),
            ),
        )
        with self.assertRaises(EtcdUnavailable) as caught:
            await client.get(self.key("x"))
        self.assertIn("certificate", caught.exception.last_error)


class FaultTests(TestCase):
    """etcd killed, restarted, frozen and compacted (a member per test)."""

    def setUp(self) -> None:
        self.prefix = unique_prefix()

    def client_of(self, *urls: str, timeout: float = 2.0) -> EtcdClient:
        client = EtcdClient(list(urls), reactor, timeout=timeout)
        self.addCleanup(client.close)
        return client

    def key(self, name: str) -> bytes:
        return (self.prefix + name).encode()

    async def test_watch_resumes_after_restart(self) -> None:
        """Killed and restarted on its data: the watch misses nothing, twice nothing."""
        etcd = etcd_for_test(self)
        client = self.client_of(etcd.url)
        seen = Collector()
        first = await client.put(self.key("0"), b"0")
        watch = client.watch(self.prefix, first, seen, backoff=fast_backoff)
        await client.put(self.key("1"), b"1")
        await seen.wait_for(2)
        etcd.kill()
        await wait_until(lambda: watch.state is not WatchState.WATCHING, "stream end")
        # Written before the watch can be back (the reactor stands still
        # while etcd restarts and while this writes): it must catch up.
        etcd.restart_blocking()
        etcd.put(self.key("2"), b"2")
        await client.put(self.key("3"), b"3")
        await seen.wait_for(4)
        await sleep(0.2)
        self.assertEqual(
            [(t, v) for t, _, v in seen.summary()],
            [("PUT", b"0"), ("PUT", b"1"), ("PUT", b"2"), ("PUT", b"3")],
        )
        self.assertIs(watch.state, WatchState.WATCHING)
        self.assertGreaterEqual(watch.streams, 2)

    async def test_unavailable_when_down(self) -> None:
        """etcd down: calls fail at once with EtcdUnavailable, typed."""
        etcd = etcd_for_test(self)
        client = self.client_of(etcd.url)
        await client.put(self.key("a"), b"a")
        etcd.kill()
        began = time.monotonic()
        for call in (client.get(self.key("a")), client.put(self.key("a"), b"b")):
            with self.assertRaises(EtcdUnavailable) as caught:
                await call
            self.assertIn(etcd.url, str(caught.exception))
        self.assertLess(time.monotonic() - began, 1.0)

    async def test_frozen_member_times_out(self) -> None:
        """A member that accepts but never answers costs one timeout, no more.

        A read moves on to the next endpoint; a write that was sent is not
        sent again, and says its outcome is unknown.
        """
        etcd = etcd_for_test(self)
        spare = etcd_for_test(self, name="spare")
        client = self.client_of(etcd.url, spare.url, timeout=0.5)
        etcd.freeze()
        self.addCleanup(etcd.thaw)
        began = time.monotonic()
        with self.assertRaises(EtcdUnavailable) as caught:
            await client.put(self.key("w"), b"w")
        self.assertTrue(caught.exception.outcome_unknown)
        self.assertLess(time.monotonic() - began, 1.5)
        # The write moved the preference; a read on the frozen one fails over.
        client._preferred = 0
        began = time.monotonic()
        self.assertIsNone((await client.get(self.key("r"))).single)
        self.assertLess(time.monotonic() - began, 1.5)
        self.assertEqual(client.endpoint, spare.url)

    async def test_idle_watch_reconnects(self) -> None:
        """A watch silent past idle_timeout (a frozen etcd) opens a new stream."""
        etcd = etcd_for_test(self)
        client = self.client_of(etcd.url, timeout=0.5)
        seen = Collector()
        watch = client.watch(
            self.prefix, 0, seen, backoff=fast_backoff, idle_timeout=0.5
        )
        await wait_until(lambda: watch.state is WatchState.WATCHING, "created")
        etcd.freeze()
        await wait_until(lambda: watch.last_error is not None, "idle restart")
        self.assertIn("no message", watch.last_error or "")
        etcd.thaw()
        await client.put(self.key("x"), b"x")
        await seen.wait_for(1)
        self.assertEqual(len(seen.events), 1)

    async def test_watch_compacted(self) -> None:
        """A watch from a compacted revision ends with Compacted(revision)."""
        etcd = etcd_for_test(self)
        client = self.client_of(etcd.url)
        first = await client.put(self.key("a"), b"1")
        await client.put(self.key("a"), b"2")
        compacted = etcd.compact()
        watch = client.watch(self.prefix, first, Collector())
        with self.assertRaises(Compacted) as caught:
            await watch.done.addTimeout(5, reactor)
        self.assertEqual(caught.exception.revision, compacted)
        self.assertIs(watch.state, WatchState.STOPPED)

    async def test_compaction_by_client(self) -> None:
        """compact() drops history: a later watch from before it is refused."""
        etcd = etcd_for_test(self)
        client = self.client_of(etcd.url)
        first = await client.put(self.key("a"), b"1")
        second = await client.put(self.key("a"), b"2")
        await client.compact(second)
        watch = client.watch(self.prefix, first, Collector())
        with self.assertRaises(Compacted):
            await watch.done.addTimeout(5, reactor)

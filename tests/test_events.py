"""Tests for the event feed: ids, history, resuming, the limit digest, expiry."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from threshold.server.certinfo import CertificateInfo
from threshold.server.events import (
    Event,
    EventFeed,
    EventType,
    StreamNotice,
    iso_time,
    matching,
)
from threshold.server.events_sources import EventSources, ExpiryWatch
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable, parse_tunnels
from threshold.server.serving import ServingTable
from threshold.server.stats import GatewayStats, Limit
from threshold.wire.control import Health

DAY = 86400.0
T0 = 1_800_000_000.0


class Recorder:
    """A feed listener that keeps what it is told."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.closed = 0

    def event(self, event: Event) -> None:
        self.events.append(event)

    def feed_closed(self) -> None:
        self.closed += 1

    def types(self) -> list[str]:
        return [e.type for e in self.events]


class FeedTests(SynchronousTestCase):
    """Numbering, history and who is told."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.now = T0
        self.feed = EventFeed(self.clock, lambda: self.now, history=10)

    def test_ids_increase_and_listeners_hear_in_order(self):
        """Each event gets the next id; every listener hears each in order."""
        a, b = Recorder(), Recorder()
        self.feed.listen(a)
        self.feed.listen(b)
        for n in range(3):
            self.feed.emit(EventType.CLIENT_CONNECTED, ClientId=f"c{n}")
        self.assertEqual([e.id for e in a.events], [1, 2, 3])
        self.assertEqual(a.events, b.events)
        self.assertEqual(self.feed.last_id, 3)
        self.assertEqual(self.feed.emitted["client.connected"], 3)

    def test_json_form(self):
        """id, type, UTC time with milliseconds, data."""
        self.now = T0 + 0.25
        event = self.feed.emit(EventType.CLIENT_HEALTH, ClientId="a", Healthy=False)
        self.assertEqual(
            event.to_json(),
            {
                "id": 1,
                "type": "client.health",
                "time": "2027-01-15T08:00:00.250Z",
                "data": {"ClientId": "a", "Healthy": False},
            },
        )
        self.assertEqual(iso_time(T0 + 0.9999), "2027-01-15T08:00:01.000Z")

    def test_a_failing_listener_is_logged_and_others_still_hear(self):
        """One listener raising does not keep the event from the next."""

        class Broken(Recorder):
            def event(self, event: Event) -> None:
                raise ZeroDivisionError("broken on purpose")

        after = Recorder()
        self.feed.listen(Broken())
        self.feed.listen(after)
        self.feed.emit(EventType.CLIENT_CONNECTED)
        self.assertEqual(len(after.events), 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_listening(self):
        """The function listen returns stops the listener."""
        seen = Recorder()
        stop = self.feed.listen(seen)
        stop()
        stop()
        self.feed.emit(EventType.CLIENT_CONNECTED)
        self.assertEqual(seen.events, [])

    def test_history_is_bounded(self):
        """Only the last ``history`` events are kept."""
        for _ in range(25):
            self.feed.emit(EventType.CLIENT_CONNECTED)
        self.assertEqual(self.feed.oldest_id, 16)
        self.assertEqual(len(self.feed.replay(15).events), 10)

    def test_replay_after_an_id_in_the_history(self):
        """A reader resuming after id N gets N+1 onwards, no reset."""
        for _ in range(5):
            self.feed.emit(EventType.CLIENT_CONNECTED)
        replay = self.feed.replay(2)
        self.assertIsNone(replay.reset)
        self.assertEqual([e.id for e in replay.events], [3, 4, 5])
        self.assertEqual(self.feed.replay(5).events, ())
        self.assertEqual(self.feed.replay(None).events, ())

    def test_replay_of_the_oldest_boundary(self):
        """Resuming just before the oldest kept event misses nothing."""
        for _ in range(15):
            self.feed.emit(EventType.CLIENT_CONNECTED)
        replay = self.feed.replay(5)  # oldest kept is 6
        self.assertIsNone(replay.reset)
        self.assertEqual(replay.events[0].id, 6)

    def test_replay_of_an_id_too_old_says_reset(self):
        """An id older than the history: everything kept, and a reset notice."""
        for _ in range(15):
            self.feed.emit(EventType.CLIENT_CONNECTED)
        replay = self.feed.replay(2)
        self.assertEqual([e.id for e in replay.events], list(range(6, 16)))
        reset = replay.reset
        self.assertEqual(reset.type, StreamNotice.RESET.value)
        self.assertEqual(reset.id, 0)
        self.assertEqual(reset.data["OldestId"], 6)
        self.assertEqual(reset.data["RequestedId"], 2)
        self.assertIn("older than the history", reset.data["Reason"])

    def test_replay_of_an_id_from_another_run_says_reset(self):
        """An id newer than the newest (not this gateway's): reset, all kept."""
        self.feed.emit(EventType.CLIENT_CONNECTED)
        replay = self.feed.replay(500)
        self.assertEqual([e.id for e in replay.events], [1])
        self.assertIn("not an id of this gateway", replay.reset.data["Reason"])
        # Before any event at all, too.
        empty = EventFeed(self.clock, lambda: self.now).replay(3)
        self.assertEqual(empty.events, ())
        self.assertIsNone(empty.reset.data["OldestId"])

    def test_ids_increase_across_restarts(self):
        """With the start time as id base, a reader of the previous run is
        told it missed events instead of being given unrelated ones."""
        before = EventFeed(self.clock, lambda: self.now, id_base=1_000_000)
        for _ in range(5):
            before.emit(EventType.CLIENT_CONNECTED)
        reader = before.last_id
        self.assertEqual(reader, 1_000_005)
        after = EventFeed(self.clock, lambda: self.now, id_base=2_000_000)
        self.assertEqual(after.replay(after.last_id).events, ())
        self.assertIsNotNone(after.replay(reader).reset)  # nothing emitted yet
        for _ in range(3):
            after.emit(EventType.CLIENT_CONNECTED)
        replay = after.replay(reader)
        self.assertIn("older than the history", replay.reset.data["Reason"])
        self.assertEqual(
            [e.id for e in replay.events], [2_000_001, 2_000_002, 2_000_003]
        )

    def test_close_tells_listeners_once_and_stops_emitting(self):
        """After close no event is numbered; listeners hear feed_closed once."""
        seen = Recorder()
        self.feed.listen(seen)
        self.feed.close()
        self.feed.close()
        self.assertIsNone(self.feed.emit(EventType.CLIENT_CONNECTED))
        self.assertEqual((seen.closed, seen.events, self.feed.last_id), (1, [], 0))

    def test_matching(self):
        """Wildcard type filters; None matches everything."""
        wants = matching(["client.*", "tunnel.failover"])
        self.assertTrue(wants("client.health"))
        self.assertTrue(wants("tunnel.failover"))
        self.assertFalse(wants("tunnels.applied"))
        self.assertFalse(wants("limit.hit"))
        self.assertTrue(matching(None)("anything"))
        self.assertTrue(matching(["*"])("limit.hit"))


class ReplayPropertyTests(SynchronousTestCase):
    """Whatever the history size, emits and id asked: nothing missed silently."""

    @given(
        history=st.integers(10, 40),
        emitted=st.integers(0, 120),
        after=st.integers(0, 200),
    )
    def test_replay_is_exact_or_says_reset(self, history, emitted, after):
        feed = EventFeed(Clock(), lambda: T0, history=history)
        for _ in range(emitted):
            feed.emit(EventType.CLIENT_CONNECTED)
        replay = feed.replay(after)
        ids = [e.id for e in replay.events]
        kept = list(range(max(1, emitted - history + 1), emitted + 1))
        if after == 0:
            self.assertIsNone(replay.reset)
            self.assertEqual(ids, kept)
        elif after <= emitted and (not kept or after >= kept[0] - 1):
            self.assertIsNone(replay.reset)
            self.assertEqual(ids, list(range(after + 1, emitted + 1)))
        else:
            self.assertIsNotNone(replay.reset)
            self.assertEqual(ids, kept)


class LimitDigestTests(SynchronousTestCase):
    """A flood of refusals is one event per limit per interval, with a count."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.feed = EventFeed(self.clock, lambda: T0, limit_interval=10.0)
        self.seen = Recorder()
        self.feed.listen(self.seen)

    def test_first_hit_at_once_then_one_event_per_interval(self):
        """1 event at the first hit; the next 9999 hits, one event with Count."""
        limits = self.feed.limits
        limits.hit("connections_per_source_ip", Source="192.0.2.1")
        self.assertEqual(len(self.seen.events), 1)
        self.assertEqual(self.seen.events[0].data["Count"], 1)
        for n in range(9999):
            limits.hit("connections_per_source_ip", Source=f"192.0.2.{n % 200}")
        self.assertEqual(len(self.seen.events), 1)
        self.clock.advance(10)
        self.assertEqual(len(self.seen.events), 2)
        summary = self.seen.events[1].data
        self.assertEqual(summary["Count"], 9999)
        self.assertEqual(summary["Limit"], "connections_per_source_ip")
        self.assertEqual(summary["IntervalSeconds"], 10.0)
        # Distinct subjects counted, bounded.
        self.assertEqual(summary["Subjects"], 100)
        self.assertEqual(summary["Source"], "192.0.2.198")

    def test_continued_flood_one_event_per_interval(self):
        """Hits all along: one event every interval, never more."""
        for _ in range(50):
            for _ in range(100):
                self.feed.limits.hit("quota", ClientId="home-a")
            self.clock.advance(1)
        # 1 at once, then one per 10 s of the 50 s.
        counts = [e.data["Count"] for e in self.seen.events]
        self.assertEqual(len(counts), 1 + 5)
        self.assertEqual(sum(counts), 5000)

    def test_quiet_interval_ends_the_digest(self):
        """After a quiet interval the next hit is again an event at once."""
        self.feed.limits.hit("quota")
        self.clock.advance(10)  # nothing counted meanwhile: no event
        self.assertEqual(len(self.seen.events), 1)
        self.assertEqual(self.feed.limits.pending(), {})
        self.feed.limits.hit("quota")
        self.assertEqual(len(self.seen.events), 2)

    def test_limits_are_digested_apart(self):
        """Each limit has its own interval."""
        self.feed.limits.hit("quota")
        self.feed.limits.hit("bandwidth")
        self.assertEqual(
            [e.data["Limit"] for e in self.seen.events], ["quota", "bandwidth"]
        )

    def test_close_cancels_the_timers(self):
        """A closed feed leaves no delayed call behind."""
        self.feed.limits.hit("quota")
        self.feed.limits.hit("quota")
        self.feed.close()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.feed.limits.hit("quota")
        self.assertEqual(len(self.seen.events), 1)


class ExpiryTests(SynchronousTestCase):
    """Certificates ending within 30 days, announced at most once a day."""

    def setUp(self) -> None:
        self.now = T0
        self.feed = EventFeed(Clock(), lambda: self.now)
        self.seen = Recorder()
        self.feed.listen(self.seen)
        self.watch = ExpiryWatch(self.feed, lambda: self.now)

    def test_far_away_is_quiet(self):
        """31 days left: nothing."""
        self.assertFalse(self.watch.check("server", None, T0 + 31 * DAY))
        self.assertFalse(self.watch.check("client", "a", None))
        self.assertEqual(self.seen.events, [])

    def test_within_30_days_once_a_day(self):
        """Announced at once, then not again until a day later."""
        end = T0 + 29.5 * DAY
        self.assertTrue(self.watch.check("server", None, end, "CN=gw"))
        self.assertFalse(self.watch.check("server", None, end, "CN=gw"))
        self.now += DAY - 1
        self.assertFalse(self.watch.check("server", None, end, "CN=gw"))
        self.now += 1
        self.assertTrue(self.watch.check("server", None, end, "CN=gw"))
        first = self.seen.events[0].data
        self.assertEqual(first["Certificate"], "server")
        self.assertEqual(first["Subject"], "CN=gw")
        self.assertEqual(first["DaysLeft"], 29.5)
        self.assertFalse(first["Expired"])
        self.assertEqual(first["NotAfter"], "2027-02-13T20:00:00Z")

    def test_renewed_certificate_is_announced_anew(self):
        """Another end date for the same subject is not held back."""
        self.watch.check("client", "a", T0 + 2 * DAY)
        self.assertTrue(self.watch.check("client", "a", T0 + 20 * DAY))
        self.assertEqual([e.data["ClientId"] for e in self.seen.events], ["a", "a"])

    def test_expired(self):
        """A certificate already ended says so."""
        self.watch.check("client", "a", T0 - DAY)
        self.assertTrue(self.seen.events[0].data["Expired"])
        self.assertEqual(self.seen.events[0].data["DaysLeft"], -1.0)


class FakeSession:
    """What the registry and serving table read of a session."""

    def __init__(self) -> None:
        self.streams = {1: object()}
        self.rtt = None
        self.went_away = 0

    def go_away(self, code: int) -> None:
        self.went_away += 1


class FakePort:
    def stopListening(self) -> Any:
        return succeed(None)


def listen(host: str, port: int, factory: object) -> Any:
    return succeed(FakePort())


class SourcesTests(SynchronousTestCase):
    """What the registry, serving table, route table and counters report
    becomes events, in order."""

    def setUp(self) -> None:
        self.now = T0
        self.clock = Clock()
        self.feed = EventFeed(self.clock, lambda: self.now)
        self.seen = Recorder()
        self.feed.listen(self.seen)
        self.registry = ClientRegistry(wall_clock=lambda: self.now)
        self.stats = GatewayStats()
        self.serving = ServingTable(self.registry, self.stats)
        self.routes = RouteTable(listen, lambda key: Factory(), self.serving.update)
        self.server_cert = CertificateInfo(T0 + 10 * DAY, "CN=gateway")
        self.sources = EventSources(
            self.feed,
            self.registry,
            self.serving,
            self.routes,
            self.stats,
            self.server_cert,
            check_interval=3600,
        )

    def put(self, entries: list[dict[str, Any]]) -> None:
        self.successResultOf(self.routes.apply(parse_tunnels(entries)))

    def test_client_life(self):
        """Connected, health flipped both ways, replaced, disconnected."""
        first = FakeSession()
        self.registry.connected(
            "home-a", first, "192.0.2.1:1000", certificate_not_after=T0 + 90 * DAY
        )
        health = Health({"web": False}, {"web": "connection refused at 127.0.0.1:8080"})
        self.registry.health_reported("home-a", first, health)
        self.registry.health_reported("home-a", first, health)  # no change
        self.registry.health_reported("home-a", first, Health({"web": True}, {}))
        second = FakeSession()
        self.registry.connected("home-a", second, "192.0.2.1:1001")
        self.registry.disconnected("home-a", second, ConnectionLost("reset"))
        self.assertEqual(
            self.seen.types(),
            [
                "client.connected",
                "client.health",
                "client.health",
                "client.replaced",
                "client.disconnected",
            ],
        )
        connected, unhealthy, healthy, replaced, gone = (
            e.data for e in self.seen.events
        )
        self.assertEqual(
            connected,
            {
                "ClientId": "home-a",
                "Peer": "192.0.2.1:1000",
                "Connections": 1,
                "CertificateNotAfter": "2027-04-15T08:00:00Z",
            },
        )
        self.assertEqual(
            unhealthy,
            {
                "ClientId": "home-a",
                "Service": "web",
                "Healthy": False,
                "Detail": "connection refused at 127.0.0.1:8080",
            },
        )
        self.assertTrue(healthy["Healthy"])
        self.assertIsNone(healthy["Detail"])
        self.assertEqual(replaced["OldPeer"], "192.0.2.1:1000")
        self.assertEqual(replaced["Peer"], "192.0.2.1:1001")
        self.assertEqual(gone["State"], "ClientError")
        self.assertIn("reset", gone["Error"])

    def test_clean_disconnect_has_no_error(self):
        """A clean end is ClientClosed with Error null."""
        session = FakeSession()
        self.registry.connected("a", session, "192.0.2.1:1")
        self.registry.disconnected("a", session, ConnectionDone())
        gone = self.seen.events[-1].data
        self.assertEqual((gone["State"], gone["Error"]), ("ClientClosed", None))

    def test_tunnels_applied_with_revision_and_counts(self):
        """Each switch: its revision and what was added, removed, changed."""
        web = {"ClientId": "a", "ListenPort": 8443, "BackEndService": "web"}
        ssh = {"ClientId": "a", "ListenPort": 2222, "BackEndService": "ssh"}
        self.put([web, ssh])
        self.put([dict(web, BackEndService="web2")])
        first, second = (e.data for e in self.seen.events)
        self.assertEqual(
            first,
            {
                "Revision": 1,
                "Tunnels": 2,
                "Groups": 2,
                "Added": 2,
                "Removed": 0,
                "Changed": 0,
            },
        )
        self.assertEqual(
            (second["Revision"], second["Added"], second["Removed"], second["Changed"]),
            (2, 0, 1, 1),
        )

    def test_failover(self):
        """The serving client of a failover tunnel goes: tunnel, from, to, why."""
        for client_id in ("a", "b"):
            self.registry.connected(
                client_id, FakeSession(), f"192.0.2.9:{len(client_id)}"
            )
        entry = {
            "ClientIds": ["a", "b"],
            "ListenPort": 8443,
            "BackEndService": "web",
            "Balance": "failover",
        }
        self.put([entry])
        session = self.registry.session_for("a")
        self.registry.disconnected("a", session, ConnectionLost("keepalive timeout"))
        [failover] = [e for e in self.seen.events if e.type == "tunnel.failover"]
        self.assertEqual(failover.data["From"], "a")
        self.assertEqual(failover.data["To"], "b")
        self.assertEqual(failover.data["Tunnel"]["ListenPort"], 8443)
        self.assertIn("keepalive timeout", failover.data["Reason"])
        # The failover event comes after the disconnection that caused it.
        types = self.seen.types()
        self.assertLess(
            types.index("client.disconnected"), types.index("tunnel.failover")
        )

    def test_limit_hits_become_digested_events(self):
        """GatewayStats.limit_hit: counted, and one event per interval."""
        key = ("127.0.0.1", 8443, "*")
        for _ in range(500):
            self.stats.limit_hit(
                Limit.NEW_CONNECTION_RATE, tunnel=key, source="192.0.2.7"
            )
        self.assertEqual(self.stats.limits_hit[Limit.NEW_CONNECTION_RATE], 500)
        [first] = self.seen.events
        self.assertEqual(
            first.data,
            {
                "Limit": "new_connection_rate",
                "Count": 1,
                "Subjects": 1,
                "IntervalSeconds": 10.0,
                "Tunnel": "127.0.0.1:8443",
                "Source": "192.0.2.7",
            },
        )
        self.clock.advance(10)
        self.assertEqual(self.seen.events[-1].data["Count"], 499)
        self.stats.limit_hit(Limit.PENDING_HANDSHAKES)  # no context at all
        self.stats.limit_hit(Limit.QUOTA, client="home-a")
        self.assertEqual(self.seen.events[-1].data["ClientId"], "home-a")

    def test_certificates_checked_at_hello_and_periodically(self):
        """A client's certificate at its hello; server and clients each hour."""
        self.sources.start()
        [server] = self.seen.events
        self.assertEqual(server.data["Certificate"], "server")
        self.registry.connected(
            "a", FakeSession(), "192.0.2.1:1", certificate_not_after=T0 + 3 * DAY
        )
        self.assertEqual(
            self.seen.types(),
            ["certificate.expiring", "client.connected", "certificate.expiring"],
        )
        # Hourly checks within the day: nothing new.
        self.clock.advance(3600)
        self.assertEqual(len(self.seen.events), 3)
        self.now += DAY
        self.clock.advance(3600)
        self.assertEqual(
            sorted(e.data["Certificate"] for e in self.seen.events[3:]),
            ["client", "server"],
        )
        self.sources.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])


class CertInfoTests(SynchronousTestCase):
    """Reading certificates' end dates (server/certinfo.py)."""

    def test_read_file(self):
        """The first certificate of a PEM file; None when unreadable."""
        from cryptography import x509

        from tests.certs import test_pki
        from threshold.server.certinfo import read_file

        pki = test_pki()
        with open(pki.server_cert, "rb") as f:
            cert = x509.load_pem_x509_certificate(f.read())
        info = read_file(pki.server_cert)
        self.assertEqual(info.not_after, cert.not_valid_after_utc.timestamp())
        self.assertEqual(info.subject, "CN=localhost")
        self.assertIsNone(read_file(self.mktemp()))
        garbage = self.mktemp()
        with open(garbage, "wb") as f:
            f.write(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
        self.assertIsNone(read_file(garbage))

    def test_from_transport(self):
        """The peer certificate of a TLS transport; None without one."""
        from OpenSSL import crypto

        from tests.certs import test_pki
        from threshold.server.certinfo import from_transport, read_file

        pki = test_pki()
        with open(pki.client_cert("TestClient1"), "rb") as f:
            x509 = crypto.load_certificate(crypto.FILETYPE_PEM, f.read())

        class Tls:
            def __init__(self, cert: Any) -> None:
                self.cert = cert

            def getPeerCertificate(self) -> Any:  # noqa: N802
                return self.cert

        info = from_transport(Tls(x509))
        self.assertEqual(info, read_file(pki.client_cert("TestClient1")))
        self.assertIsNone(from_transport(Tls(None)))
        self.assertIsNone(from_transport(object()))
        self.assertEqual(info.not_after_iso[-1], "Z")

"""Tests for threshold.server.routes: glob precedence, all-or-nothing apply."""

from __future__ import annotations

import errno
import socket

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    TCP6ServerEndpoint,
)
from twisted.internet.error import CannotListenError, ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from threshold.server.routes import (
    RouteTable,
    Tunnel,
    TunnelError,
    needs_sni,
    select_route,
)


def tunnel(
    glob: str = "*",
    port: int = 9000,
    client: str = "TestClient1",
    service: str = "fooService",
    address: str = "127.0.0.1",
) -> Tunnel:
    return Tunnel(
        client_ids=(client,),
        listen_address=address,
        listen_port=port,
        hostname_glob=glob,
        backend_service=service,
        proxy_protocol=False,
    )


labels = st.text(alphabet="abcxyz019-", min_size=1, max_size=4).filter(
    lambda s: s[0] != "-" and s[-1] != "-"
)
names = st.lists(labels, min_size=1, max_size=4).map(".".join)


def reference_match(glob: str, name: str) -> bool:
    """Label-wise wildcard semantics, written independently of the module."""
    if glob == name:
        return True
    if not glob.startswith("*."):
        return False
    suffix = glob.split(".")[1:]
    have = name.split(".")
    return len(have) > len(suffix) and have[-len(suffix) :] == suffix


def reference_select(globs: list[str], name: str | None) -> str | None:
    if name:
        name = name.lower().rstrip(".")
        if name in globs:
            return name
        wild = [g for g in globs if g != "*" and reference_match(g, name)]
        if wild:
            return max(wild, key=lambda g: len(g.split(".")))
    return "*" if "*" in globs else None


@st.composite
def glob_sets(draw, with_name: bool = False) -> tuple[list[str], str]:
    """A name and unique globs, many of them related to the name (with
    ``with_name``, always the name itself among them)."""
    name = draw(names)
    parts = name.split(".")
    related = [name] + ["*." + ".".join(parts[i:]) for i in range(1, len(parts))]
    candidates = draw(
        st.lists(st.sampled_from(related) | names.map(lambda n: "*." + n) | names)
    )
    if with_name:
        candidates.append(name)
    if draw(st.booleans()):
        candidates.append("*")
    globs = list(dict.fromkeys(candidates))
    return draw(st.permutations(globs)), name


def entries_for(globs: list[str]) -> list[Tunnel]:
    return [tunnel(glob=g, service=f"s{i}") for i, g in enumerate(globs)]


class SelectRouteTests(SynchronousTestCase):
    """select_route picks the most specific glob of a group."""

    @given(glob_sets())
    def test_matches_reference(self, case):
        """The choice equals an independent label-wise reference."""
        globs, name = case
        chosen = select_route(entries_for(globs), name)
        expected = reference_select(globs, name)
        self.assertEqual(chosen.hostname_glob if chosen else None, expected)

    @given(glob_sets(with_name=True))
    def test_exact_wins(self, case):
        """An exact name always wins over any wildcard and '*'."""
        globs, name = case
        chosen = select_route(entries_for(globs), name)
        self.assertEqual(chosen.hostname_glob, name)

    @given(glob_sets())
    def test_star_only_when_nothing_matches(self, case):
        """'*' is chosen only when no other glob matches the name."""
        globs, name = case
        chosen = select_route(entries_for(globs), name)
        others = [g for g in globs if g != "*" and reference_match(g, name)]
        self.assertEqual(
            chosen is not None and chosen.hostname_glob == "*",
            bool("*" in globs and not others),
        )

    @given(glob_sets(), st.booleans(), st.data())
    def test_case_and_trailing_dot(self, case, dot, data):
        """Names compare case-insensitively and ignore a trailing dot."""
        globs, name = case
        mixed = "".join(c.upper() if data.draw(st.booleans()) else c for c in name) + (
            "." if dot else ""
        )
        entries = entries_for(globs)
        self.assertIs(select_route(entries, mixed), select_route(entries, name))

    @given(st.lists(st.sampled_from(["*.example.com", "a.example.com", "*"])))
    def test_no_name(self, globs):
        """Without SNI the '*' entry is chosen, or nothing."""
        globs = list(dict.fromkeys(globs))
        entries = entries_for(globs)
        for name in (None, ""):
            chosen = select_route(entries, name)
            if "*" in globs:
                self.assertEqual(chosen.hostname_glob, "*")
            else:
                self.assertIsNone(chosen)

    def test_longer_wildcard_wins(self):
        """A longer wildcard beats a shorter one, whatever the order."""
        short, long_ = tunnel("*.example.com"), tunnel("*.b.example.com")
        for entries in ([short, long_], [long_, short]):
            self.assertIs(select_route(entries, "a.b.example.com"), long_)
            self.assertIs(select_route(entries, "a.c.example.com"), short)

    def test_wildcard_needs_a_label(self):
        """'*.example.com' matches names below it, not example.com itself."""
        wild = tunnel("*.example.com")
        self.assertIs(select_route([wild], "a.example.com"), wild)
        self.assertIs(select_route([wild], "a.b.example.com"), wild)
        self.assertIsNone(select_route([wild], "example.com"))
        self.assertIsNone(select_route([wild], "badexample.com"))
        self.assertIsNone(select_route([wild], ".example.com"))

    def test_needs_sni(self):
        """Only a group of one '*' entry forwards without reading."""
        self.assertFalse(needs_sni([tunnel("*")]))
        self.assertFalse(needs_sni([tunnel("")]))
        self.assertTrue(needs_sni([tunnel("a.example.com")]))
        self.assertTrue(needs_sni([tunnel("a.example.com"), tunnel("*")]))
        self.assertFalse(needs_sni([]))


class FakePort:
    """An IListeningPort stand-in whose stopListening can be held."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stopped = False
        self.stop_result: Deferred[None] | None = None

    def stopListening(self) -> Deferred[None]:
        self.stopped = True
        return self.stop_result if self.stop_result is not None else succeed(None)


class FakeListen:
    """Records listen calls; fails or holds chosen ports."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []
        self.ports: dict[tuple[str, int], FakePort] = {}
        self.fail: dict[int, OSError] = {}
        self.hold: dict[int, Deferred[FakePort]] = {}

    def __call__(self, host: str, port: int, factory: object) -> Deferred[FakePort]:
        self.calls.append((host, port))
        if port in self.fail:
            return Deferred.fromCoroutine(self._raise(host, port))
        if port in self.hold:
            return self.hold[port]
        p = self.ports[(host, port)] = FakePort(host, port)
        return succeed(p)

    async def _raise(self, host: str, port: int) -> FakePort:
        raise CannotListenError(host, port, self.fail[port])


class RouteTableFakeTests(SynchronousTestCase):
    """RouteTable logic with a fake listen function."""

    def setUp(self) -> None:
        self.listen = FakeListen()
        self.factories: list[tuple[str, int]] = []

        def make_factory(key):
            self.factories.append(key)
            return Factory.forProtocol(Protocol)

        self.switched: list[list[Tunnel]] = []
        self.table = RouteTable(self.listen, make_factory, self.switched.append)

    def test_apply_groups(self):
        """Apply opens one socket per group and exposes the entries per group."""
        tunnels = [tunnel("a.example.com"), tunnel("*"), tunnel(port=9001)]
        self.assertEqual(self.successResultOf(self.table.apply(tunnels)), tunnels)
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9000), ("127.0.0.1", 9001)])
        self.assertEqual(self.factories, self.listen.calls)
        self.assertEqual(self.table.group(("127.0.0.1", 9000)), tuple(tunnels[:2]))
        self.assertEqual(self.table.group(("127.0.0.1", 9001)), (tunnels[2],))
        self.assertEqual(self.table.group(("127.0.0.1", 9002)), ())
        self.assertEqual(self.table.tunnels(), tunnels)
        self.assertIs(
            self.table.listening_port(("127.0.0.1", 9001)),
            self.listen.ports[("127.0.0.1", 9001)],
        )

    def test_client_not_connected_accepted(self):
        """A client that is not connected (or never seen) is no error: the
        socket listens all the same."""
        t = [tunnel(client="Nobody")]
        self.assertEqual(self.successResultOf(self.table.apply(t)), t)
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9000)])

    def test_switch_reported(self):
        """Each switch (apply, restore, close) tells on_switch the set in force;
        a failed apply tells nothing."""
        first = [tunnel()]
        self.successResultOf(self.table.apply(first))
        self.listen.fail = {9001: OSError(errno.EADDRINUSE, "in use")}
        self.failureResultOf(self.table.apply([tunnel(port=9001)]), TunnelError)
        self.listen.fail = {}
        self.successResultOf(self.table.restore([tunnel(port=9002)]))
        self.successResultOf(self.table.close())
        self.assertEqual(self.switched, [first, [tunnel(port=9002)], []])

    def test_switch_listener_failure_logged(self):
        """A failing on_switch does not fail the apply; it is logged."""

        def broken(tunnels):
            raise ZeroDivisionError("broken on purpose")

        table = RouteTable(self.listen, lambda key: Factory(), broken)
        self.assertEqual(self.successResultOf(table.apply([tunnel()])), [tunnel()])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_duplicates_refused(self):
        """apply refuses duplicate routes too, before binding anything."""
        failure = self.failureResultOf(
            self.table.apply([tunnel(), tunnel(client="TestClient2")]), TunnelError
        )
        self.assertEqual((failure.value.status, failure.value.index), (400, 1))
        self.assertEqual(self.listen.calls, [])

    def test_bind_error_messages(self):
        """Bind errors are 409 with the address and the real reason."""
        cases = {
            errno.EADDRINUSE: ("address 127.0.0.1:9001 already in use", "ListenPort"),
            errno.EADDRNOTAVAIL: ("not available on this host", "ListenAddress"),
            errno.EACCES: ("permission denied (ports below 1024", "ListenPort"),
            errno.EINVAL: ("cannot listen", "ListenPort"),
        }
        for code, (text, field) in cases.items():
            self.listen.fail = {9001: OSError(code, "boom")}
            failure = self.failureResultOf(
                self.table.apply([tunnel(), tunnel(port=9001)]), TunnelError
            )
            self.assertEqual(
                (failure.value.status, failure.value.index, failure.value.field),
                (409, 1, field),
            )
            self.assertIn(text, failure.value.message)

    def test_ipv6_address_in_message(self):
        """An IPv6 address is written in brackets."""
        self.listen.fail = {9001: OSError(errno.EADDRINUSE, "in use")}
        failure = self.failureResultOf(
            self.table.apply([tunnel(port=9001, address="::1")]), TunnelError
        )
        self.assertIn("address [::1]:9001 already in use", failure.value.message)

    def test_failed_bind_closes_opened(self):
        """A failed bind closes the sockets this apply opened, keeps the old ones."""
        self.successResultOf(self.table.apply([tunnel()]))
        old = self.table.listening_port(("127.0.0.1", 9000))
        self.listen.fail = {9002: OSError(errno.EADDRINUSE, "in use")}
        self.failureResultOf(
            self.table.apply([tunnel(port=9001), tunnel(port=9002)]), TunnelError
        )
        self.assertTrue(self.listen.ports[("127.0.0.1", 9001)].stopped)
        self.assertFalse(old.stopped)
        self.assertIs(self.table.listening_port(("127.0.0.1", 9000)), old)
        self.assertIsNone(self.table.listening_port(("127.0.0.1", 9001)))
        self.assertEqual(self.table.tunnels(), [tunnel()])

    def test_unexpected_listen_error(self):
        """An unexpected listen error propagates and closes what was opened."""

        def listen(host, port, factory):
            if port == 9001:
                raise RuntimeError("surprise")
            return self.listen(host, port, factory)

        table = RouteTable(listen, lambda key: Factory())
        self.failureResultOf(table.apply([tunnel(), tunnel(port=9001)]), RuntimeError)
        self.assertTrue(self.listen.ports[("127.0.0.1", 9000)].stopped)
        self.assertEqual(table.tunnels(), [])

    def test_unchanged_group_kept(self):
        """A group in both sets keeps its port; new entries show at once."""
        self.successResultOf(self.table.apply([tunnel(), tunnel(port=9001)]))
        port = self.table.listening_port(("127.0.0.1", 9000))
        moved = [tunnel(client="TestClient2", service="bar"), tunnel("x.example.com")]
        self.successResultOf(self.table.apply(moved))
        self.assertIs(self.table.listening_port(("127.0.0.1", 9000)), port)
        self.assertFalse(port.stopped)
        self.assertEqual(self.table.group(("127.0.0.1", 9000)), tuple(moved))
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9000), ("127.0.0.1", 9001)])

    def test_removed_group_stops(self):
        """A group no longer present stops listening, and apply waits for it."""
        self.successResultOf(self.table.apply([tunnel(), tunnel(port=9001)]))
        gone = self.listen.ports[("127.0.0.1", 9001)]
        gone.stop_result = Deferred()
        d = self.table.apply([tunnel()])
        self.assertNoResult(d)
        self.assertTrue(gone.stopped)
        # The table has switched already; only the socket close is pending.
        self.assertEqual(self.table.group(("127.0.0.1", 9001)), ())
        gone.stop_result.callback(None)
        self.assertEqual(self.successResultOf(d), [tunnel()])
        self.assertIsNone(self.table.listening_port(("127.0.0.1", 9001)))

    def test_stop_failure_logged(self):
        """A socket that fails to close is logged; the apply still succeeds."""
        self.successResultOf(self.table.apply([tunnel(port=9001)]))
        gone = self.listen.ports[("127.0.0.1", 9001)]
        gone.stop_result = Deferred()
        d = self.table.apply([])
        gone.stop_result.errback(RuntimeError("close failed"))
        self.assertEqual(self.successResultOf(d), [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_applies_serialize(self):
        """A second apply waits until the first one has finished."""
        self.listen.hold = {9001: Deferred()}
        first = self.table.apply([tunnel(port=9001)])
        second = self.table.apply([tunnel(port=9002)])
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9001)])
        self.assertNoResult(first)
        self.assertNoResult(second)
        held = FakePort("127.0.0.1", 9001)
        self.listen.hold.pop(9001).callback(held)
        self.assertEqual(self.successResultOf(first), [tunnel(port=9001)])
        self.assertEqual(self.successResultOf(second), [tunnel(port=9002)])
        self.assertEqual(self.listen.calls, [("127.0.0.1", 9001), ("127.0.0.1", 9002)])
        self.assertTrue(held.stopped)

    def test_close(self):
        """close stops every socket and empties the table."""
        self.successResultOf(self.table.apply([tunnel(), tunnel(port=9001)]))
        ports = list(self.listen.ports.values())
        self.successResultOf(self.table.close())
        self.assertTrue(all(p.stopped for p in ports))
        self.assertEqual(self.table.tunnels(), [])
        self.assertEqual(self.table.group(("127.0.0.1", 9000)), ())

    def test_persist_before_switch(self):
        """A set is saved after its sockets bind and before it is in force."""
        saved: list[list[Tunnel]] = []
        held: list[Deferred[None]] = []

        def persist(tunnels):
            saved.append(tunnels)
            # Saved with the new sockets bound, the old set still in force.
            self.assertIn(("127.0.0.1", 9001), self.listen.ports)
            self.assertEqual(self.table.tunnels(), [])
            held.append(Deferred())
            return held[-1]

        d = self.table.apply([tunnel(port=9001)], persist=persist)
        self.assertEqual(saved, [[tunnel(port=9001)]])
        self.assertNoResult(d)
        self.assertEqual(self.table.tunnels(), [])
        held[0].callback(None)
        self.assertEqual(self.successResultOf(d), [tunnel(port=9001)])
        self.assertEqual(self.table.tunnels(), [tunnel(port=9001)])

    def test_persist_failure_cancels_apply(self):
        """A set that cannot be saved is not applied; new sockets close."""
        self.successResultOf(self.table.apply([tunnel()]))
        old = self.table.listening_port(("127.0.0.1", 9000))

        def persist(tunnels):
            raise TunnelError(503, "cannot save")

        failure = self.failureResultOf(
            self.table.apply([tunnel(port=9001)], persist=persist), TunnelError
        )
        self.assertEqual(failure.value.status, 503)
        self.assertTrue(self.listen.ports[("127.0.0.1", 9001)].stopped)
        self.assertFalse(old.stopped)
        self.assertEqual(self.table.tunnels(), [tunnel()])

    def test_persist_not_called_on_refusal(self):
        """A refused set (bind error) is never saved."""
        saved = []
        self.listen.fail = {9001: OSError(errno.EADDRINUSE, "in use")}
        self.failureResultOf(
            self.table.apply([tunnel(port=9001)], persist=saved.append), TunnelError
        )
        self.assertEqual(saved, [])

    def test_saves_in_apply_order(self):
        """Concurrent applies save one at a time, in order: the last set asked
        for is the last saved and the one in force."""
        saved: list[list[Tunnel]] = []
        held: list[Deferred[None]] = []

        def persist(tunnels):
            saved.append(tunnels)
            held.append(Deferred())
            return held[-1]

        first = self.table.apply([tunnel(port=9001)], persist=persist)
        second = self.table.apply([tunnel(port=9002)], persist=persist)
        # The second save waits for the first apply to finish.
        self.assertEqual(len(saved), 1)
        held[0].callback(None)
        self.assertEqual(len(saved), 2)
        held[1].callback(None)
        self.successResultOf(first)
        self.successResultOf(second)
        self.assertEqual(saved, [[tunnel(port=9001)], [tunnel(port=9002)]])
        self.assertEqual(self.table.tunnels(), [tunnel(port=9002)])

    def test_restore_group_by_group(self):
        """A saved group that cannot bind is left out and reported; the
        others serve, in their saved order."""
        self.listen.fail = {9001: OSError(errno.EADDRINUSE, "in use")}
        saved = [
            tunnel(port=9000),
            tunnel("a.example.com", port=9001),
            tunnel(port=9002, client="Gone"),
            tunnel("b.example.com", port=9001),
        ]
        failed = self.successResultOf(self.table.restore(saved))
        self.assertEqual(self.table.tunnels(), [saved[0], saved[2]])
        self.assertEqual(self.table.not_restored(), failed)
        self.assertEqual([f.index for f in failed], [1, 3])
        self.assertEqual([f.tunnel for f in failed], [saved[1], saved[3]])
        self.assertEqual(
            failed[0].to_json(),
            {
                "Index": 1,
                "Tunnel": saved[1].to_json(),
                "Error": "entry 1: address 127.0.0.1:9001 already in use",
                "Field": "ListenPort",
            },
        )
        self.assertEqual(self.table.group(("127.0.0.1", 9001)), ())

    def test_apply_clears_restore_failures(self):
        """Once an operator applies a set, the restore's failures are gone."""
        self.listen.fail = {9001: OSError(errno.EADDRINUSE, "in use")}
        self.successResultOf(self.table.restore([tunnel(port=9001)]))
        self.assertEqual(len(self.table.not_restored()), 1)
        # A refused apply keeps them: the set in force did not change.
        self.failureResultOf(self.table.apply([tunnel(port=9001)]), TunnelError)
        self.assertEqual(len(self.table.not_restored()), 1)
        self.successResultOf(self.table.apply([tunnel(port=9000)]))
        self.assertEqual(self.table.not_restored(), [])

    def test_restore_all_failing(self):
        """Nothing bindable: an empty table, every entry reported."""
        self.listen.fail = {9000: OSError(errno.EACCES, "no")}
        failed = self.successResultOf(
            self.table.restore([tunnel(), tunnel("x.example.com")])
        )
        self.assertEqual(self.table.tunnels(), [])
        self.assertEqual(len(failed), 2)
        self.assertIn("permission denied", failed[0].error.message)

    def test_input_list_copied(self):
        """Changing the list passed to apply afterwards changes nothing."""
        given_list = [tunnel()]
        self.successResultOf(self.table.apply(given_list))
        given_list.append(tunnel(port=9001))
        self.assertEqual(self.table.tunnels(), [tunnel()])


def real_listen(host: str, port: int, factory) -> Deferred:
    endpoint_type = TCP6ServerEndpoint if ":" in host else TCP4ServerEndpoint
    return endpoint_type(reactor, port, interface=host).listen(factory)


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class WhoProtocol(Protocol):
    """Answers with the client id the group routes to, then closes."""

    def connectionMade(self) -> None:
        entries = self.factory.table.group(self.factory.key)
        chosen = select_route(entries, None)
        self.transport.write((chosen.client_id if chosen else "none").encode())
        self.transport.loseConnection()


class Reader(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.done.callback(self.data)


async def fetch(port: int) -> bytes:
    """Connect to a loopback port and read until the server closes."""
    reader = Reader()
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5)
    await endpoint.connect(Factory.forProtocol(lambda: reader))
    return await reader.done


async def refused(port: int) -> bool:
    """Whether a connection to a loopback port is refused."""
    try:
        await fetch(port)
    except ConnectionRefusedError:
        return True
    return False


class RouteTableSocketTests(TestCase):
    """RouteTable with real loopback sockets."""

    def setUp(self) -> None:
        def make_factory(key):
            factory = Factory.forProtocol(WhoProtocol)
            factory.table, factory.key = self.table, key
            return factory

        self.table = RouteTable(real_listen, make_factory)
        self.addCleanup(self.table.close)

    async def test_apply_opens_sockets(self):
        """Applied groups accept connections routed by the table."""
        p1, p2 = free_port(), free_port()
        await self.table.apply([tunnel(port=p1), tunnel(port=p2, client="TestClient2")])
        self.assertEqual(await fetch(p1), b"TestClient1")
        self.assertEqual(await fetch(p2), b"TestClient2")

    async def test_ipv6_group(self):
        """An IPv6 ListenAddress listens on that address."""
        try:
            port = free_port("::1")
        except OSError:
            self.skipTest("no IPv6 loopback")
        await self.table.apply([tunnel(port=port, address="::1")])
        host = self.table.listening_port(("::1", port)).getHost()
        self.assertEqual((host.host, host.port), ("::1", port))

    async def test_failed_apply_keeps_previous(self):
        """A port in use fails the apply with 409; the old set stays, new closed."""
        kept, fresh = free_port(), free_port()
        await self.table.apply([tunnel(port=kept)])
        old = self.table.listening_port(("127.0.0.1", kept))
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        busy_port = busy.getsockname()[1]
        new = [
            tunnel(port=kept, client="TestClient2"),
            tunnel(port=fresh),
            tunnel(port=busy_port),
        ]
        with self.assertRaises(TunnelError) as cm:
            await self.table.apply(new)
        self.assertEqual((cm.exception.status, cm.exception.index), (409, 2))
        self.assertIn(
            f"address 127.0.0.1:{busy_port} already in use", cm.exception.message
        )
        self.assertTrue(await refused(fresh))
        self.assertIsNone(self.table.listening_port(("127.0.0.1", fresh)))
        self.assertIs(self.table.listening_port(("127.0.0.1", kept)), old)
        self.assertEqual(self.table.tunnels(), [tunnel(port=kept)])
        self.assertEqual(await fetch(kept), b"TestClient1")

    async def test_address_not_available(self):
        """An address this host does not have is 409 saying so."""
        with self.assertRaises(TunnelError) as cm:
            await self.table.apply([tunnel(port=free_port(), address="192.0.2.1")])
        self.assertEqual(
            (cm.exception.status, cm.exception.field), (409, "ListenAddress")
        )
        self.assertIn("not available on this host", cm.exception.message)

    async def test_unknown_client_listens(self):
        """A client never seen is no error: its tunnel's socket listens."""
        port = free_port()
        await self.table.apply([tunnel(port=port, client="Nobody")])
        self.assertEqual(await fetch(port), b"Nobody")

    async def test_removed_group_stops_listening(self):
        """A group left out of the new set refuses connections after apply."""
        p1, p2 = free_port(), free_port()
        await self.table.apply([tunnel(port=p1), tunnel(port=p2)])
        await self.table.apply([tunnel(port=p1)])
        self.assertTrue(await refused(p2))
        self.assertEqual(await fetch(p1), b"TestClient1")

    async def test_move_keeps_socket_and_refuses_nothing(self):
        """Moving a tunnel keeps the same port object and refuses no connection."""
        port = free_port()
        await self.table.apply([tunnel(port=port)])
        before = self.table.listening_port(("127.0.0.1", port))
        early = [Deferred.fromCoroutine(fetch(port)) for _ in range(10)]
        await self.table.apply([tunnel(port=port, client="TestClient2", glob="")])
        late = [Deferred.fromCoroutine(fetch(port)) for _ in range(10)]
        self.assertIs(self.table.listening_port(("127.0.0.1", port)), before)
        answers = [await d for d in early + late]
        self.assertTrue(set(answers) <= {b"TestClient1", b"TestClient2"}, answers)
        self.assertEqual(answers[10:], [b"TestClient2"] * 10)

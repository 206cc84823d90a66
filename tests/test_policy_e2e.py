"""The access policy on real loopback sockets: sources, rates, quotas, changes.

The user's source is varied by binding the user socket to 127.0.0.2,
127.0.0.3, ... (all loopback on Linux), ``::1`` for IPv6, and a
dual-stack ``"::"`` listener for IPv4-mapped sources.
"""

from __future__ import annotations

import hashlib
import json
import os

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionDone
from twisted.trial.unittest import TestCase

from tests.components import missing
from tests.support import (
    Backend,
    Deployment,
    Recorder,
    free_port,
    metric,
    tunnel,
    wait_until,
)
from tests.test_attack_frontend_dualstack import dual_stack_loopback
from threshold.config.policy import ClientPolicy
from threshold.server.stats import Refusal

CLIENT = "TestClient1"


@inlineCallbacks
def user_from(port: int, source: str, host: str = "127.0.0.1"):
    """Connect as a user bound to ``source``; return the Recorder."""
    user = Recorder()
    kind = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = kind(reactor, host, port, bindAddress=(source, 0))
    yield connectProtocol(endpoint, user)
    return user


@inlineCallbacks
def echoes(user: Recorder, payload: bytes = b"ping"):
    """Whether the user's bytes come back (False: closed without a byte)."""
    user.transport.write(payload)
    yield wait_until(
        lambda: user.data == payload or user.done.called, 10, "echo or close"
    )
    return user.data == payload


class PolicyMixin:
    """A server and client on loopback with an echo service."""

    timeout = 60
    server_fields: dict = {}

    @inlineCallbacks
    def setUp(self):
        self.backend = Backend(echo=True)
        self.backend_port = yield self.backend.start()
        self.addCleanup(self.backend.stop)
        self.deployment = Deployment(False, self.mktemp(), **self.server_fields)
        self.addCleanup(self.deployment.stop)
        self.deployment.start_server()
        self.deployment.start_client(CLIENT, {"echo": ("127.0.0.1", self.backend_port)})
        yield self.deployment.wait_connected(CLIENT)

    @inlineCallbacks
    def put(self, *entries):
        code, body = yield self.deployment.put_tunnels(list(entries))
        self.assertEqual(code, 200, body)
        return body

    @inlineCallbacks
    def scrape(self):
        response = yield self.deployment.http().get(self.deployment.url("/metrics"))
        body = yield response.content()
        return body.decode()

    @inlineCallbacks
    def refused_cleanly(self, user: Recorder, before: int):
        """The user was closed without a byte, and no stream reached the client."""
        yield user.done
        self.assertEqual(user.data, b"")
        self.assertEqual(len(self.backend.connections), before)


class SourceListTests(PolicyMixin, TestCase):
    @inlineCallbacks
    def test_allow_and_deny_ipv4(self):
        """Allowed sources pass; denied (deny wins) and unlisted are refused."""
        port = free_port()
        yield self.put(
            tunnel(
                CLIENT,
                port,
                "echo",
                AllowSourceCidrs=["127.0.0.2/31"],  # .2 and .3
                DenySourceCidrs=["127.0.0.3"],
            )
        )
        ok = yield user_from(port, "127.0.0.2")
        self.assertTrue((yield echoes(ok)))
        served = len(self.backend.connections)
        denied = yield user_from(port, "127.0.0.3")
        yield self.refused_cleanly(denied, served)
        unlisted = yield user_from(port, "127.0.0.4")
        yield self.refused_cleanly(unlisted, served)
        ok.transport.loseConnection()
        yield ok.done

        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[Refusal.DENIED_SOURCE], 1)
        self.assertEqual(stats.refused[Refusal.NOT_ALLOWED_SOURCE], 1)
        text = yield self.scrape()
        labels = dict(listen_address="127.0.0.1", listen_port=str(port), hostname="*")
        self.assertEqual(
            metric(
                text,
                "threshold_tunnel_policy_refused_total",
                reason="denied_source",
                **labels,
            ),
            1,
        )
        self.assertEqual(
            metric(
                text,
                "threshold_public_connections_refused_total",
                reason="not_allowed_source",
            ),
            1,
        )
        code, status = yield self.deployment.get_json("/tunnels/status")
        refused = status["Tunnels"][0]["Policy"]["Refused"]
        self.assertEqual(refused["denied_source"], 1)
        self.assertEqual(refused["not_allowed_source"], 1)
        code, clients = yield self.deployment.get_json("/clients")
        self.assertEqual(clients[CLIENT]["Refused"]["denied_source"], 1)

    @inlineCallbacks
    def test_ipv6(self):
        """An IPv6 source is matched against IPv6 CIDRs."""
        port = free_port("::1")
        yield self.put(
            tunnel(CLIENT, port, "echo", ListenAddress="::1", DenySourceCidrs=["::1"])
        )
        before = len(self.backend.connections)
        user = yield user_from(port, "::1", "::1")
        yield self.refused_cleanly(user, before)
        yield self.put(
            tunnel(
                CLIENT,
                port,
                "echo",
                ListenAddress="::1",
                AllowSourceCidrs=["::1/128"],
                DenySourceCidrs=["2001:db8::/32", "127.0.0.0/8"],
            )
        )
        user = yield user_from(port, "::1", "::1")
        self.assertTrue((yield echoes(user)))
        user.transport.loseConnection()
        yield user.done

    @inlineCallbacks
    def test_ipv4_mapped_matched_as_ipv4(self):
        """On a "::" listener, ::ffff:127.0.0.2 is refused by 127.0.0.2/32."""
        if not dual_stack_loopback():
            raise missing("no dual-stack IPv6 loopback on this host")
        port = free_port("::")
        yield self.put(
            tunnel(
                CLIENT,
                port,
                "echo",
                ListenAddress="::",
                DenySourceCidrs=["127.0.0.2/32"],
            )
        )
        before = len(self.backend.connections)
        denied = yield user_from(port, "127.0.0.2")
        yield self.refused_cleanly(denied, before)
        ok = yield user_from(port, "127.0.0.5")
        self.assertTrue((yield echoes(ok)))
        ok.transport.loseConnection()
        yield ok.done
        self.assertEqual(self.deployment.server.stats.refused[Refusal.DENIED_SOURCE], 1)

    @inlineCallbacks
    def test_put_applies_to_the_next_connection_same_socket(self):
        """A PUT that adds a deny list refuses the next user; the socket stays."""
        port = free_port()
        entry = tunnel(CLIENT, port, "echo")
        yield self.put(entry)
        routes = self.deployment.server.routes
        socket_before = routes.listening_port(("127.0.0.1", port))
        running = yield user_from(port, "127.0.0.2")
        self.assertTrue((yield echoes(running)))
        served = len(self.backend.connections)
        yield self.put(dict(entry, DenySourceCidrs=["127.0.0.0/24"]))
        self.assertIs(routes.listening_port(("127.0.0.1", port)), socket_before)
        refused = yield user_from(port, "127.0.0.2")
        yield self.refused_cleanly(refused, served)
        # The connection that was running goes on.
        running.chunks.clear()
        self.assertTrue((yield echoes(running, b"still here")))
        # And lifting it admits the next one again, on the same socket.
        yield self.put(entry)
        again = yield user_from(port, "127.0.0.2")
        self.assertTrue((yield echoes(again)))
        self.assertIs(routes.listening_port(("127.0.0.1", port)), socket_before)
        for user in (running, again):
            user.transport.loseConnection()
            yield user.done


class RateTests(PolicyMixin, TestCase):
    @inlineCallbacks
    def test_one_source_floods_the_other_is_never_refused(self):
        """A flooding source is refused past its burst; a calm one never is."""
        port = free_port()
        yield self.put(
            tunnel(
                CLIENT,
                port,
                "echo",
                MaxNewConnectionsPerSecondPerSourceIp=2,
                NewConnectionBurst=5,
            )
        )
        flood = []
        started = reactor.seconds()
        for _ in range(40):
            flood.append((yield user_from(port, "127.0.0.2")))
        elapsed = reactor.seconds() - started
        calm = []
        for _ in range(5):
            calm.append((yield user_from(port, "127.0.0.3")))
        results = []
        for user in calm:
            results.append((yield echoes(user)))
        self.assertEqual(results, [True] * 5)
        served = 0
        for user in flood:
            served += yield echoes(user)
        # The burst, and what the rate added while 40 connections were made.
        self.assertGreaterEqual(served, 5)
        self.assertLessEqual(served, 5 + int(2 * elapsed) + 1)
        self.assertGreater(40 - served, 20)
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[Refusal.RATE_LIMITED], 40 - served)
        for user in flood + calm:
            if not user.done.called:
                user.transport.loseConnection()
            yield user.done


class QuotaMixin(PolicyMixin):
    action = "refuse-new"
    limit = 1_000_000

    def setUp(self):
        self.server_fields = dict(
            client_policies={
                CLIENT: ClientPolicy(
                    quota_bytes=self.limit, quota_exceeded_action=self.action
                )
            },
            state_file=os.path.join(self.mktemp(), "state.json"),
        )
        os.makedirs(os.path.dirname(self.server_fields["state_file"]))
        return super().setUp()

    @inlineCallbacks
    def transfer(self, port: int, size: int):
        """Send ``size`` random bytes through the echo and half-close."""
        user = yield user_from(port, "127.0.0.2")
        payload = os.urandom(size)
        user.transport.write(payload)
        user.transport.loseWriteConnection()
        yield user.done
        return user, payload


class QuotaRefuseNewTests(QuotaMixin, TestCase):
    @inlineCallbacks
    def test_crossing_mid_transfer_finishes_then_refuses(self):
        """The transfer that crosses the quota finishes whole; the next is refused."""
        port = free_port()
        yield self.put(tunnel(CLIENT, port, "echo"))
        user, payload = yield self.transfer(port, 700_000)  # 1.4 MB both ways
        self.assertTrue(user.lost.check(ConnectionDone), user.lost)
        self.assertEqual(
            hashlib.sha256(user.data).digest(), hashlib.sha256(payload).digest()
        )
        served = len(self.backend.connections)
        refused = yield user_from(port, "127.0.0.2")
        yield self.refused_cleanly(refused, served)
        server = self.deployment.server
        self.assertEqual(server.stats.refused[Refusal.QUOTA_EXCEEDED], 1)

        code, clients = yield self.deployment.get_json("/clients")
        mine = clients[CLIENT]
        traffic = server.stats.clients[CLIENT]
        # Counted exactly: both directions, as the byte metrics count them.
        self.assertEqual(mine["QuotaUsedBytes"], traffic.bytes_in + traffic.bytes_out)
        self.assertEqual(mine["QuotaUsedBytes"], 1_400_000)
        self.assertEqual((mine["QuotaBytes"], mine["QuotaLeftBytes"]), (self.limit, 0))
        self.assertTrue(mine["QuotaExceeded"])
        self.assertTrue(mine["QuotaPeriodStart"].endswith("-01T00:00:00Z"))
        text = yield self.scrape()
        self.assertEqual(
            metric(text, "threshold_quota_used_bytes", client_id=CLIENT), 1_400_000
        )

        # Reset through the API: counted from 0, admitted again.
        response = yield self.deployment.http().post(
            self.deployment.url(f"/clients/{CLIENT}/quota/reset")
        )
        self.assertEqual(response.code, 200)
        body = json.loads((yield response.content()))
        self.assertEqual((body["ClientId"], body["QuotaUsedBytes"]), (CLIENT, 0))
        self.assertEqual(body["QuotaLeftBytes"], self.limit)
        again, payload = yield self.transfer(port, 1000)
        self.assertEqual(again.data, payload)

    @inlineCallbacks
    def test_reset_errors(self):
        """Reset: 404 for an unknown client, 405 for GET."""
        http = self.deployment.http()
        response = yield http.post(
            self.deployment.url("/clients/NoSuchClient/quota/reset")
        )
        self.assertEqual(response.code, 404)
        self.assertIn("no such client", json.loads((yield response.content()))["error"])
        response = yield http.get(self.deployment.url(f"/clients/{CLIENT}/quota/reset"))
        self.assertEqual(response.code, 405)
        yield response.content()

    @inlineCallbacks
    def test_restart_keeps_the_count(self):
        """A stop and start with the state file brings the usage back."""
        port = free_port()
        yield self.put(tunnel(CLIENT, port, "echo"))
        yield self.transfer(port, 100_000)
        used = self.deployment.server.policy.quota.view(CLIENT)["QuotaUsedBytes"]
        self.assertEqual(used, 200_000)
        yield self.deployment.stop_server()
        with open(self.server_fields["state_file"]) as f:
            saved = json.load(f)
        self.assertEqual(saved["QuotaUsage"][CLIENT]["UsedBytes"], 200_000)
        self.assertEqual(saved["Tunnels"][0]["ListenPort"], port)
        self.deployment.start_server()
        yield self.deployment.wait_connected(CLIENT)
        code, clients = yield self.deployment.get_json("/clients")
        self.assertEqual(clients[CLIENT]["QuotaUsedBytes"], 200_000)
        # Counting goes on from there.
        yield wait_until(
            lambda: (
                self.deployment.server.routes.listening_port(("127.0.0.1", port))
                is not None
            ),
            what="the restored socket",
        )
        yield self.transfer(port, 50_000)
        view = self.deployment.server.policy.quota.view(CLIENT)
        self.assertEqual(view["QuotaUsedBytes"], 300_000)


class QuotaCutTests(QuotaMixin, TestCase):
    action = "cut"

    @inlineCallbacks
    def test_crossing_cuts_the_running_connection(self):
        """With "cut", the connection that crosses is reset, and the next refused."""
        port = free_port()
        yield self.put(tunnel(CLIENT, port, "echo"))
        idle = yield user_from(port, "127.0.0.3")  # another running connection
        self.assertTrue((yield echoes(idle)))
        user = yield user_from(port, "127.0.0.2")
        payload = os.urandom(4_000_000)
        user.transport.write(payload)
        yield user.done
        yield idle.done
        self.assertFalse(user.lost.check(ConnectionDone), user.lost)
        self.assertLess(len(user.data), len(payload))
        self.assertFalse(idle.lost.check(ConnectionDone), idle.lost)
        stats = self.deployment.server.stats
        self.assertEqual(stats.refused[Refusal.QUOTA_CUT], 2)
        served = len(self.backend.connections)
        refused = yield user_from(port, "127.0.0.2")
        yield self.refused_cleanly(refused, served)
        # What was counted before the cut is at most a few reads past the quota.
        used = self.deployment.server.policy.quota.view(CLIENT)["QuotaUsedBytes"]
        self.assertGreaterEqual(used, self.limit)
        self.assertLess(used, self.limit + 1_000_000)

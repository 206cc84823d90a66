"""The gateway as a twistd service: registry, route table, control listener.

:class:`TunnelServer` ties the parts together: the client registry
(registry.py), the control connections (control.py), the route table and
its front end (routes.py, frontend.py) and the state file (statefile.py).
It restores the saved tunnels at start, saves every accepted set in the
order applied, and stops gracefully.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from threshold.logs import observer as log_observer
from threshold.server.control import (
    ControlConnection,
    ControlFactory,
    ControlSettings,
)
from threshold.server.egress_gate import EgressGate, EgressSettings, Resolver
from threshold.server.frontend import (
    FrontendFactory,
    FrontendLimits,
    public_admission,
)
from threshold.server.history import HistorySettings, TrafficHistory
from threshold.server.policy import GatewayPolicy, PolicySettings
from threshold.server.registry import ClientRegistry
from threshold.server.routes import RouteTable, TunnelError
from threshold.server.serving import ServingTable
from threshold.server.statefile import StateFile, StateFileError, ThreadRunner
from threshold.server.stats import GatewayStats
from threshold.server.udp import UdpFrontends, UdpLimits
from threshold.wire.frames import GO_AWAY_NORMAL

if TYPE_CHECKING:
    from twisted.internet.interfaces import (
        IListeningPort,
        IProtocolFactory,
        IReactorTime,
        IReactorUDP,
    )
    from twisted.python.failure import Failure

    from threshold.server.routes import GroupKey, Tunnel

__all__ = ["TunnelServer"]

log = Logger(observer=log_observer)


class TunnelServer(Service):
    """The server's state: registry, route table, front end, state file.

    ``listen(host, port, factory)`` opens a public socket (an endpoint's
    ``listen``). With a ``state_file``, every accepted tunnel set is saved
    (in a thread, via ``run_in_thread``) before it is switched in, and
    ``restore`` (the set read from it) is put back at start, listening
    before clients return.
    """

    def __init__(
        self,
        listen: Callable[[str, int, IProtocolFactory], Deferred[IListeningPort]],
        clock: IReactorTime,
        settings: ControlSettings | None = None,
        state_file: str | None = None,
        restore: list[Tunnel] | None = None,
        limits: FrontendLimits | None = None,
        shutdown_grace: float = 10.0,
        run_in_thread: ThreadRunner = deferToThread,
        policy: PolicySettings | None = None,
        udp_reactor: IReactorUDP | None = None,
        udp_limits: UdpLimits | None = None,
        egress: EgressSettings | None = None,
        resolve: Resolver | None = None,
        history: HistorySettings | None = None,
    ) -> None:
        settings = settings or ControlSettings()
        self.clock = clock
        self.settings = settings
        self.state_file = state_file
        self.state = (
            StateFile(state_file, run_in_thread) if state_file is not None else None
        )
        self._restore = restore or []
        self.registry = ClientRegistry()
        #: Every counter of the gateway: the API, logs and metrics read it.
        self.stats = GatewayStats()
        self.shutdown_grace = shutdown_grace
        self.limits = limits or FrontendLimits()
        self.admission = public_admission(self.limits)
        #: Source lists, rates, bandwidth and quotas (docs/policy.md); quota
        #: usage is kept in the state file.
        self.policy = GatewayPolicy(
            policy or PolicySettings(), clock, self.stats, self.state
        )
        self.admission.policy = self.policy
        #: Which clients serve each tunnel now (the front end asks it).
        self.serving = ServingTable(self.registry, self.stats)
        #: The UDP tunnels' sockets and flows (docs/udp.md); without a
        #: ``udp_reactor`` a UDP tunnel is refused (400).
        self.udp = UdpFrontends(
            udp_reactor,
            clock,
            None,
            self.serving,
            self.stats,
            udp_limits or UdpLimits(),
            self.policy,
        )
        self.routes = RouteTable(
            listen,
            self._make_factory,
            self.serving.update,
            listen_udp=self.udp.listen if udp_reactor is not None else None,
        )
        self.udp.routes = self.routes
        #: The last hour of traffic per tunnel (the status page's charts).
        self.history = TrafficHistory(
            self.stats, clock, lambda: [t.key for t in self.routes.tunnels()], history
        )
        #: Connects out for the clients' egress streams (docs/egress.md).
        self.egress = EgressGate(
            egress or EgressSettings(), clock, self.stats, self.policy, resolve
        )
        self._control = ControlFactory(
            self.registry, settings, clock, self.stats, egress=self.egress
        )

    @property
    def control_connections(self) -> set[ControlConnection]:
        """The live control connections."""
        return self._control.connections

    def _make_factory(self, key: GroupKey) -> FrontendFactory:
        return FrontendFactory(
            key,
            self.routes,
            self.serving,
            self.clock,
            self.stats,
            self.limits,
            self.admission,
        )

    def control_factory(self) -> ControlFactory:
        """The factory for the tunnel control listener."""
        return self._control

    def apply(self, tunnels: list[Tunnel]) -> Deferred[list[Tunnel]]:
        """Apply a new tunnel set, all or nothing, saving it before the switch."""
        persist = self._save if self.state is not None else None
        d = self.routes.apply(tunnels, persist=persist)
        d.addCallback(self._applied)
        return d

    def _applied(self, tunnels: list[Tunnel]) -> list[Tunnel]:
        # The operator changed the set: what the restore missed is moot.
        self.stats.tunnels_in_force = len(tunnels)
        self.stats.restore_failures = 0
        self.policy.tunnels_applied(tunnels)
        return tunnels

    def _save(self, tunnels: list[Tunnel]) -> Deferred[None]:
        assert self.state is not None

        def failed(failure: Failure) -> None:
            failure.trap(StateFileError)
            log.error("cannot save the tunnel set: {why}", why=str(failure.value))
            raise TunnelError(
                503, f"not applied: the tunnel set cannot be saved: {failure.value}"
            )

        return self.state.save(tunnels).addErrback(failed)

    @inlineCallbacks
    def startService(self):  # noqa: N802, ANN201
        """Restore the saved tunnels, listening before clients return.

        What cannot be bound is left out and reported (log, metrics,
        ``GET /tunnels/status``); the file stays as it is until a
        ``PUT /tunnels``.
        """
        Service.startService(self)
        self.policy.start()
        self.history.start()
        tunnels, self._restore = self._restore, []
        if not tunnels:
            return
        failed = yield self.routes.restore(tunnels)
        self.stats.tunnels_in_force = len(self.routes.tunnels())
        self.stats.restore_failures = len(failed)
        if failed:
            log.error(
                "state file {path}: {restored} of {count} tunnels restored, "
                "{failed} not (see GET /tunnels/status); the file is kept as it "
                "is until the next PUT /tunnels",
                path=self.state_file,
                restored=len(tunnels) - len(failed),
                count=len(tunnels),
                failed=len(failed),
            )
            return
        log.info(
            "state file {path}: {count} tunnels restored",
            path=self.state_file,
            count=len(tunnels),
        )

    @inlineCallbacks
    def stopService(self):  # noqa: N802, ANN201
        """Stop gracefully: listeners first, then a grace period, then close.

        The public sockets close so no new connection arrives; every client
        gets Go Away (no new streams; the session closes when its last stream
        ends); connections still running after ``shutdown_grace`` seconds
        are cut.
        """
        Service.stopService(self)
        self.history.stop()
        yield self.routes.close()
        controls = list(self.control_connections)
        sessions = [c.session for c in controls]
        closed = [s.when_closed() for s in sessions]
        for control in controls:
            control.go_away(GO_AWAY_NORMAL)
        running = sum(len(s.streams) for s in sessions)
        if running:
            log.info(
                "stopping: {count} connections may finish within {grace}s",
                count=running,
                grace=self.shutdown_grace,
            )
        done = DeferredList(closed, consumeErrors=True)
        # Cancelling the list at the deadline fires it (with the waits it
        # cancelled marked as failures), so what is still open is checked.
        timer = self.clock.callLater(self.shutdown_grace, done.cancel)
        yield done
        if timer.active():
            timer.cancel()
        left = [s for s in sessions if not s.closed]
        if left:
            log.warn(
                "stopping: grace period over, {count} connections cut",
                count=sum(len(s.streams) for s in left),
            )
            for session in left:
                session.close()
        # The last counts of the connections that just ended.
        yield self.policy.stop()

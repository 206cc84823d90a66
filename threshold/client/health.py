"""Health checks of the client's local services, shared by all its sessions.

``HealthChecks`` in the client config names services to check: every
``IntervalSeconds`` the client opens a TCP connection to the service's
local address (from ``ServiceToLocalAddrMap``) and closes it at once; no
connection within ``TimeoutSeconds`` is a failure. One
:class:`ServiceCheck` per service, whatever the number of gateways: the
:class:`HealthMonitor` holds them, keeps the health line every session
sends (:func:`threshold.wire.control.encode_health`), and tells the
sessions when it changes. Until a service's first check has a result it is
left out of the line (its health is not known).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from threshold.client.endpoints import local_tcp_endpoint
from threshold.logs import observer as log_observer
from threshold.schema import format_address
from threshold.wire.control import encode_health

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

    from threshold.config.client import HealthCheck

__all__ = [
    "CheckState",
    "HealthMonitor",
    "Probe",
    "ServiceCheck",
    "describe_failure",
    "tcp_probe",
]

log = Logger(observer=log_observer)

#: ``probe(host, port, timeout)``: a Deferred that fires once a TCP
#: connection to the address was made (and closed again), or fails.
Probe = Callable[[str, int, float], "defer.Deferred[None]"]

#: ``listener(line)``: the new health line, to send on a control channel.
Listener = Callable[[bytes], None]


class CheckState(enum.Enum):
    """What the latest check of a service found."""

    #: No check has finished yet.
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class _Probing(Protocol):
    """Connected: that is all a check wants to know; close politely."""

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.loseConnection()


class _ProbeFactory(Factory):
    noisy = False  # no "Starting factory" lines at every check
    protocol = _Probing


def tcp_probe(reactor: Any) -> Probe:
    """Probes that connect to ``host:port`` over TCP with ``reactor``.

    The timeout covers the whole attempt, a name's resolution included.
    """

    def probe(host: str, port: int, timeout: float) -> defer.Deferred[None]:
        endpoint = local_tcp_endpoint(reactor, timeout)(host, port)
        d: defer.Deferred[Any] = endpoint.connect(_ProbeFactory())
        # Cancelling an endpoint's attempt fails it with
        # ConnectingCancelledError, which addTimeout would pass on as is.
        d.addTimeout(timeout, reactor, onTimeoutCancel=_timed_out)
        d.addCallback(lambda _: None)
        return d

    return probe


def _timed_out(result: object, timeout: float) -> None:
    raise defer.TimeoutError(f"no connection within {timeout:g}s")


def describe_failure(failure: Failure, host: str, port: int, timeout: float) -> str:
    """A failed check in plain words, naming the address."""
    address = format_address(host, port)
    if failure.check(error.ConnectionRefusedError):
        return f"connection refused at {address}"
    if failure.check(defer.TimeoutError, error.TimeoutError, defer.CancelledError):
        return f"no answer within {timeout:g}s from {address}"
    if failure.check(error.DNSLookupError):
        return f"cannot resolve {host}"
    if failure.check(error.NoRouteError):
        return f"no route to {address}"
    return f"cannot connect to {address}: {failure.getErrorMessage()}"


class ServiceCheck:
    """One service's check: a probe every interval, the latest result.

    ``reported(check)`` is called after each result, so the owner can tell
    a change of state (logged here) from a new detail.
    """

    def __init__(
        self,
        service: str,
        address: tuple[str, int],
        config: HealthCheck,
        clock: IReactorTime,
        probe: Probe,
        reported: Callable[[ServiceCheck], None],
    ) -> None:
        self.service = service
        self.address = address
        self.config = config
        self.state = CheckState.UNKNOWN
        #: Why the latest check failed (None when healthy or unknown).
        self.detail: str | None = None
        #: When the latest check finished (clock seconds), None before.
        self.last_checked: float | None = None
        self.checks = 0
        self._clock = clock
        self._probe = probe
        self._reported = reported
        self._loop: LoopingCall | None = None
        self._running: defer.Deferred[None] | None = None

    @property
    def active(self) -> bool:
        """True between :meth:`start` and :meth:`stop`."""
        return self._loop is not None

    def start(self) -> None:
        """Check now, then every interval."""
        if self._loop is not None:
            return
        self._loop = LoopingCall(self._check)
        self._loop.clock = self._clock
        # LoopingCall waits for a check's Deferred before the next one; the
        # timeout is at most the interval, so no check is skipped.
        self._loop.start(self.config.interval_seconds, now=True)

    def stop(self) -> None:
        """No more checks; one under way is cancelled (its result dropped)."""
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()
        running, self._running = self._running, None
        if running is not None:
            running.cancel()

    def retarget(self, address: tuple[str, int]) -> None:
        """The service moved: check the new address now.

        The state stays until the new address's first result, so a move
        between two healthy addresses is no change.
        """
        self.stop()
        self.address = address
        self.start()

    def _check(self) -> defer.Deferred[None]:
        host, port = self.address
        d = defer.maybeDeferred(self._probe, host, port, self.config.timeout_seconds)
        self._running = d
        d.addCallbacks(self._passed, self._failed, errbackArgs=(d,), callbackArgs=(d,))
        return d

    def _passed(self, _: object, d: defer.Deferred[None]) -> None:
        if self._running is d:
            self._running = None
            self._result(CheckState.HEALTHY, None)

    def _failed(self, failure: Failure, d: defer.Deferred[None]) -> None:
        if self._running is not d:
            return  # stopped (cancelled) or restarted meanwhile: not ours
        self._running = None
        host, port = self.address
        why = describe_failure(failure, host, port, self.config.timeout_seconds)
        self._result(CheckState.UNHEALTHY, why)

    def _result(self, state: CheckState, detail: str | None) -> None:
        self.checks += 1
        self.last_checked = self._clock.seconds()
        previous, self.state, self.detail = self.state, state, detail
        if state is not previous:
            if state is CheckState.HEALTHY:
                log.info(
                    "health check {service} ({address}): healthy",
                    service=self.service,
                    address=format_address(*self.address),
                )
            else:
                log.warn(
                    "health check {service}: unhealthy: {why}",
                    service=self.service,
                    why=detail,
                )
        self._reported(self)


class HealthMonitor(Service):
    """Every configured check, and the health line the sessions send.

    ``checks`` are the config's ``HealthChecks``; a check runs while its
    service is in the service map (:meth:`services_changed` follows live
    config). Started and stopped with the client's service tree.
    """

    def __init__(
        self,
        checks: Mapping[str, HealthCheck],
        services: Mapping[str, tuple[str, int]],
        clock: IReactorTime,
        probe: Probe,
    ) -> None:
        self.configured = dict(checks)
        self._clock = clock
        self._probe = probe
        self._listeners: list[Listener] = []
        #: The checks of services now in the map, by service name.
        self.checks: dict[str, ServiceCheck] = {}
        self._states: dict[str, bool] = {}
        self._line = encode_health({})
        self.services_changed(services)

    # -- the line -----------------------------------------------------------

    def current_line(self) -> bytes | None:
        """The line a new session sends: None until a check has a result."""
        return self._line if self._states else None

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener(line)`` at each change; returns the unsubscribe."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def _update(self) -> None:
        """Recompute the line; tell every session if a state changed."""
        known = [c for c in self.checks.values() if c.state is not CheckState.UNKNOWN]
        states = {c.service: c.state is CheckState.HEALTHY for c in known}
        self._line = encode_health(
            states, {c.service: c.detail for c in known if c.detail is not None}
        )
        # Only states (and the services listed) count: a detail that changes
        # while the service stays unhealthy is not worth a message.
        if states == self._states:
            return
        self._states = states
        for listener in list(self._listeners):
            listener(self._line)

    def _reported(self, check: ServiceCheck) -> None:
        if self.checks.get(check.service) is check:
            self._update()

    # -- the checks ---------------------------------------------------------

    def services_changed(self, services: Mapping[str, tuple[str, int]]) -> None:
        """The service map was replaced: check what it maps, where it maps it.

        A service no longer in the map stops being checked (and leaves the
        line); one back in the map starts again from UNKNOWN.
        """
        for name, config in self.configured.items():
            address = services.get(name)
            check = self.checks.get(name)
            if address is None:
                if check is not None:
                    check.stop()
                    del self.checks[name]
                    log.info(
                        "health check {service}: not in the map; stopped", service=name
                    )
            elif check is None:
                check = ServiceCheck(
                    name, address, config, self._clock, self._probe, self._reported
                )
                self.checks[name] = check
                if self.running:
                    check.start()
            elif check.address != address:
                check.retarget(address)
        self._update()

    def startService(self) -> None:  # noqa: N802
        """Start every check (the first at once)."""
        super().startService()
        for check in list(self.checks.values()):
            check.start()

    def stopService(self) -> Any:  # noqa: N802
        """Stop every check."""
        for check in self.checks.values():
            check.stop()
        return super().stopService()

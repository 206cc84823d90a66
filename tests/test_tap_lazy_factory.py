"""LazyFactory: a listener's factory made once the reactor runs."""

from __future__ import annotations

import sys

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from threshold.tap.common import LazyFactory


class Counting(Factory):
    protocol = Protocol

    def __init__(self) -> None:
        self.starts = 0
        self.stops = 0

    def doStart(self) -> None:  # noqa: N802
        self.starts += 1

    def doStop(self) -> None:  # noqa: N802
        self.stops += 1


class LazyFactoryTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.made: list[Counting] = []

    def make(self) -> Counting:
        factory = Counting()
        self.made.append(factory)
        return factory

    def test_made_when_the_reactor_runs(self):
        """Nothing is made at construction; the reactor's start makes it once,
        and it gets the doStart the socket made before."""
        lazy = LazyFactory(self.make, self.reactor)
        lazy.doStart()
        self.assertEqual((self.made, lazy.made), ([], None))
        self.reactor.run()
        [real] = self.made
        self.assertIs(lazy.made, real)
        self.assertEqual(real.starts, 1)
        lazy.buildProtocol(None)
        lazy.doStop()
        self.assertEqual((len(self.made), real.stops), (1, 1))

    def test_first_connection_makes_it(self):
        """A connection before the reactor's start makes the factory at once."""
        lazy = LazyFactory(self.make, self.reactor)
        lazy.doStart()
        protocol = lazy.buildProtocol(None)
        self.assertIsInstance(protocol, Protocol)
        self.assertEqual(self.made[0].starts, 1)
        self.reactor.run()  # already made: not again
        self.assertEqual(len(self.made), 1)

    def test_failure_stops_the_reactor(self):
        """If the factory cannot be made the process stops, as a start-up
        error does, with the error logged."""

        def broken() -> Factory:
            raise ValueError("cannot build")

        LazyFactory(broken, self.reactor)
        self.reactor.run()
        self.assertTrue(self.reactor.hasStopped)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    def test_server_tap_imports_no_web_framework(self):
        """Importing the server's tap loads neither klein nor twisted.web:
        the management API is imported when its factory is made."""
        import subprocess

        code = (
            "import sys, threshold.tap.server; "
            "print(sorted(m for m in ('klein', 'twisted.web.server') "
            "if m in sys.modules))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
        self.assertEqual(out.stdout.strip(), "[]")

    def test_alpn_of_the_real_factory(self):
        """TLS asks the wrapped factory for ALPN: the real factory's list,
        or none for a factory without one."""
        from twisted.internet.interfaces import IProtocolNegotiationFactory
        from zope.interface import implementer

        @implementer(IProtocolNegotiationFactory)
        class Http11(Counting):
            def acceptableProtocols(self):  # noqa: N802
                return [b"http/1.1"]

        self.assertEqual(
            LazyFactory(Http11, self.reactor).acceptableProtocols(), [b"http/1.1"]
        )
        self.assertEqual(LazyFactory(self.make, self.reactor).acceptableProtocols(), [])

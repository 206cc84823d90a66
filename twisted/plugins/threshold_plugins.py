"""twistd plugins: ``twistd threshold-server`` and ``twistd threshold-client``."""

from twisted.application.service import ServiceMaker

threshold_server = ServiceMaker(
    "threshold server",
    "threshold.tap.server",
    "The threshold tunnel server: public ports, client sessions, management API.",
    "threshold-server",
)

threshold_client = ServiceMaker(
    "threshold client",
    "threshold.tap.client",
    "The threshold tunnel client: holds a session to the server, serves services.",
    "threshold-client",
)

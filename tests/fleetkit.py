"""Gateways of one fleet on loopback: Deployments sharing a real etcd."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks

from tests.support import Deployment, free_port, wait_until
from threshold.config.server import ClusterSettings
from threshold.server.fleet import Fleet


def cluster(etcd: Any, prefix: str, gateway_id: str, ttl: int = 10) -> ClusterSettings:
    return ClusterSettings(
        etcd_endpoints=(etcd.url,),
        key_prefix=prefix,
        gateway_id=gateway_id,
        lease_ttl_seconds=ttl,
    )


def gateway(
    case: Any, etcd: Any, prefix: str, gateway_id: str, **fields: Any
) -> Deployment:
    """A started in-process gateway of the fleet at ``prefix`` (no TLS)."""
    ttl = fields.pop("ttl", 10)
    settings = replace(
        cluster(etcd, prefix, gateway_id, ttl), **fields.pop("cluster_tls", {})
    )
    deployment = Deployment(
        False,
        case.mktemp(),
        cluster=settings,
        shutdown_grace_seconds=0.5,
        **fields,
    )
    deployment.start_server()
    case.addCleanup(deployment.stop)
    return deployment


def fleet_of(deployment: Deployment) -> Fleet:
    assert deployment.server_service is not None
    return next(s for s in deployment.server_service if isinstance(s, Fleet))


def wait_ready(*deployments: Deployment, timeout: float = 10.0) -> Any:
    return wait_until(
        lambda: all(fleet_of(d).etcd_up for d in deployments),
        timeout,
        "the gateways' watches to be up",
    )


def wait_revision(deployment: Deployment, revision: int, timeout: float = 10.0) -> Any:
    return wait_until(
        lambda: fleet_of(deployment).applied_revision >= revision,
        timeout,
        f"revision {revision} applied",
    )


@inlineCallbacks
def put(
    deployment: Deployment, tunnels: list[dict[str, Any]], if_match: str | None = None
):
    """PUT /tunnels: (status, body, ETag)."""
    headers = {"Content-Type": ["application/json"]}
    if if_match is not None:
        headers["If-Match"] = [if_match]
    response = yield deployment.http().put(
        deployment.url("/tunnels"), data=json.dumps(tunnels).encode(), headers=headers
    )
    body = yield response.content()
    etag = response.headers.getRawHeaders("etag", [None])[0]
    return response.code, json.loads(body), etag


class GatewayProcess:
    """A gateway run by ``twistd -n threshold-server`` (to kill it for real)."""

    def __init__(self, directory: str, config: dict[str, Any]) -> None:
        self.directory = directory
        self.config_path = os.path.join(directory, "server.json")
        self.log_path = os.path.join(directory, "twistd.log")
        self.control_port = free_port()
        self.management_port = free_port()
        body = dict(
            UseTls=False,
            ListenAddress="127.0.0.1",
            TunnelControlPort=self.control_port,
            ManagementPort=self.management_port,
            **config,
        )
        with open(self.config_path, "w") as f:
            json.dump(body, f)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    twistd,
                    "-n",
                    "--pidfile=",
                    "threshold-server",
                    "-c",
                    self.config_path,
                ],
                cwd=self.directory,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )

    def wait_serving(self, timeout: float = 15.0) -> None:
        import http.client

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.management_port, 1)
                c.request("GET", "/ping")
                if c.getresponse().status == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"gateway did not serve; log:\n{self.log()}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]


__all__ = [
    "GatewayProcess",
    "cluster",
    "fleet_of",
    "gateway",
    "put",
    "reactor",
    "wait_ready",
    "wait_revision",
]

"""A free TCP port on 127.0.0.1: for the servers and process groups that tests and benchmarks
start on this machine (an S3 endpoint, gloo ranks, a Ray head)."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

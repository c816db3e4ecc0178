"""Loopback helpers for the real servers and process groups the tests start: a free TCP port
on 127.0.0.1 (``common.loopback``), and a server there that never answers (the outage the
timeouts are tested on)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common.loopback import free_port

__all__ = ["free_port", "server_that_never_answers"]


@contextmanager
def server_that_never_answers(lifetime_s: float = 120) -> Iterator[str]:
    """``http://127.0.0.1:PORT``: accepts connections and never reads or answers them, until the
    block ends or ``lifetime_s`` has passed (it stops by itself even if a test hangs)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    done = threading.Event()

    def hold_connections() -> None:
        held: list[socket.socket] = []
        deadline = time.monotonic() + lifetime_s
        while not done.is_set() and time.monotonic() < deadline:
            try:
                held.append(listener.accept()[0])
            except TimeoutError:
                continue
        for connection in held:
            connection.close()
        listener.close()

    holder = threading.Thread(target=hold_connections, daemon=True)
    holder.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        done.set()
        holder.join()

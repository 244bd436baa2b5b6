"""A loopback TCP proxy in front of the S3 endpoint that can take the store down and bring it back.

moto keeps its buckets in memory, so stopping the server would lose them; an outage is played by
the proxy instead. Modes:

* ``up``: connections are forwarded to the endpoint;
* ``refuse``: every connection is reset as soon as it is accepted (the store is unreachable);
* ``stall``: connections are accepted and held open without an answer until the outage ends, then
  reset (a store that hangs).

Starting an outage also cuts the connections already open (the S3 client keeps idle connections
alive, and a pooled one would otherwise carry requests straight through the outage).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections import Counter
from typing import Callable
from urllib.parse import urlparse

MODES = ("up", "refuse", "stall")


def _reset(sock: socket.socket) -> None:
    """Drop a connection with an RST (SO_LINGER 0), as a store that goes away does; the shutdown
    wakes a thread blocked reading it."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class OutageProxy:
    """``OutageProxy(upstream_url)``: listens on 127.0.0.1 (``url``), forwards to ``upstream_url``.

    ``counts``: connections ``forwarded``, ``refused``, ``stalled`` and ``cut`` (open when an
    outage began), so a test can show that its outage met real traffic.
    """

    def __init__(self, upstream_url: str):
        parsed = urlparse(upstream_url)
        self._upstream = (parsed.hostname or "127.0.0.1", parsed.port or 80)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.counts: Counter[str] = Counter()
        self._mode = "up"
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._recovered = threading.Event()
        self._recovered.set()
        self._closed = False
        threading.Thread(target=self._accept_loop, name="s3-proxy-accept", daemon=True).start()

    @property
    def mode(self) -> str:
        return self._mode

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {MODES}")
        with self._lock:
            self._mode = mode
            if mode == "up":
                self._recovered.set()
                return
            self._recovered.clear()
            cut, self._open = self._open, set()
        self.counts["cut"] += len(cut)
        for sock in cut:
            _reset(sock)

    def outage(self, seconds: float, mode: str = "refuse", then: Callable[[], None] | None = None) -> threading.Thread:
        """Start an outage now; a background thread ends it after ``seconds`` (then calls ``then``)."""
        self.set_mode(mode)

        def end() -> None:
            time.sleep(seconds)
            self.set_mode("up")
            if then is not None:
                then()

        thread = threading.Thread(target=end, name="s3-proxy-outage", daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        self._closed = True
        self.set_mode("refuse")
        self._recovered.set()
        self._listener.close()

    def __enter__(self) -> "OutageProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ connections

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            mode = self._mode
            if mode == "refuse":
                self.counts["refused"] += 1
                _reset(client)
            elif mode == "stall":
                self.counts["stalled"] += 1
                threading.Thread(target=self._stall, args=(client,), daemon=True).start()
            else:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _stall(self, client: socket.socket) -> None:
        self._recovered.wait()
        _reset(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self._upstream, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            if self._mode != "up":  # an outage began while connecting
                _reset(client)
                upstream.close()
                return
            self._open.update((client, upstream))
        self.counts["forwarded"] += 1
        threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
        self._pipe(client, upstream)

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(src)
                self._open.discard(dst)
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

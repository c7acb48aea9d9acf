"""A TCP proxy in front of the test PostgreSQL server, to take the database away for real: ``cut``
drops every open connection (the server side closes, as in a restart) and refuses new ones until
``restore``. Processes given ``url`` see exactly what a PostgreSQL restart or a network outage
shows them, while the shared server itself stays up for everything else."""

from __future__ import annotations

import contextlib
import socket
import threading

from sqlalchemy.engine import make_url


class DatabaseProxy:
    def __init__(self, target_url: str) -> None:
        parsed = make_url(target_url)
        self.target = (parsed.host or "127.0.0.1", parsed.port or 5432)
        self._target_url = parsed
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.port = 0
        self.cuts = 0

    @property
    def url(self) -> str:
        return self._target_url.set(host="127.0.0.1", port=self.port).render_as_string(
            hide_password=False
        )

    def start(self) -> DatabaseProxy:
        self._listen()
        return self

    def _listen(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by cut()/stop()
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            with self._lock:
                self._conns.discard(source)
                self._conns.discard(sink)

    def cut(self) -> None:
        """The database goes away: open connections drop, new ones are refused."""
        self.cuts += 1
        if self._listener is not None:
            # close() alone does not wake a thread blocked in accept() on Linux (it would go on
            # accepting): shutting the listening socket down does.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._listener.close()
            self._listener = None
        with self._lock:
            conns = list(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        """The database is back, on the same address."""
        self._listen()

    def stop(self) -> None:
        self.cut()

"""A TCP proxy to Redis that the worker-loop tests (tests/jobs/test_worker_loop.py) control over stdin, in a
process of its own (a work horse forked from the test process would hold copies of its sockets).

`python -m tests.jobs.tcp_proxy HOST PORT` prints the port it listens on, then answers "ok" to each command:
`down` closes every connection and refuses new ones (Redis unreachable), `up` accepts again, and `silent`
makes every open connection a dead path: what the client sends or would receive is dropped, nothing is
closed on its side (no reset reaches it), and the server side is closed (the server forgets the client, as
after a failover); connections made after it are relayed as usual."""

from __future__ import annotations

import socket
import sys
import threading


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class Proxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.silent: set[socket.socket] = set()  # client sides whose traffic is dropped
        self.port = 0
        self.listener = self._listen()

    def _listen(self) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return listener

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed: the proxy is down
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pump, args=(client, server, client), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, client), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, client: socket.socket) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            if client in self.silent:
                continue
            try:
                dst.sendall(data)
            except OSError:
                break
        if client not in self.silent:  # a dead path tells its client nothing
            _close(src)
            _close(dst)

    def command(self, name: str) -> None:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        if name == "down":
            _close(self.listener)
            for client, server in pairs:
                _close(client)
                _close(server)
        elif name == "up":
            self.listener = self._listen()
        elif name == "silent":
            for client, server in pairs:
                self.silent.add(client)
                _close(server)
        else:
            raise SystemExit(f"unknown command {name!r}")


def main() -> None:
    proxy = Proxy(sys.argv[1], int(sys.argv[2]))
    print(proxy.port, flush=True)
    for line in sys.stdin:
        proxy.command(line.strip())
        print("ok", flush=True)


if __name__ == "__main__":
    main()

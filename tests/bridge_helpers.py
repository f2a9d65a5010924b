"""Start ``llamacompat serve`` as a real process, and talk to it line by line."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
from typing import Any


class Served:
    """A ``llamacompat serve`` process; ``address`` is what it printed it listens on."""

    def __init__(self, folder: str, *args: str, socket_name: str | None = "bridge.sock", env: dict | None = None,
                 before: str = "", nofile: int | None = None) -> None:
        """``before``: Python run in the server process before the CLI starts; ``nofile``: its open-file limit."""
        self.socket = os.path.join(folder, socket_name) if socket_name else None
        start = ["-m", "llamacompat.cli"] if not before else \
            ["-c", f"import sys\n{before}\nfrom llamacompat.cli import main\nsys.exit(main(sys.argv[1:]))"]
        cmd = [sys.executable, *start, "serve", "--n-ctx", "1024", "--param", "n_threads=2", *args]
        if self.socket:
            cmd += ["--socket", self.socket]
        self.log_path = os.path.join(folder, f"serve-{os.getpid()}-{id(self)}.log")
        self._log = open(self.log_path, "w")

        def limit_files() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log, text=True,
                                     env={**os.environ, **(env or {})}, preexec_fn=limit_files if nofile else None)
        line = self.proc.stdout.readline()
        self.addresses = line.strip().partition("serving on ")[2].split(", ") if "serving on" in line else []

    @property
    def started(self) -> bool:
        return bool(self.addresses)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return open(self.log_path).read()

    def tcp_port(self) -> int:
        return int(next(a for a in self.addresses if a.startswith("tcp:")).rsplit(":", 1)[1])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


class Raw:
    """One protocol connection: send lines, read JSON replies (60 s timeout, never hangs a test)."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(address)
        self.lines = self.sock.makefile("rb")

    def send(self, line: str | bytes | dict[str, Any]) -> None:
        if isinstance(line, dict):
            line = json.dumps(line)
        if isinstance(line, str):
            line = line.encode()
        self.sock.sendall(line + b"\n")

    def read(self) -> dict[str, Any] | None:
        line = self.lines.readline()
        return json.loads(line) if line else None

    def ask(self, line: str | bytes | dict[str, Any]) -> dict[str, Any] | None:
        self.send(line)
        return self.read()

    def until(self, rid: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Events of request ``rid``, then its final reply (other ids' lines are dropped)."""
        events = []
        while True:
            msg = self.read()
            assert msg is not None, f"connection closed before request {rid!r} was answered"
            if msg.get("id") != rid:
                continue
            if "event" in msg:
                events.append(msg["event"])
            elif "warning" not in msg:
                return events, msg

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


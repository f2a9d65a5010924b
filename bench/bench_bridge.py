"""The bridge's cost: the same completions in-process and through ``llamacompat serve``.

1. Streaming overhead: one client, greedy, N tokens with a callback, alternating
   rounds between an in-process context and a bridge client (the server is a
   separate process with the same model and thread count). Overhead per token =
   (bridge wall time - in-process wall time) / N.
2. Throughput under load: 16 clients x 20 completions over the bridge, against
   the same 320 completions run one after another in-process (one model
   serves one completion at a time either way, so the ratio is the bridge's cost).

    python bench/bench_bridge.py [--tokens 256] [--rounds 5] [--clients 16] [--requests 20] [--max-overhead-ms 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from llamacompat import init_llama

PROMPT = "Once upon a time, in a small village by the sea, there lived"
THREADS = 2


def start_server(folder: str, n_ctx: int = 2048, threads: int = THREADS, parallel: int | None = None) -> tuple[subprocess.Popen, str]:
    """``llamacompat serve`` on a socket in ``folder`` (the packaged model); with ``parallel``, ``--parallel N``."""
    path = os.path.join(folder, "bench.sock")
    command = [sys.executable, "-m", "llamacompat.cli", "serve", "--socket", path, "--n-ctx", str(n_ctx),
               "--param", f"n_threads={threads}"]
    if parallel is not None:
        command += ["--parallel", str(parallel)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if "serving on" not in line:
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, path


def streaming_overhead(local, remote, n: int, rounds: int) -> dict[str, float]:
    request = {"prompt": PROMPT, "temperature": 0, "n_predict": n, "ignore_eos": True}

    def timed(ctx) -> tuple[float, str]:
        events = []
        start = time.perf_counter()
        result = ctx.completion(request, events.append)
        elapsed = time.perf_counter() - start
        assert result["tokens_predicted"] == n and len(events) == n
        return elapsed, result["text"]

    assert timed(local)[1] == timed(remote)[1], "the bridge changed the greedy text"
    walls: dict[str, list[float]] = {"local": [], "bridge": []}
    for _ in range(rounds):
        walls["local"].append(timed(local)[0])
        walls["bridge"].append(timed(remote)[0])
    local_s, bridge_s = statistics.median(walls["local"]), statistics.median(walls["bridge"])
    return {"local_tok_s": n / local_s, "bridge_tok_s": n / bridge_s,
            "overhead_ms_per_token": (bridge_s - local_s) / n * 1000.0,
            "best_overhead_ms_per_token": (min(walls["bridge"]) - min(walls["local"])) / n * 1000.0}


def load(local, socket_path: str, clients: int, requests: int, n: int) -> dict[str, float]:
    def request(k: int, r: int) -> dict:
        return {"prompt": f"Client {k}, story {r}: once upon a time", "temperature": 0, "n_predict": n,
                "ignore_eos": True}

    start = time.perf_counter()
    for r in range(requests):  # round robin, as the server's FIFO interleaves the clients (same prefix reuse)
        for k in range(clients):
            assert local.completion(request(k, r))["tokens_predicted"] == n
    local_s = time.perf_counter() - start

    errors: list[str] = []

    def client(k: int) -> None:
        with init_llama({"backend": "bridge", "socket": socket_path}) as ctx:
            for r in range(requests):
                if ctx.completion(request(k, r), lambda _e: None)["tokens_predicted"] != n:
                    errors.append(f"client {k} request {r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    bridge_s = time.perf_counter() - start
    assert not errors, errors
    total = clients * requests
    return {"completions": total, "local_completions_s": total / local_s, "bridge_completions_s": total / bridge_s,
            "local_tok_s": total * n / local_s, "bridge_tok_s": total * n / bridge_s, "ratio": local_s / bridge_s}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--load-tokens", type=int, default=16)
    parser.add_argument("--max-overhead-ms", type=float, default=1.0, help="exit 1 above this per-token overhead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        proc, path = start_server(folder)
        try:
            local = init_llama({"n_ctx": 2048, "n_threads": THREADS})
            remote = init_llama({"backend": "bridge", "socket": path})
            stream = streaming_overhead(local, remote, args.tokens, args.rounds)
            remote.release()
            print(f"streaming, {args.tokens} tokens, median of {args.rounds} alternating rounds:")
            print(f"  in-process      {stream['local_tok_s']:8.1f} tokens/s")
            print(f"  bridge          {stream['bridge_tok_s']:8.1f} tokens/s")
            print(f"  overhead        {stream['overhead_ms_per_token']:8.3f} ms/token "
                  f"(best rounds: {stream['best_overhead_ms_per_token']:.3f})")
            busy = load(local, path, args.clients, args.requests, args.load_tokens)
            print(f"load, {args.clients} clients x {args.requests} completions of {args.load_tokens} tokens:")
            print(f"  in-process      {busy['local_completions_s']:8.2f} completions/s  {busy['local_tok_s']:8.1f} tokens/s")
            print(f"  bridge          {busy['bridge_completions_s']:8.2f} completions/s  {busy['bridge_tok_s']:8.1f} tokens/s")
            print(f"  ratio           {busy['ratio']:8.3f} (bridge / in-process throughput)")
            local.release()
        finally:
            proc.terminate()
            proc.wait(30)
    return 0 if stream["overhead_ms_per_token"] <= args.max_overhead_ms else 1


if __name__ == "__main__":
    sys.exit(main())

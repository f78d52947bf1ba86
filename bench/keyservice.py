"""KeyService benchmark: key-release latency and throughput on loopback, and the cost of attesting.

The KeyService runs in its own process (`veil keyservice serve --allow-simulated`), exactly as
deployed; clients are real `RuntimeKeyClient`s with an attested session already open, so each
release is the full production path: session lookup, policy check (grant, both allow-lists),
two sealed-at-rest reads, two HPKE seals to the runtime's key, an audit append committed to
SQLite, and the client's two HPKE opens.

    veil bench keyservice --json out.json [--releases 1000] [--clients 8] [--per-client 250]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from veil.deployment import wait_http

MEASUREMENT = "a1" * 32  # the runtime measurement the owner and the user allow in this benchmark


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_keyservice(state: Path, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "veil.cli", "keyservice", "serve", "--allow-simulated"]
    cmd += ["--state-dir", str(state), "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", 30, proc)
    except BaseException:
        proc.kill()
        raise
    return proc


def setup_policy(url: str, state: Path) -> str:
    """Owner puts a model key and grants a user, who puts a request key; returns the user id."""
    from veil.attest.measurement import measure
    from veil.attest.sim import SimRoot
    from veil.attest.verify import TrustConfig
    from veil.crypto.identity import Identity
    from veil.crypto.keys import SymmetricKey
    from veil.keyservice.client import PrincipalClient
    from veil.keyservice.server import sim_root_path

    trust = TrustConfig(sim_roots=[SimRoot.load_or_create(sim_root_path(state)).public_key])
    expected = {measure("keyservice")}
    owner = PrincipalClient(url, Identity.generate(), expected_measurements=expected, trust=trust, allow_simulated=True)
    user = PrincipalClient(url, Identity.generate(), expected_measurements=expected, trust=trust, allow_simulated=True)
    owner.register()
    user.register()
    owner.put_model_key("bench-model", SymmetricKey.generate(), [MEASUREMENT])
    owner.grant("bench-model", user.identity.id)
    user.put_request_key("bench-model", SymmetricKey.generate(), [MEASUREMENT])
    owner.close()
    user.close()
    return user.identity.id


def runtime_client(url: str, state: Path):
    import logging

    from veil.attest.sim import SimProvider, SimRoot
    from veil.keyservice.client import RuntimeKeyClient
    from veil.keyservice.server import sim_root_path

    logging.getLogger("veil").setLevel(logging.ERROR)  # the sim provider warns loudly on purpose
    return RuntimeKeyClient(url, SimProvider(SimRoot.load_or_create(sim_root_path(state)), MEASUREMENT))


def _throughput_worker(url: str, state: str, user: str, n: int) -> None:
    """One concurrent client in its own process, connection and attested session.

    Says "ready" once warm, waits for "go" on stdin, then prints its start and end on the
    system-wide monotonic clock (comparable across processes).
    """
    client = runtime_client(url, Path(state))
    client.attest()
    client.release("bench-model", user)  # warm the connection
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    for _ in range(n):
        client.release("bench-model", user)
    print(json.dumps({"start": start, "end": time.monotonic()}), flush=True)
    client.close()


def measure_throughput(url: str, state: Path, user: str, clients: int, per_client: int) -> float:
    cmd = [sys.executable, __file__, "--worker", url, str(state), user, str(per_client)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    for p in procs:
        if p.stdout is None or p.stdout.readline().strip() != "ready":
            raise RuntimeError("a benchmark client failed to start")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    spans = []
    for p in procs:
        assert p.stdout is not None
        spans.append(json.loads(p.stdout.readline()))
        p.wait(timeout=60)
    return clients * per_client / (max(s["end"] for s in spans) - min(s["start"] for s in spans))


def measure_throughput_threads(url: str, state: Path, user: str, clients: int, per_client: int) -> float:
    """The same load from threads of one process, each with its own client, connection and session.

    On a small machine this leaves more CPU to the KeyService than one process per client does.
    """
    import threading

    workers = [runtime_client(url, state) for _ in range(clients)]
    for client in workers:
        client.attest()
        client.release("bench-model", user)
    go = threading.Barrier(clients + 1)

    def run(client) -> None:
        go.wait()
        for _ in range(per_client):
            client.release("bench-model", user)

    threads = [threading.Thread(target=run, args=(c,)) for c in workers]
    for t in threads:
        t.start()
    go.wait()
    start = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    for client in workers:
        client.close()
    return clients * per_client / elapsed


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="veil bench keyservice", description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.add_argument("--releases", type=int, default=1000, help="sequential releases for latency (≥ 1000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent client processes for throughput")
    parser.add_argument("--per-client", type=int, default=250, help="releases per concurrent client")
    parser.add_argument("--attests", type=int, default=30, help="attestations timed")
    parser.add_argument(
        "--client-mode", choices=["threads", "processes"], default="threads", help="how the concurrent clients run"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="veil-bench-ks-") as tmp:
        state, port = Path(tmp) / "ks", _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = start_keyservice(state, port)
        try:
            user = setup_policy(url, state)
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("attestations", total=args.attests)
                attest_ms = []
                for _ in range(args.attests):
                    client = runtime_client(url, state)
                    t0 = time.perf_counter()
                    client.attest()
                    attest_ms.append((time.perf_counter() - t0) * 1000)
                    client.close()
                    progress.advance(task)
                client = runtime_client(url, state)
                client.attest()
                for _ in range(50):  # warm-up: connection, caches, allocator
                    client.release("bench-model", user)
                task = progress.add_task("key releases (1 client)", total=args.releases)
                latencies = []
                for _ in range(args.releases):
                    t0 = time.perf_counter()
                    client.release("bench-model", user)
                    latencies.append((time.perf_counter() - t0) * 1000)
                    progress.advance(task)
                client.close()
                progress.add_task(f"throughput ({args.clients} concurrent clients)", total=None)
                measure_rate = measure_throughput_threads if args.client_mode == "threads" else measure_throughput
                rate = measure_rate(url, state, user, args.clients, args.per_client)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    result = {
        "release_p50_ms": round(statistics.median(latencies), 3),
        "release_p99_ms": round(percentile(latencies, 0.99), 3),
        "releases_per_s": round(rate, 1),
        "attest_ms": round(statistics.median(attest_ms), 3),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title="KeyService (loopback, KeyService in its own process)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, str(value))
    Console().print(table)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        _throughput_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        raise SystemExit(0)
    raise SystemExit(main(sys.argv[1:]))

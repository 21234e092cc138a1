"""Scale benchmark: hold many clients at once, broadcast to all of them, and weigh each one.

    python benchmarks/scale.py                    # 2,000 clients (about a minute here)
    python benchmarks/scale.py --clients 300      # a smaller try

Starts ``python server.py`` as in ``fanout.py`` and logs in ``--clients``
clients. The server's resident memory is read after a first batch (which also
warms up the allocator's arenas from Argon2id's 19 MiB buffers) and after all,
so the difference divided by the rest is the memory one more connected client
costs. Then ``--lines`` lines are broadcast one at a time, each waiting until
every other client has received it: the time to reach everyone, and the server
CPU per delivery.

Every login is announced to everyone already there, and each notice is a sealed
frame per recipient. The server gathers the notices of a burst (0.25 s, and up
to 2 s in a big room) into one frame per member; one notice per login would be
N(N-1)/2 sealed deliveries, about two million.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import fanout  # noqa: E402
import harness  # noqa: E402
from loadclient import ReadLoop, bench_text  # noqa: E402

from securechat import crypto_utils  # noqa: E402
from securechat.client import KnownHosts  # noqa: E402

DEFAULT_CLIENTS = 2000
#: Clients logged in before the first memory reading.
FIRST_BATCH = 100
DEFAULT_LINES = 10
#: Longest wait for one broadcast line to reach everyone, and for all the join notices.
LINE_TIMEOUT = 120.0
NOTICE_TIMEOUT = 1800.0


def run(clients_wanted: int, lines: int, work_dir: Path) -> dict[str, Any]:
    users_path = work_dir / "users.json"
    names = harness.bench_user_names(clients_wanted)
    harness.write_users_file(users_path, names)
    keys = [crypto_utils.generate_private_key() for _ in range(fanout.CLIENT_KEY_COUNT)]
    known_hosts = KnownHosts(work_dir / "known_hosts")
    clients: list[fanout.Client] = []
    server = harness.start_chat_server(work_dir, users_path)
    read_loop = ReadLoop()
    read_loop.start()
    try:
        rss_idle = server.rss_kib()
        first = min(FIRST_BATCH, clients_wanted // 2)
        started = time.perf_counter()
        fanout.connect_chat_clients(server, names[:first], keys, known_hosts, clients, read_loop)
        fanout.wait_until(
            lambda: sum(c.notice_frames for c in clients) >= first * (first - 1) // 2, NOTICE_TIMEOUT, clients
        )
        rss_first = server.rss_kib()
        fanout.log(f"{first} clients in: server RSS {rss_first / 1024:.0f} MiB")
        fanout.connect_chat_clients(server, names[first:], keys, known_hosts, clients, read_loop)
        login_seconds = time.perf_counter() - started
        fanout.log(f"{clients_wanted} clients logged in after {login_seconds:.0f} s; waiting for the join notices")
        expected_notices = clients_wanted * (clients_wanted - 1) // 2
        if not fanout.wait_until(
            lambda: sum(c.notice_frames for c in clients) >= expected_notices, NOTICE_TIMEOUT, clients
        ):
            raise fanout.BenchmarkError("the join notices did not all arrive")
        settled_seconds = time.perf_counter() - started
        rss_all = server.rss_kib()
        threads = server.threads()
        fanout.log(f"all join notices delivered after {settled_seconds:.0f} s; server RSS {rss_all / 1024:.0f} MiB")

        per_line = clients_wanted - 1
        reach_times = []
        cpu_start = server.cpu_seconds()
        base = fanout.delivered(clients)
        for number in range(lines):
            sent_at = time.perf_counter()
            clients[number % clients_wanted].send_text(bench_text(number, sent_at))
            target = base + (number + 1) * per_line
            if not fanout.wait_until(lambda target=target: fanout.delivered(clients) >= target, LINE_TIMEOUT, clients):
                raise fanout.BenchmarkError(f"line {number} did not reach everyone in {LINE_TIMEOUT:.0f} s")
            reach_times.append((time.perf_counter() - sent_at) * 1000)
        cpu = server.cpu_seconds() - cpu_start
        deliveries = lines * per_line
        reach_times.sort()
        return {
            "clients": clients_wanted,
            "login_s": login_seconds,
            "join_notices_settled_s": settled_seconds,
            "server_threads": threads,
            "rss_idle_mib": rss_idle / 1024,
            "rss_after_first_batch_mib": rss_first / 1024,
            "rss_all_mib": rss_all / 1024,
            "rss_per_client_kib": (rss_all - rss_first) / (clients_wanted - first),
            "peak_rss_mib": server.peak_rss_kib() / 1024,
            "broadcast_lines": lines,
            "reach_everyone_ms_median": reach_times[len(reach_times) // 2],
            "reach_everyone_ms_max": reach_times[-1],
            "broadcast_deliveries_per_s": deliveries / (sum(reach_times) / 1000),
            "server_cpu_us_per_delivery": cpu / deliveries * 1e6,
        }
    finally:
        server.stop()
        fanout.close_all(clients)
        read_loop.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Hold many clients; broadcast to all; memory per client.")
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS)
    parser.add_argument("--lines", type=int, default=DEFAULT_LINES)
    parser.add_argument("--json", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    if args.clients < 4:
        parser.error("--clients must be at least 4")
    harness.raise_open_file_limit(4 * args.clients + 256)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    source = harness.source_info()
    with tempfile.TemporaryDirectory(prefix="chat-scale-") as temp:
        result = run(args.clients, args.lines, Path(temp))
    result["date_utc"] = started
    result["source"] = source
    result["machine"] = harness.machine_info()
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    fanout.run_main(main)

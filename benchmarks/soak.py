"""Soak: a long paced run that must lose and duplicate nothing, and leave the server as it found it.

    python benchmarks/soak.py                   # 200 clients, 500,000 deliveries, 1,000 cycles (about 10 minutes)
    python benchmarks/soak.py --quick           # 20 clients, 5,000 deliveries, 50 cycles (under a minute)
    python benchmarks/soak.py --clients 100 --deliveries 100000 --cycles 300 --json benchmarks/soak-results.json
    python benchmarks/soak.py --only-slow-readers   # phase 3 alone: RSS across rounds of slow readers (about a minute)

It starts the real server (``python server.py``, flood limit out of reach as in
``fanout.py``) and runs two phases:

1. Soak: ``--clients`` clients log in; they take turns sending numbered lines,
   ``--rate`` lines a second in all (default: 10, about 2,000 deliveries/s at
   200 clients, under half of what the server sustains on this machine, see
   BENCHMARKS.md), until ``--deliveries`` deliveries have been asked for. The
   server's RSS, thread count and CPU time are sampled every second.
2. Cycles: the soak clients disconnect, the thread count settles, then
   ``--cycles`` times a client connects, logs in and leaves (a few at a time).
   The server's thread count after a settle wait is compared with before.
3. Slow readers, on a server of their own with its default send queue (512
   messages): ``--slow-rounds`` times, ``--slow-clients`` clients log in and
   never read while one talker sends large lines until the server has dropped
   them all (SendQ exceeded). The server's RSS is read after each round: with a
   thread per connection, glibc's malloc arenas used to make it creep round after
   round (issue 15, item 9).

What is verified, and how (``loadclient.SamplingChatClient`` does not decrypt
every delivery: that would cost the load side ~0.7 ms of RSA per delivery,
about 6 minutes of both cores for 500,000):

* every frame's sequence number, as it arrives: the server numbers each
  connection's frames, and a gap or a repeat stops that client with an error
  (a lost or duplicated delivery on one connection cannot pass unseen);
* per client, the count of chat frames received against the lines sent (the
  others' lines, and its own as the server's echo of each):
  missing = expected - received, extra (duplicates) = received - expected;
* a random sample of deliveries (``--verify-samples`` in all) is opened in full
  (HMAC, AES-GCM, RSA unwrap); each must name the sender that sent its number
  (line number n was sent by client n mod N) and no (sender, number) may appear
  twice at one client.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
from fanout import (  # noqa: E402
    LOGIN_WORKERS,
    BenchmarkError,
    close_all,
    log,
    percentile,
    run_main,
    save_report,
    start_report,
    wait_until,
)
from loadclient import ReadLoop, SamplingChatClient, bench_text, new_clients  # noqa: E402

from securechat import crypto_utils  # noqa: E402
from securechat.client import ChatError, KnownHosts  # noqa: E402

DEFAULT_CLIENTS = 200
DEFAULT_DELIVERIES = 500_000
DEFAULT_CYCLES = 1000
DEFAULT_RATE = 10.0
QUICK_CLIENTS = 20
QUICK_DELIVERIES = 5_000
QUICK_CYCLES = 50
QUICK_RATE = 20.0
#: Deliveries opened in full across all clients.
DEFAULT_VERIFY_SAMPLES = 5000
#: Client key pairs shared by all load clients (the server binds sessions to keys, not keys to people).
KEY_COUNT = 8
#: Seconds between two readings of the server's RSS, threads and CPU.
SAMPLE_INTERVAL = 1.0
#: Share of the soak at its start and at its end whose readings are compared.
EDGE_FRACTION = 0.10
#: Connect/log in/leave cycles run at once (each needs a distinct account: same-name logins replace each other).
CYCLE_WORKERS = 4
#: Longest wait for the deliveries after the last line, and for the thread count to settle.
DRAIN_TIMEOUT = 120.0
SETTLE_TIMEOUT = 30.0
#: Thread count allowed above the starting value once settled (none).
THREAD_SLACK = 0
#: The server's password-hashing pool starts its threads at the first logins and keeps them.
DEFAULT_HASH_WORKERS = 2
#: The soak's backlog of join notices may delay pongs past the default keepalive timeout.
DEFAULT_SERVER_ARGS: tuple[str, ...] = ("--ping-timeout", "600")
DEFAULT_SLOW_ROUNDS = 6
DEFAULT_SLOW_CLIENTS = 100
QUICK_SLOW_ROUNDS = 2
QUICK_SLOW_CLIENTS = 10
#: The slow readers' server keeps its default queue per client, so that they are dropped.
SLOW_SEND_QUEUE = 512
#: Characters in each of the talker's lines: large, so that queues fill in a few hundred lines.
SLOW_LINE_CHARS = 16 * 1024
#: Lines the talker may have sent and not yet heard back (its own echo): it never falls behind itself.
SLOW_LINES_IN_FLIGHT = 20
#: Longest a round may take to get every slow reader dropped.
SLOW_ROUND_TIMEOUT = 120.0
#: Seconds the server is left alone after a round, before its RSS is read.
SLOW_SETTLE = 1.0


class ServerSampler:
    """Reads the server's RSS, thread count and CPU time every ``interval`` seconds, in a thread."""

    def __init__(self, server: harness.ServerProcess, interval: float = SAMPLE_INTERVAL) -> None:
        self.server = server
        self.interval = interval
        #: (time, RSS KiB, threads, CPU s); appended by the sampling thread only.
        self.readings: list[tuple[float, int, int, float]] = []
        # Set by stop(): ends the sampling loop.
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                reading = (time.perf_counter(), self.server.rss_kib(), self.server.threads(), self.server.cpu_seconds())
            except (OSError, KeyError):
                return  # the server has gone
            self.readings.append(reading)
            self._stopping.wait(self.interval)

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()


def compare_edges(readings: Sequence[tuple[float, int, int, float]], start: float, end: float) -> dict[str, Any]:
    """RSS and threads in the first and last ``EDGE_FRACTION`` of [start, end]."""
    span = end - start
    first = [r for r in readings if start <= r[0] <= start + EDGE_FRACTION * span]
    last = [r for r in readings if end - EDGE_FRACTION * span <= r[0] <= end]
    if not first or not last:
        return {"readings": len(readings)}

    def mean(values: Sequence[float]) -> float:
        return sum(values) / len(values)

    rss_first, rss_last = mean([r[1] for r in first]), mean([r[1] for r in last])
    # Growth that stops early (allocator warm-up) is not a leak; growth in the second half would be.
    middle = [r[1] for r in readings if start + 0.45 * span <= r[0] <= start + 0.55 * span] or [rss_first]
    return {
        "readings": len(readings),
        "first_readings": len(first),
        "last_readings": len(last),
        "rss_first_mean_kib": rss_first,
        "rss_last_mean_kib": rss_last,
        "rss_growth_kib": rss_last - rss_first,
        "rss_growth_fraction": (rss_last - rss_first) / rss_first,
        "rss_middle_mean_kib": mean(middle),
        "rss_growth_second_half_kib": rss_last - mean(middle),
        "rss_max_kib": max(r[1] for r in readings if start <= r[0] <= end),
        "threads_first_max": max(r[2] for r in first),
        "threads_last_max": max(r[2] for r in last),
        "threads_max": max(r[2] for r in readings if start <= r[0] <= end),
        "server_cpu_fraction": (last[-1][3] - first[0][3]) / max(last[-1][0] - first[0][0], 1e-9),
    }


def wait_for_threads(server: harness.ServerProcess, target: int, timeout: float) -> tuple[int, float]:
    """Wait until the server has at most ``target`` threads; returns the count and the seconds waited."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        count = server.threads()
        if count <= target:
            return count, time.perf_counter() - started
        time.sleep(0.1)
    return server.threads(), time.perf_counter() - started


def hash_workers(server_args: Sequence[str]) -> int:
    """The server's ``--hash-workers`` as given in ``server_args`` (last one wins), else its default."""
    workers = DEFAULT_HASH_WORKERS
    for index, arg in enumerate(server_args):
        if arg == "--hash-workers" and index + 1 < len(server_args):
            workers = int(server_args[index + 1])
        elif arg.startswith("--hash-workers="):
            workers = int(arg.split("=", 1)[1])
    return workers


# --------------------------------------------------------------------------- phases


def run_soak(clients: Sequence[SamplingChatClient], lines: int, rate: float, verify_samples: int) -> dict[str, Any]:
    """Send ``lines`` numbered lines at ``rate`` a second, clients taking turns; check what arrived."""
    size = len(clients)
    base = [client.chat_frames for client in clients]
    probability = min(1.0, verify_samples / max(1, lines * (size - 1)))
    for client in clients:
        client.sample_probability = probability
    sent_by = [0] * size
    interval = 1.0 / rate
    worst_lag = 0.0
    send_errors = 0
    busy_before, own_before = harness.machine_busy_seconds(), harness.cpu_seconds()
    started = time.perf_counter()
    for number in range(lines):
        due = started + number * interval
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        worst_lag = max(worst_lag, time.perf_counter() - due)
        sender = number % size
        try:
            clients[sender].send_text(bench_text(number, time.perf_counter()))
            sent_by[sender] += 1
        except ChatError:
            send_errors += 1
        if number % 1000 == 0 and any(client.failure for client in clients):
            break
    sent_end = time.perf_counter()
    # Everything but this benchmark (the server included) meanwhile: the machine is shared.
    others_cpu = harness.machine_busy_seconds() - busy_before - (harness.cpu_seconds() - own_before)
    total_sent = sum(sent_by)
    # Every client gets every line: the others' and, as the echo that says it was taken, its own.
    expected = [total_sent] * size

    def received(index: int) -> int:
        return clients[index].chat_frames - base[index]

    drained = wait_until(lambda: all(received(i) >= expected[i] for i in range(size)), DRAIN_TIMEOUT, [])
    time.sleep(1.0)  # anything extra (a duplicate) would arrive now
    for client in clients:
        client.sample_probability = 0.0
    missing = sum(max(0, expected[i] - received(i)) for i in range(size))
    extra = sum(max(0, received(i) - expected[i]) for i in range(size))
    latencies: list[float] = []
    wrong_sender = duplicates = verify_failures = opened = 0
    names = [client.username for client in clients]
    for client in clients:
        chats, failed = client.open_chats(client.take_raw_samples())
        verify_failures += failed
        seen: Counter[tuple[str, int]] = Counter()
        for arrived, chat in chats:
            opened += 1
            # bench_text: "t=<send time> m=<number> xxx..."
            sent_text, number_text = chat.text.split(" ", 2)[:2]
            number = int(number_text[2:])
            if names[number % size] != chat.sender:
                wrong_sender += 1
            seen[(chat.sender, number)] += 1
            latencies.append((arrived - float(sent_text[2:])) * 1000)
        duplicates += sum(count - 1 for count in seen.values() if count > 1)
    latencies.sort()
    return {
        "lines_sent": total_sent,
        "send_errors": send_errors,
        "deliveries_expected": sum(expected),
        "deliveries_received": sum(received(i) for i in range(size)),
        "missing": missing,
        "extra": extra,
        "drained": drained,
        "seconds": sent_end - started,
        "offered_deliveries_per_s": rate * (size - 1),
        "worst_send_lag_ms": worst_lag * 1000,
        "server_and_other_cpu_fraction": others_cpu / (sent_end - started),
        "clients_failed": [client.failure for client in clients if client.failure],
        "opened": opened,
        "verify_failures": verify_failures,
        "wrong_sender": wrong_sender,
        "duplicates_in_sample": duplicates,
        "latency_p50_ms": percentile(latencies, 0.5) if latencies else None,
        "latency_p99_ms": percentile(latencies, 0.99) if latencies else None,
        "window": (started, sent_end),
    }


def log_in_all(
    server: harness.ServerProcess,
    names: Sequence[str],
    keys: Sequence[crypto_utils.PrivateKey],
    known_hosts: KnownHosts,
    clients: list[SamplingChatClient],
    read_loop: ReadLoop,
) -> None:
    """Log ``names`` in, a few at a time, appending each client to ``clients`` first (for the caller to close);
    ``read_loop`` reads them all once logged in."""
    batch = new_clients(server, len(names), keys, known_hosts, read_loop=read_loop)
    clients.extend(batch)
    with ThreadPoolExecutor(max_workers=LOGIN_WORKERS, thread_name_prefix="soak-login") as pool:
        for future in [
            pool.submit(client.login, name, harness.BENCH_PASSWORD) for client, name in zip(batch, names, strict=True)
        ]:
            future.result()


def run_cycles(
    server: harness.ServerProcess,
    names: Sequence[str],
    keys: Sequence[crypto_utils.PrivateKey],
    known_hosts: KnownHosts,
    cycles: int,
) -> dict[str, Any]:
    """``cycles`` times: connect, log in, leave; ``len(names)`` at a time, one account each."""
    failures: Counter[str] = Counter()
    # Guards failures (workers count into it).
    failures_lock = threading.Lock()

    def worker(index: int, count: int) -> None:
        for _ in range(count):
            (client,) = new_clients(server, 1, keys, known_hosts, first_key=index)
            try:
                client.login(names[index], harness.BENCH_PASSWORD)
                client.leave("cycle")
            except ChatError as exc:
                with failures_lock:
                    failures[str(exc)] += 1
            finally:
                client.close()

    workers = len(names)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="soak-cycle") as pool:
        shares = [cycles // workers + (1 if index < cycles % workers else 0) for index in range(workers)]
        for future in [pool.submit(worker, index, share) for index, share in enumerate(shares)]:
            future.result()
    return {"cycles": cycles, "seconds": time.perf_counter() - started, "failures": dict(failures)}


def soak_once(args: argparse.Namespace, work_dir: Path, report: dict[str, Any]) -> None:
    size = args.clients
    names = harness.bench_user_names(size + CYCLE_WORKERS)
    users_path = work_dir / "users.json"
    harness.write_users_file(users_path, names)
    keys = [crypto_utils.generate_private_key() for _ in range(KEY_COUNT)]
    lines = math.ceil(args.deliveries / (size - 1))
    server_args = [*DEFAULT_SERVER_ARGS, *args.server_arg]
    server = harness.start_chat_server(work_dir, users_path, *server_args)
    clients: list[SamplingChatClient] = []
    sampler = ServerSampler(server)
    read_loop = ReadLoop()
    read_loop.start()
    try:
        threads_idle, rss_idle = server.threads(), server.rss_kib()
        sampler.start()
        known_hosts = KnownHosts(work_dir / "known_hosts")
        log(f"soak: logging {size} clients in")
        log_in_all(server, names[:size], keys, known_hosts, clients, read_loop)
        notices = size * (size - 1) // 2
        if not wait_until(lambda: sum(c.notice_frames for c in clients) >= notices, DRAIN_TIMEOUT, clients):
            raise BenchmarkError("the join notices did not all arrive")
        threads_connected = server.threads()
        log(
            f"soak: {lines} lines at {args.rate:g} lines/s "
            f"({lines * (size - 1)} deliveries, ~{lines / args.rate:.0f} s)"
        )
        soak = run_soak(clients, lines, args.rate, args.verify_samples)
        window = soak.pop("window")
        soak["server"] = compare_edges(sampler.readings, *window)
        log(
            f"soak: {soak['deliveries_received']} of {soak['deliveries_expected']} deliveries, "
            f"{soak['missing']} missing, {soak['extra']} extra"
        )
        close_all(clients)
        # Idle plus the hashing pool, which the first logins started and which stays.
        threads_settled, settle_s = wait_for_threads(server, threads_idle + hash_workers(server_args), SETTLE_TIMEOUT)
        log(
            f"cycles: {args.cycles} connect/log in/leave, {CYCLE_WORKERS} at a time (threads before: {threads_settled})"
        )
        cycles = run_cycles(server, names[size:], keys, known_hosts, args.cycles)
        threads_after, after_settle_s = wait_for_threads(server, threads_settled, SETTLE_TIMEOUT)
        sampler.stop()
        cycles.update(
            threads_before=threads_settled,
            threads_after=threads_after,
            settle_s=after_settle_s,
            rss_before_kib=soak["server"].get("rss_last_mean_kib"),
            rss_after_kib=server.rss_kib(),
        )
        report["settings"] = {
            "clients": size,
            "deliveries_requested": args.deliveries,
            "lines": lines,
            "rate_lines_per_s": args.rate,
            "cycles": args.cycles,
            "cycle_workers": CYCLE_WORKERS,
            "verify_samples": args.verify_samples,
            "server_args": server_args,
        }
        report["server"] = {
            "threads_idle": threads_idle,
            "rss_idle_kib": rss_idle,
            "threads_connected": threads_connected,
            "threads_after_soak_clients_left": threads_settled,
            "settle_after_soak_s": settle_s,
            "peak_rss_kib": server.peak_rss_kib(),
        }
        report["soak"] = soak
        report["cycles"] = cycles
        report["readings"] = [
            {"t": round(t - window[0], 2), "rss_kib": rss, "threads": threads, "cpu_s": round(cpu, 2)}
            for t, rss, threads, cpu in sampler.readings
        ]
    except BenchmarkError:
        log(f"the server's log ends with:\n{server.log_tail(10)}")
        raise
    finally:
        sampler.stop()
        status = server.stop()
        close_all(clients)
        read_loop.stop()
        if status not in (0, -15):
            log(f"server exited with status {status}: {server.log_tail(5)}")


class SlowReader(SamplingChatClient):
    """Logs in like any client, then never reads: the server queues for it until it drops it."""

    def _run_reader(self) -> None:
        self._closing.wait()  # set by close(); not a byte is read meanwhile


def run_slow_rounds(
    work_dir: Path, slow_clients: int, rounds: int, keys: Sequence[crypto_utils.PrivateKey], server_args: Sequence[str]
) -> dict[str, Any]:
    """``rounds`` times, ``slow_clients`` slow readers log in and are flooded until dropped; RSS after each."""
    slow_dir = work_dir / "slow-readers"
    slow_dir.mkdir(exist_ok=True)
    names = harness.bench_user_names(slow_clients + 1)
    users_path = slow_dir / "users.json"
    harness.write_users_file(users_path, names)
    args = [*DEFAULT_SERVER_ARGS, "--send-queue", str(SLOW_SEND_QUEUE), *server_args]
    server = harness.start_chat_server(slow_dir, users_path, *args)
    known_hosts = KnownHosts(slow_dir / "known_hosts")
    (talker,) = new_clients(server, 1, keys, known_hosts)
    per_round: list[dict[str, Any]] = []
    try:
        talker.login(names[0], harness.BENCH_PASSWORD)
        threads_base = server.threads() + hash_workers(args)  # the hashing pool starts at the first logins
        rss_start = server.rss_kib()
        log(f"slow readers: {rounds} rounds of {slow_clients}; server RSS {rss_start / 1024:.1f} MiB")
        sent = 0
        for number in range(rounds):
            slow = [
                SlowReader(
                    server.host,
                    server.port,
                    server_fingerprint=server.fingerprint,
                    known_hosts=known_hosts,
                    private_key=keys[index % len(keys)],
                    pace=False,
                )
                for index in range(slow_clients)
            ]
            started = time.perf_counter()
            try:
                with ThreadPoolExecutor(max_workers=LOGIN_WORKERS, thread_name_prefix="soak-slow") as pool:
                    for future in [
                        pool.submit(client.login, name, harness.BENCH_PASSWORD)
                        for client, name in zip(slow, names[1:], strict=True)
                    ]:
                        future.result()
                peak_threads = server.threads()
                lines = 0
                deadline = time.monotonic() + SLOW_ROUND_TIMEOUT
                while server.threads() > threads_base:
                    if time.monotonic() > deadline or talker.failure:
                        raise BenchmarkError(f"round {number + 1}: the slow readers were not all dropped")
                    if sent - talker.chat_frames >= SLOW_LINES_IN_FLIGHT:
                        time.sleep(0.001)
                        continue
                    talker.send_text(bench_text(sent, time.perf_counter(), SLOW_LINE_CHARS))
                    sent += 1
                    lines += 1
            finally:
                close_all(slow)
            seconds = time.perf_counter() - started
            time.sleep(SLOW_SETTLE)
            rss = server.rss_kib()
            per_round.append({"lines": lines, "seconds": seconds, "peak_threads": peak_threads, "rss_kib": rss})
            log(f"slow readers: round {number + 1}: {lines} lines in {seconds:.1f} s, RSS {rss / 1024:.1f} MiB")
        return {
            "rounds": per_round,
            "slow_clients": slow_clients,
            "rss_start_kib": rss_start,
            "peak_rss_kib": server.peak_rss_kib(),
            "malloc_arena_max_env": os.environ.get("MALLOC_ARENA_MAX", ""),
            "server_args": args,
        }
    finally:
        talker.close()
        server.stop()


# --------------------------------------------------------------------------- report


def slow_reader_lines(slow: dict[str, Any]) -> list[str]:
    rss = [slow["rss_start_kib"]] + [entry["rss_kib"] for entry in slow["rounds"]]
    arenas = slow["malloc_arena_max_env"]
    return [
        f"Slow readers: {len(slow['rounds'])} rounds of {slow['slow_clients']} clients that never read, all dropped "
        f"({sum(entry['lines'] for entry in slow['rounds'])} lines of {SLOW_LINE_CHARS} characters); "
        + (f"MALLOC_ARENA_MAX={arenas} in the environment" if arenas else "MALLOC_ARENA_MAX not set"),
        "  server RSS before the first and after each round (MiB): " + " -> ".join(f"{kib / 1024:.1f}" for kib in rss),
    ]


def summary_lines(report: dict[str, Any]) -> list[str]:
    if "soak" not in report:
        return slow_reader_lines(report["slow_readers"])
    settings, soak, cycles, server = report["settings"], report["soak"], report["cycles"], report["server"]
    edges = soak["server"]
    lines = [
        f"Soak: {settings['clients']} clients, {soak['lines_sent']} lines at {settings['rate_lines_per_s']:g} lines/s "
        f"({soak['offered_deliveries_per_s']:.0f} deliveries/s offered) over {soak['seconds']:.0f} s",
        f"  deliveries: {soak['deliveries_received']} received of {soak['deliveries_expected']} expected; "
        f"missing {soak['missing']}, extra {soak['extra']} (target 0 and 0: "
        f"{'met' if soak['missing'] == 0 and soak['extra'] == 0 and not soak['clients_failed'] else 'missed'})",
        f"  opened in full: {soak['opened']} deliveries, {soak['verify_failures']} failed to verify, "
        f"{soak['wrong_sender']} with the wrong sender, {soak['duplicates_in_sample']} duplicated (sender, number)",
        f"  latency of the opened sample: p50 {soak['latency_p50_ms'] or 0:.1f} ms, "
        f"p99 {soak['latency_p99_ms'] or 0:.1f} ms",
    ]
    if "rss_first_mean_kib" in edges:
        lines.append(
            f"  server RSS first 10%: {edges['rss_first_mean_kib'] / 1024:.1f} MiB, last 10%: "
            f"{edges['rss_last_mean_kib'] / 1024:.1f} MiB ({edges['rss_growth_fraction'] * 100:+.1f} %; "
            f"{edges['rss_growth_second_half_kib']:+.0f} KiB in the second half); threads "
            f"{edges['threads_first_max']} -> {edges['threads_last_max']}"
        )
        others = max(0.0, soak["server_and_other_cpu_fraction"] - edges["server_cpu_fraction"])
        lines.append(
            f"  CPU during the soak: server {edges['server_cpu_fraction']:.2f} cores, "
            f"other processes {others:.2f} cores (of {report['machine']['nproc']})"
        )
    if soak["clients_failed"]:
        lines.append(f"  clients that stopped: {Counter(soak['clients_failed']).most_common(3)}")
    settled = cycles["threads_after"] <= cycles["threads_before"] + THREAD_SLACK
    lines += [
        f"  server threads: {server['threads_idle']} idle, {server['threads_connected']} with the clients, "
        f"{server['threads_after_soak_clients_left']} after they left ({server['settle_after_soak_s']:.1f} s)",
        f"Cycles: {cycles['cycles']} connect/log in/leave in {cycles['seconds']:.1f} s, "
        f"{sum(cycles['failures'].values())} failed; server threads {cycles['threads_before']} before, "
        f"{cycles['threads_after']} after (settled in {cycles['settle_s']:.1f} s): "
        f"{'back where they started' if settled else 'GREW'}",
    ]
    if cycles["failures"]:
        lines.append("  cycle failures: " + ", ".join(f"{n} x {why}" for why, n in cycles["failures"].items()))
    if "slow_readers" in report:
        lines += slow_reader_lines(report["slow_readers"])
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--clients", type=int, help=f"default {DEFAULT_CLIENTS}; quick {QUICK_CLIENTS}")
    parser.add_argument("--deliveries", type=int, help=f"default {DEFAULT_DELIVERIES}; quick {QUICK_DELIVERIES}")
    parser.add_argument("--cycles", type=int, help=f"default {DEFAULT_CYCLES}; quick {QUICK_CYCLES}")
    parser.add_argument("--rate", type=float, help=f"lines/s from all clients (default {DEFAULT_RATE:g})")
    parser.add_argument("--verify-samples", type=int, default=DEFAULT_VERIFY_SAMPLES, help="deliveries opened in full")
    parser.add_argument(
        "--slow-rounds", type=int, help=f"slow-reader rounds (default {DEFAULT_SLOW_ROUNDS}; quick {QUICK_SLOW_ROUNDS})"
    )
    parser.add_argument(
        "--slow-clients", type=int, help=f"readers a round (default {DEFAULT_SLOW_CLIENTS}; quick {QUICK_SLOW_CLIENTS})"
    )
    parser.add_argument("--only-slow-readers", action="store_true", help="run the slow-reader rounds alone")
    parser.add_argument("--json", type=Path, help="also write the results here (besides benchmarks/results/)")
    parser.add_argument("--work-dir", type=Path, help="keep the server's files and log here")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra server option (repeat: --server-arg=--flag)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.clients = args.clients or (QUICK_CLIENTS if args.quick else DEFAULT_CLIENTS)
    args.deliveries = args.deliveries or (QUICK_DELIVERIES if args.quick else DEFAULT_DELIVERIES)
    args.cycles = args.cycles if args.cycles is not None else (QUICK_CYCLES if args.quick else DEFAULT_CYCLES)
    args.rate = args.rate or (QUICK_RATE if args.quick else DEFAULT_RATE)
    if args.slow_rounds is None:
        args.slow_rounds = QUICK_SLOW_ROUNDS if args.quick else DEFAULT_SLOW_ROUNDS
    args.slow_clients = args.slow_clients or (QUICK_SLOW_CLIENTS if args.quick else DEFAULT_SLOW_CLIENTS)
    if args.clients < 2:
        raise SystemExit("--clients must be at least 2")
    if args.only_slow_readers and args.slow_rounds < 1:
        raise SystemExit("--only-slow-readers needs --slow-rounds of at least 1")
    harness.raise_open_file_limit(4 * (max(args.clients, args.slow_clients) + CYCLE_WORKERS) + 256)
    report = start_report("soak.py", argv)
    with tempfile.TemporaryDirectory(prefix="chat-soak-") as temp:
        work_dir = args.work_dir or Path(temp)
        work_dir.mkdir(parents=True, exist_ok=True)
        if not args.only_slow_readers:
            soak_once(args, work_dir, report)
        if args.slow_rounds > 0:
            keys = [crypto_utils.generate_private_key() for _ in range(KEY_COUNT)]
            report["slow_readers"] = run_slow_rounds(
                work_dir, args.slow_clients, args.slow_rounds, keys, args.server_arg
            )
    save_report(report, "soak", summary_lines(report), args.json)
    return 0


if __name__ == "__main__":
    run_main(main)

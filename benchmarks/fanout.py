"""Fan-out benchmark: what one chat line costs the server per recipient, and how fast it arrives.

    python benchmarks/fanout.py                         # N = 10, 50, 200, 1000 (several minutes)
    python benchmarks/fanout.py --quick                 # N = 10, 50, short phases (under a minute)
    python benchmarks/fanout.py --sizes 5 --duration 1 --json out.json --plot out.png

For each N it starts the real server (``python server.py``) as a child process,
logs N clients in with the project's own ``ChatClient`` (see ``loadclient.py``
for how they avoid decrypting every delivery), and runs two phases:

* paced: the N clients take turns sending, 50 lines a second in all (each
  client one line every N/50 s), capped at 10,000 deliveries a second (so 10
  lines a second at N = 1000). A random sample of deliveries is opened after the
  phase; each line carries its send time, which gives the end-to-end latency.
* saturation: a closed loop keeps a fixed number of lines in flight (sent but
  not yet received by every other client), so the server is never idle and its
  queues stay bounded. Deliveries per second, and the server's own CPU time
  (``/proc/PID/stat``) per delivery, are measured over the window.

``--backend redis`` measures a Redis deployment instead: for each N the
benchmark starts its own ``redis-server`` (a free loopback port, a temp dir, no
persistence), copies the accounts in (``server.py import-users``) and runs the
server with ``--backend redis://...``; ``--workers N`` runs N server processes on
the port. CPU is then that of every server process (the supervisor and its
workers) and, apart, redis-server's own; with the load generator's (this
process) beside them. ``benchmarks/workers.py`` compares the deployments side by side.

It also measures, on the same machine and in the same run, two references:
the crypto floor (the bare per-delivery cryptography the design requires:
one RSA-OAEP wrap, AES-GCM of a typical body, the session HMAC, in a tight
loop) and a plaintext baseline (``plain_server.py``: thread-per-client
broadcast, same framing, no cryptography) driven by the same load. It prints
the server's CPU per delivery divided by (floor + plaintext per delivery).

All traffic stays on 127.0.0.1; every phase is bounded in time; every server
process and client thread is ended on the way out, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import math
import os
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import harness  # noqa: E402
from loadclient import (  # noqa: E402
    PlainLoadClient,
    ReadLoop,
    Sample,
    SamplingChatClient,
    bench_text,
    new_clients,
)

from securechat import crypto_utils  # noqa: E402
from securechat.channel import SecureChannel  # noqa: E402
from securechat.client import KnownHosts  # noqa: E402
from securechat.protocol import (  # noqa: E402
    CLIENT_KINDS,
    ENVELOPE_HEADER,
    Chat,
    Kind,
    Say,
    associated_data,
)

DEFAULT_SIZES = (10, 50, 200, 1000)
QUICK_SIZES = (10, 50)
#: Measured seconds of each phase (after its warm-up); --quick uses QUICK_DURATION.
DEFAULT_DURATION = 10.0
QUICK_DURATION = 2.0
#: Warm-up before each measured window, as a fraction of the window, at most MAX_WARMUP.
WARMUP_FRACTION = 0.5
MAX_WARMUP = 2.0
#: Paced load: lines per second from all clients together ...
PACED_MESSAGES_PER_SECOND = 50.0
#: ... but no more than this many deliveries per second (10 lines/s at N = 1000).
PACED_DELIVERIES_CAP = 10_000.0
#: Deliveries the closed loop keeps in flight at saturation (at least MIN_WINDOW_MESSAGES lines).
SATURATION_IN_FLIGHT = 2000
MIN_WINDOW_MESSAGES = 4
#: Deliveries opened in full after each phase: for latency (paced) and as a check (saturation).
LATENCY_SAMPLES = 3000
VERIFY_SAMPLES = 300
#: Client key pairs shared by all load clients (generating 1000 RSA keys would take minutes).
CLIENT_KEY_COUNT = 4
#: Logins run at once (the server hashes two passwords at a time anyway).
LOGIN_WORKERS = 8
LOGIN_TIMEOUT = 120.0
#: Longest wait for queued deliveries to arrive after a phase, and for the join notices.
DRAIN_TIMEOUT = 120.0
POLL_INTERVAL = 0.0005
#: Seconds each reference loop runs (--quick uses a quarter).
REFERENCE_SECONDS = 2.0
REFERENCE_REPEATS = 5
#: Targets from the issue: reported, never asserted.
TARGET_RATIO = 1.25
TARGET_RATIO_SIZES = (50, 200)
TARGET_P99_MS = {200: 25.0, 1000: 100.0}

Client = SamplingChatClient | PlainLoadClient
#: Extra server options, besides the limits harness.start_chat_server lifts. The keepalive
#: ping waits behind queued deliveries, so during the N = 1000 join storm (100 s of backlog)
#: the default 50 s timeout drops healthy clients; see BENCHMARKS.md.
DEFAULT_SERVER_ARGS: tuple[str, ...] = ("--ping-timeout", "600")


@dataclass
class Phases:
    warmup: float
    duration: float


class BenchmarkError(Exception):
    """The benchmark could not run as designed (a client dropped, a phase did not drain)."""


#: Where every run of storm.py and soak.py leaves its JSON (git-ignored).
RESULTS_DIR = BENCH_DIR / "results"


def start_report(script: str, argv: list[str] | None) -> dict[str, Any]:
    """The head every benchmark report starts with: how to run it again, when, where, what code."""
    command = f"python benchmarks/{script} " + " ".join(shlex.quote(arg) for arg in (argv or sys.argv[1:]))
    return {
        "command": command.strip(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "machine": harness.machine_info(),
        "source": harness.source_info(),
    }


def save_report(report: dict[str, Any], name: str, summary: list[str], json_path: Path | None) -> None:
    """Print the summary and write the report into RESULTS_DIR (and to ``json_path`` too, if given)."""
    report["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    report["summary"] = summary
    print("\n".join(summary))
    RESULTS_DIR.mkdir(exist_ok=True)
    outputs = [RESULTS_DIR / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"]
    if json_path:
        outputs.append(json_path)
    for path in outputs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        log(f"wrote {path}")


def run_main(main: Callable[[], int]) -> None:
    """Run a benchmark's ``main`` as a program: a failure or Ctrl-C is one line and an exit status."""
    try:
        sys.exit(main())
    except BenchmarkError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty sequence."""
    index = max(0, math.ceil(fraction * len(sorted_values)) - 1)
    return sorted_values[index]


def paced_rate(size: int, messages_per_second: float, deliveries_cap: float) -> float:
    """Lines per second for the paced phase at N = ``size``."""
    return min(messages_per_second, deliveries_cap / size)


# --------------------------------------------------------------------------- references


def timed_loop(step: Callable[[], object], seconds: float, max_iterations: int = 2_000_000) -> float:
    """CPU microseconds per call of ``step``, run for about ``seconds`` of this thread's CPU time.

    Thread CPU time, not wall time: another process taking the core for a while
    (this machine is shared) does not count against the loop.
    """
    batch = 50
    done = 0
    start = time.thread_time()
    while done < max_iterations:
        for _ in range(batch):
            step()
        done += batch
        if time.thread_time() - start >= seconds:
            break
    return (time.thread_time() - start) / done * 1e6


def repeated_loop(step: Callable[[], object], seconds: float, repeats: int = REFERENCE_REPEATS) -> dict[str, float]:
    """``timed_loop`` ``repeats`` times over ``seconds`` in all: the minimum and the median."""
    runs = sorted(timed_loop(step, seconds / repeats) for _ in range(repeats))
    return {"min": runs[0], "median": runs[len(runs) // 2]}


def threads_speedup(step: Callable[[], object], calls: int, rounds: int = 3) -> dict[str, float]:
    """Time ``calls`` calls in one thread, then split over two threads, ``rounds`` times.

    A speedup near 2 (and process CPU time near twice the wall time) means the
    call releases the GIL; near 1 means it holds it. The median round is kept.
    """

    def run(count: int) -> None:
        for _ in range(count):
            step()

    def timed(threads: int) -> tuple[float, float]:
        workers = [
            threading.Thread(target=run, args=(calls // threads,), name=f"gil-check-{index}")
            for index in range(threads)
        ]
        wall, cpu = time.perf_counter(), time.process_time()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return time.perf_counter() - wall, time.process_time() - cpu

    results = []
    for _ in range(rounds):
        one_wall, _ = timed(1)
        two_wall, two_cpu = timed(2)
        results.append((one_wall / two_wall, one_wall, two_wall, two_cpu))
    speedup, one_wall, two_wall, two_cpu = sorted(results)[len(results) // 2]
    return {
        "one_thread_s": one_wall,
        "two_threads_s": two_wall,
        "two_threads_cpu_s": two_cpu,
        "speedup": speedup,
        "rounds": rounds,
    }


def floor_step_for(recipient_public_key: crypto_utils.PublicKey, session_key: bytes, chat: Chat) -> Callable[[], bytes]:
    """One delivery's bare cryptography: a fresh key and nonce, AES-256-GCM of ``chat``, the RSA-OAEP
    wrap for ``recipient_public_key`` and the frame's HMAC under ``session_key``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    body = chat.encoded
    aad = associated_data(Kind.CHAT, 123456, "server", chat.sender)
    header = ENVELOPE_HEADER.pack(Kind.CHAT, 123456, 256)

    def floor_step() -> bytes:
        message_key = os.urandom(crypto_utils.AES_KEY_SIZE)
        nonce = os.urandom(crypto_utils.NONCE_SIZE)
        ciphertext = AESGCM(message_key).encrypt(nonce, body, aad)
        wrapped = recipient_public_key.encrypt(message_key, oaep)
        mac_input = header + wrapped + nonce + ciphertext
        return hmac.new(session_key, b"s2c\0" + mac_input, hashlib.sha256).digest()

    return floor_step


def typical_chat() -> Chat:
    """A typical delivery: the server's Chat plaintext for one benchmark line."""
    return Chat(sender="bench0001", text=bench_text(123456, time.perf_counter()), sent_at=time.time())


def measure_floor(seconds: float) -> dict[str, float]:
    """The crypto floor alone (``floor_step_for``), in µs: the minimum and median of several loops.

    Cheap enough to take again before each round of a long comparison, beside its figures.
    """
    recipient_public_key = crypto_utils.generate_private_key(2048).public_key()
    step = floor_step_for(recipient_public_key, os.urandom(crypto_utils.SESSION_KEY_SIZE), typical_chat())
    return repeated_loop(step, seconds)


def floor_for_a_while(seconds: float) -> tuple[int, float]:
    """Run the crypto floor for ``seconds`` of wall time: (deliveries' worth done, CPU seconds used).

    Runs in a process of ``parallel_floor``'s pool; a new key each time, made before the clock starts.
    """
    recipient_public_key = crypto_utils.generate_private_key(2048).public_key()
    step = floor_step_for(recipient_public_key, os.urandom(crypto_utils.SESSION_KEY_SIZE), typical_chat())
    done = 0
    cpu_start, start = time.process_time(), time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(20):
            step()
        done += 20
    return done, time.process_time() - cpu_start


def parallel_floor(seconds: float, processes: int) -> dict[str, float]:
    """What the machine's cores give the crypto floor just now: one process alone, then ``processes`` at once.

    ``speedup`` is their deliveries' worth a second together over one alone: the most that
    ``processes`` server workers could gain on this machine at this moment, with nothing else
    (load generator, Redis, other users) on its cores. ``cpu_us_together`` is a delivery's floor
    when all run at once: cores that share a physical core, or its caches, make it dearer.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no copy of the benchmark's threads and sockets
    with context.Pool(processes) as pool:
        pool.map(time.sleep, [0.0] * processes, chunksize=1)  # every process started before the clock
        alone_done, alone_cpu = pool.apply(floor_for_a_while, (seconds,))
        together = pool.map(floor_for_a_while, [seconds] * processes, chunksize=1)
    together_done = sum(done for done, _ in together)
    return {
        "processes": processes,
        "alone_per_s": alone_done / seconds,
        "together_per_s": together_done / seconds,
        "speedup": together_done / alone_done,
        "cpu_us_alone": alone_cpu / alone_done * 1e6,
        "cpu_us_together": sum(cpu for _, cpu in together) / together_done * 1e6,
    }


def measure_references(seconds: float) -> dict[str, Any]:
    """The crypto floor per delivery, its parts, the project's seal path, and the GIL check."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    recipient_key = crypto_utils.generate_private_key(2048)
    recipient_public_key = recipient_key.public_key()
    server_key = crypto_utils.generate_private_key(2048)
    chat = typical_chat()
    body = chat.encoded
    aad = associated_data(Kind.CHAT, 123456, "server", "bench0001")
    session_key = os.urandom(crypto_utils.SESSION_KEY_SIZE)
    header = ENVELOPE_HEADER.pack(Kind.CHAT, 123456, 256)
    fixed_key = os.urandom(crypto_utils.AES_KEY_SIZE)
    fixed_nonce = os.urandom(crypto_utils.NONCE_SIZE)
    fixed_wrapped = recipient_public_key.encrypt(fixed_key, oaep)
    fixed_ciphertext = AESGCM(fixed_key).encrypt(fixed_nonce, body, aad)

    floor_step = floor_step_for(recipient_public_key, session_key, chat)

    def wrap_step() -> bytes:
        return recipient_public_key.encrypt(fixed_key, oaep)

    def aes_step() -> bytes:
        return AESGCM(os.urandom(crypto_utils.AES_KEY_SIZE)).encrypt(os.urandom(12), body, aad)

    mac_input = header + fixed_wrapped + fixed_nonce + fixed_ciphertext

    def hmac_step() -> bytes:
        return hmac.new(session_key, b"s2c\0" + mac_input, hashlib.sha256).digest()

    # The project's own path for one delivery: SecureChannel.seal, as the writer thread runs it.
    channel = SecureChannel(server_key, recipient_public_key, is_server=True, allowed_incoming=CLIENT_KINDS)
    channel.username = "bench0001"
    channel.session_key = session_key
    frame = channel.seal(chat)

    def seal_step() -> bytes:
        return channel.seal(chat)

    # What every incoming line costs the server once, whatever N: opening the client's Say.
    client_channel = SecureChannel(
        recipient_key, server_key.public_key(), is_server=False, allowed_incoming=frozenset()
    )
    client_channel.username = "bench0001"
    client_channel.session_key = session_key
    say_frames = [client_channel.seal(Say(token="t" * 400, text=chat.text)) for _ in range(400)]
    inbound_channel = SecureChannel(server_key, recipient_public_key, is_server=True, allowed_incoming=CLIENT_KINDS)
    inbound_channel.username = "bench0001"
    inbound_channel.session_key = session_key
    inbound_bodies = iter([frame[5:] for frame in say_frames])

    def inbound_step() -> object:
        return inbound_channel.open(next(inbound_bodies))

    log(f"references: timing the crypto floor ({seconds:.1f} s per loop)")
    floor = repeated_loop(floor_step, seconds)
    seal = repeated_loop(seal_step, seconds)
    results: dict[str, Any] = {
        # The minimum of several runs: the cost without interference from other processes.
        "floor_us": floor["min"],
        "floor_median_us": floor["median"],
        "rsa_oaep_wrap_us": repeated_loop(wrap_step, seconds / 2)["min"],
        "aes_gcm_us": repeated_loop(aes_step, seconds / 2)["min"],
        "hmac_us": repeated_loop(hmac_step, seconds / 2)["min"],
        "secure_channel_seal_us": seal["min"],
        "secure_channel_seal_median_us": seal["median"],
        "inbound_open_per_line_us": timed_loop(inbound_step, 10.0, max_iterations=len(say_frames) - 50),
        "typical_plaintext_bytes": len(body),
        "sealed_frame_bytes": len(frame),
    }
    wrap_calls = max(200, int(seconds * 0.25e6 / max(results["rsa_oaep_wrap_us"], 1.0)))
    results["gil_rsa_wrap"] = threads_speedup(wrap_step, wrap_calls)
    decrypt_calls = max(20, int(seconds * 0.15e6 / 700))
    results["gil_rsa_unwrap"] = threads_speedup(lambda: recipient_key.decrypt(fixed_wrapped, oaep), decrypt_calls)
    aes_calls = max(1000, int(seconds * 0.25e6 / max(results["aes_gcm_us"], 1.0)))
    results["gil_aes_gcm"] = threads_speedup(aes_step, aes_calls)
    return results


# --------------------------------------------------------------------------- load phases


def delivered(clients: Sequence[Client]) -> int:
    return sum(client.chat_frames for client in clients)


@dataclass(frozen=True)
class Reading:
    """What is read at each end of a measured window: counts, and CPU seconds since each process began."""

    time: float
    deliveries: int
    server_user: float
    server_system: float
    #: CPU of each process of the server (a --workers supervisor first, then its workers).
    server_processes: dict[int, float]
    server_switches: int
    redis_cpu: float
    redis_calls: dict[str, int]
    #: This process: the load generator.
    load_cpu: float
    #: Every process on the machine.
    machine_cpu: float


def read_now(clients: Sequence[Client], server: harness.ServerProcess, redis: harness.RedisProcess | None) -> Reading:
    processes = {}
    for pid in harness.process_tree(server.pid):
        try:
            processes[pid] = harness.cpu_seconds(pid)
        except OSError:
            continue  # it exited while we looked
    return Reading(
        time=time.perf_counter(),
        deliveries=delivered(clients),
        server_user=(times := server.cpu_times())[0],
        server_system=times[1],
        server_processes=processes,
        server_switches=server.context_switches(),
        redis_cpu=redis.cpu_seconds() if redis is not None else 0.0,
        redis_calls=redis.command_calls() if redis is not None else {},
        load_cpu=harness.cpu_seconds(),
        machine_cpu=harness.machine_busy_seconds(),
    )


def window_figures(start: Reading, end: Reading, per_line: int) -> dict[str, Any]:
    """Rates and CPU per delivery over a window: the server's processes, Redis, and the load generator apart.

    ``total_cpu_us_per_delivery`` is the server's and Redis's together (what a delivery costs the deployment).
    """
    seconds = end.time - start.time
    deliveries = end.deliveries - start.deliveries
    if deliveries <= 0:
        raise BenchmarkError(f"no delivery in a {seconds:.1f} s window")
    server_user = end.server_user - start.server_user
    server_system = end.server_system - start.server_system
    server_cpu = server_user + server_system
    redis_cpu = end.redis_cpu - start.redis_cpu
    load_cpu = end.load_cpu - start.load_cpu
    other_cpu = (end.machine_cpu - start.machine_cpu) - server_cpu - redis_cpu - load_cpu
    lines = deliveries / per_line
    figures: dict[str, Any] = {
        "deliveries": deliveries,
        "seconds": seconds,
        "deliveries_per_s": deliveries / seconds,
        "lines_per_s": lines / seconds,
        "server_cpu_s": server_cpu,
        "server_cpu_fraction": server_cpu / seconds,
        "server_cpu_us_per_delivery": server_cpu / deliveries * 1e6,
        "server_user_us_per_delivery": server_user / deliveries * 1e6,
        "server_system_us_per_delivery": server_system / deliveries * 1e6,
        "server_context_switches_per_delivery": (end.server_switches - start.server_switches) / deliveries,
        # Each server process's share, in cores (with --workers: the supervisor first, then each worker).
        "server_process_cpu_fractions": [
            (cpu - start.server_processes[pid]) / seconds
            for pid, cpu in end.server_processes.items()
            if pid in start.server_processes
        ],
        "redis_cpu_fraction": redis_cpu / seconds,
        "redis_cpu_us_per_delivery": redis_cpu / deliveries * 1e6,
        "redis_cpu_us_per_line": redis_cpu / lines * 1e6,
        "total_cpu_us_per_delivery": (server_cpu + redis_cpu) / deliveries * 1e6,
        "load_cpu_fraction": load_cpu / seconds,
        "load_cpu_us_per_delivery": load_cpu / deliveries * 1e6,
        # Cores' worth of CPU used by anything else on the machine during the window.
        "other_cpu_fraction": max(0.0, other_cpu / seconds),
    }
    if end.redis_calls:
        calls = {
            name: count - start.redis_calls.get(name, 0)
            for name, count in end.redis_calls.items()
            if count > start.redis_calls.get(name, 0)
        }
        figures["redis_calls_per_line"] = {name: count / lines for name, count in sorted(calls.items())}
    return figures


def check_clients(clients: Sequence[Client]) -> None:
    for index, client in enumerate(clients):
        if client.failure:
            raise BenchmarkError(f"load client {index} stopped: {client.failure}")


def wait_until(condition: Callable[[], bool], timeout: float, clients: Sequence[Client]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        check_clients(clients)
        time.sleep(0.01)
    return condition()


def open_all_samples(clients: Sequence[Client]) -> tuple[list[Sample], int]:
    samples: list[Sample] = []
    failures = 0
    for client in clients:
        opened, failed = client.open_samples(client.take_raw_samples())
        samples.extend(opened)
        failures += failed
    return samples, failures


def set_sampling(clients: Sequence[Client], probability: float) -> None:
    for client in clients:
        client.sample_probability = probability


#: How long a probe line waits for its sender's echo once the others have it.
ECHO_GRACE = 0.3


def deliveries_per_line(clients: Sequence[Client]) -> int:
    """Frames one line costs the server: one per other member, and one more where the server
    echoes each accepted line to its sender (protocol 4 does; an older server given with
    ``--server`` does not). Found by sending one line while nothing else is in flight."""
    base = delivered(clients)
    clients[0].send_text(bench_text(0, time.perf_counter()))
    others = len(clients) - 1
    if not wait_until(lambda: delivered(clients) - base >= others, DRAIN_TIMEOUT, clients):
        raise BenchmarkError("a probe line did not reach everyone")
    time.sleep(ECHO_GRACE)
    return delivered(clients) - base


def run_paced(
    clients: Sequence[Client],
    server: harness.ServerProcess,
    rate: float,
    phases: Phases,
    per_line: int,
    redis: harness.RedisProcess | None = None,
) -> dict[str, Any]:
    """Clients take turns sending ``rate`` lines a second; latency from a sample of deliveries,
    and the CPU a delivery costs at this pace (``window_figures``, over the measured window).

    ``per_line`` is how many frames the server sends for one line (``deliveries_per_line``).
    """
    size = len(clients)
    measured_deliveries = rate * phases.duration * per_line
    set_sampling(clients, min(1.0, LATENCY_SAMPLES / max(measured_deliveries, 1.0)))
    base = delivered(clients)
    interval = 1.0 / rate
    start = time.perf_counter()
    measure_start = start + phases.warmup
    end = measure_start + phases.duration
    window_start: Reading | None = None
    sent = 0
    worst_lag = 0.0
    try:
        while True:
            due = start + sent * interval
            if due >= end:
                break
            now = time.perf_counter()
            if due > now:
                time.sleep(due - now)
            if window_start is None and due >= measure_start:
                window_start = read_now(clients, server, redis)
            now = time.perf_counter()
            worst_lag = max(worst_lag, now - due)
            clients[sent % size].send_text(bench_text(sent, now))
            sent += 1
        time.sleep(max(0.0, end - time.perf_counter()))
        window_end = read_now(clients, server, redis)
    finally:
        set_sampling(clients, 0.0)
    expected = sent * per_line
    drain_start = time.perf_counter()
    drained = wait_until(lambda: delivered(clients) - base >= expected, DRAIN_TIMEOUT, clients)
    drain_seconds = time.perf_counter() - drain_start
    samples, failures = open_all_samples(clients)
    latencies = sorted(sample.latency * 1000 for sample in samples if measure_start <= sample.sent < end)
    result: dict[str, Any] = {
        "rate_lines_per_s": rate,
        "offered_deliveries_per_s": rate * per_line,
        "lines_sent": sent,
        "drained": drained,
        "drain_s": drain_seconds,
        "undelivered": max(0, expected - (delivered(clients) - base)),
        "worst_send_lag_ms": worst_lag * 1000,
        **window_figures(window_start or window_end, window_end, per_line),
        "latency_samples": len(latencies),
        "verify_failures": failures,
    }
    if latencies:
        result.update(
            p50_ms=percentile(latencies, 0.50),
            p99_ms=percentile(latencies, 0.99),
            max_ms=latencies[-1],
            mean_ms=sum(latencies) / len(latencies),
        )
    return result


def run_saturation(
    clients: Sequence[Client],
    server: harness.ServerProcess,
    phases: Phases,
    window_messages: int,
    per_line: int,
    redis: harness.RedisProcess | None = None,
) -> dict[str, Any]:
    """Keep ``window_messages`` lines in flight; measure deliveries/s and the CPU a delivery costs."""
    size = len(clients)
    limit = window_messages * per_line
    base = delivered(clients)
    sent = 0
    start = time.perf_counter()
    measure_start = start + phases.warmup
    end = measure_start + phases.duration
    window_start: Reading | None = None
    window_end: Reading | None = None
    try:
        while window_end is None:
            now = time.perf_counter()
            if window_start is None and now >= measure_start:
                window_start = read_now(clients, server, redis)
                rate = (window_start.deliveries - base) / max(now - start, 1e-3)
                set_sampling(clients, min(1.0, VERIFY_SAMPLES / max(rate * phases.duration, 1.0)))
            elif now >= end:
                window_end = read_now(clients, server, redis)
                break
            if sent * per_line - (delivered(clients) - base) < limit:
                clients[sent % size].send_text(bench_text(sent, time.perf_counter()))
                sent += 1
            else:
                time.sleep(POLL_INTERVAL)
    finally:
        set_sampling(clients, 0.0)
    assert window_start is not None and window_end is not None
    drained = wait_until(lambda: delivered(clients) - base >= sent * per_line, DRAIN_TIMEOUT, clients)
    samples, failures = open_all_samples(clients)
    if window_end.deliveries <= window_start.deliveries:
        raise BenchmarkError(f"no delivery in the saturation window at N={size}")
    return {
        "window_lines": window_messages,
        "lines_sent": sent,
        **window_figures(window_start, window_end, per_line),
        "drained": drained,
        "verified_samples": len(samples),
        "verify_failures": failures,
    }


def close_all(clients: Sequence[Client]) -> None:
    for client in clients:
        try:
            client.close()
        except Exception as exc:  # closing must go on for the others
            log(f"closing a load client: {exc}")


# --------------------------------------------------------------------------- one N, each server


def connect_chat_clients(
    server: harness.ServerProcess,
    names: Sequence[str],
    keys: Sequence[crypto_utils.PrivateKey],
    known_hosts: KnownHosts,
    clients: list[Client],
    read_loop: ReadLoop,
) -> None:
    """Log ``names`` in, appending each client to ``clients`` first (so the caller can close them all).

    Each is read by ``read_loop`` once logged in: one thread for them all, not one each.
    """
    batch = new_clients(server, len(names), keys, known_hosts, timeout=LOGIN_TIMEOUT, read_loop=read_loop)
    clients.extend(batch)
    with ThreadPoolExecutor(max_workers=LOGIN_WORKERS, thread_name_prefix="bench-login") as pool:
        futures = [
            pool.submit(client.login, name, harness.BENCH_PASSWORD) for client, name in zip(batch, names, strict=True)
        ]
        try:
            for future in futures:
                future.result()
        finally:
            for future in futures:
                future.cancel()


@dataclass(frozen=True)
class Deployment:
    """How the chat server runs: its room backend (``memory`` or ``redis``) and its number of processes."""

    backend: str = "memory"
    workers: int = 1
    #: With ``backend == "redis"``: the redis-server to start, and whether it keeps an append-only file.
    redis_server: str = harness.REDIS_SERVER
    redis_append_only: bool = False

    @property
    def label(self) -> str:
        return f"{self.backend}, {self.workers} process{'es' if self.workers > 1 else ''}"


def clients_per_process(server: harness.ServerProcess) -> list[int]:
    """The clients each process of the server holds (with --workers: the supervisor's 0 first)."""
    counts = []
    for pid in harness.process_tree(server.pid):
        try:
            counts.append(harness.connections_on_port(pid, server.port))
        except OSError:
            continue  # it exited while we looked
    return counts


def run_chat_size(
    size: int,
    work_dir: Path,
    users_path: Path,
    keys: Sequence[crypto_utils.PrivateKey],
    phases: Phases,
    rate: float,
    window_messages: int,
    server_path: Path = harness.ROOT / "server.py",
    server_args: Sequence[str] = (),
    deployment: Deployment = Deployment(),
    saturation: bool = True,
) -> dict[str, Any]:
    """Log ``size`` clients in to a fresh server (and Redis, if the deployment has it); run the paced
    phase, then (unless ``saturation`` is False) the closed loop. Everything is stopped on the way out."""
    clients: list[Client] = []
    redis: harness.RedisProcess | None = None
    server: harness.ServerProcess | None = None
    read_loop = ReadLoop()
    read_loop.start()
    try:
        if deployment.backend == "redis":
            redis = harness.RedisProcess(
                work_dir / f"redis-{size}", deployment.redis_server, append_only=deployment.redis_append_only
            )
        server = harness.start_chat_server(
            work_dir,
            users_path,
            *server_args,
            server_path=server_path,
            redis=redis,
            workers=deployment.workers,
        )
        rss_idle = server.rss_kib()
        started = time.perf_counter()
        connect_chat_clients(
            server, harness.bench_user_names(size), keys, KnownHosts(work_dir / "known_hosts"), clients, read_loop
        )
        expected_notices = size * (size - 1) // 2
        if not wait_until(
            lambda: sum(client.notice_frames for client in clients) >= expected_notices, DRAIN_TIMEOUT, clients
        ):
            raise BenchmarkError(f"the join notices did not all arrive at N={size}")
        login_seconds = time.perf_counter() - started
        rss_connected = server.rss_kib()
        spread = clients_per_process(server)
        log(
            f"  chat N={size} ({deployment.label}): {size} clients logged in, join notices delivered in "
            f"{login_seconds:.1f} s" + (f"; clients per process {spread}" if deployment.workers > 1 else "")
        )
        per_line = deliveries_per_line(clients)
        paced = run_paced(clients, server, rate, phases, per_line, redis)
        log(
            f"  chat N={size}: paced {rate:g} lines/s: p50 {paced.get('p50_ms', float('nan')):.1f} ms, "
            f"p99 {paced.get('p99_ms', float('nan')):.1f} ms ({paced['latency_samples']} samples), "
            f"{paced['total_cpu_us_per_delivery']:.1f} us CPU per delivery"
        )
        result: dict[str, Any] = {
            "clients": size,
            "deployment": {"backend": deployment.backend, "workers": deployment.workers},
            "deliveries_per_line": per_line,
            "setup_s": login_seconds,
            "clients_per_process": spread,
            "paced": paced,
        }
        if saturation:
            closed_loop = run_saturation(clients, server, phases, window_messages, per_line, redis)
            log(
                f"  chat N={size}: saturation {closed_loop['deliveries_per_s']:.0f} deliveries/s, "
                f"{closed_loop['server_cpu_us_per_delivery']:.1f} us server CPU per delivery"
                + (f" + {closed_loop['redis_cpu_us_per_delivery']:.1f} us Redis" if redis is not None else "")
                + f"; load generator {closed_loop['load_cpu_fraction']:.2f} cores"
            )
            result["saturation"] = closed_loop
        check_clients(clients)
        result.update(
            server_threads=server.threads(),
            rss_idle_kib=rss_idle,
            rss_connected_kib=rss_connected,
            rss_per_client_kib=(rss_connected - rss_idle) / size,
            peak_rss_kib=server.peak_rss_kib(),
        )
        return result
    except BenchmarkError:
        if server is not None:
            log(f"  chat N={size}: the server's log ends with:\n{server.log_tail(10)}")
        raise
    finally:
        if server is not None:
            status = server.stop()
            if status not in (0, -15):
                log(f"  chat server exited with status {status}: {server.log_tail(5)}")
        close_all(clients)
        read_loop.stop()
        if redis is not None:
            redis.stop()


def run_plain_size(
    size: int, work_dir: Path, frame_size: int, phases: Phases, rate: float, window_messages: int
) -> dict[str, Any]:
    clients: list[Client] = []
    server = harness.start_plain_server(work_dir)
    try:
        for _ in range(size):
            clients.append(PlainLoadClient(server.host, server.port, frame_size=frame_size))
        per_line = size - 1  # the plain server sends a line to the others only
        paced = run_paced(clients, server, rate, phases, per_line)
        saturation = run_saturation(clients, server, phases, window_messages, per_line)
        log(
            f"  plain N={size}: saturation {saturation['deliveries_per_s']:.0f} deliveries/s, "
            f"{saturation['server_cpu_us_per_delivery']:.1f} us server CPU per delivery"
        )
        check_clients(clients)
        return {"clients": size, "peak_rss_kib": server.peak_rss_kib(), "paced": paced, "saturation": saturation}
    finally:
        server.stop()
        close_all(clients)


# --------------------------------------------------------------------------- report


def summarize(size: int, chat: dict[str, Any], plain: dict[str, Any] | None, floor_us: float) -> dict[str, Any]:
    cpu = chat["saturation"]["server_cpu_us_per_delivery"]
    with_redis = chat["deployment"]["backend"] == "redis"
    row: dict[str, Any] = {
        "clients": size,
        "deliveries_per_s": chat["saturation"]["deliveries_per_s"],
        "server_cpu_us_per_delivery": cpu,
        "redis_cpu_us_per_delivery": chat["saturation"]["redis_cpu_us_per_delivery"] if with_redis else None,
        "load_cpu_fraction": chat["saturation"]["load_cpu_fraction"],
        "floor_us": floor_us,
        "paced_rate": chat["paced"]["rate_lines_per_s"],
        "p50_ms": chat["paced"].get("p50_ms"),
        "p99_ms": chat["paced"].get("p99_ms"),
        "paced_drained": chat["paced"]["drained"],
        "peak_rss_mib": chat["peak_rss_kib"] / 1024,
        "rss_per_client_kib": chat["rss_per_client_kib"],
    }
    if plain is not None:
        plain_us = plain["saturation"]["server_cpu_us_per_delivery"]
        row.update(
            plain_deliveries_per_s=plain["saturation"]["deliveries_per_s"],
            plain_us_per_delivery=plain_us,
            plain_p99_ms=plain["paced"].get("p99_ms"),
            ratio=cpu / (floor_us + plain_us),
        )
    return row


def fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| N | deliveries/s | server CPU µs/delivery | Redis µs/delivery | load generator cores | crypto floor µs "
        "| plaintext µs/delivery | ratio | paced lines/s | p50 ms | p99 ms | plaintext p99 ms | peak RSS MiB "
        "| RSS/client KiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        p99 = fmt(row["p99_ms"]) + ("" if row["paced_drained"] else " (backlog)")
        lines.append(
            f"| {row['clients']} | {fmt(row['deliveries_per_s'], 0)} | {fmt(row['server_cpu_us_per_delivery'])} "
            f"| {fmt(row['redis_cpu_us_per_delivery'])} | {fmt(row['load_cpu_fraction'], 2)} "
            f"| {fmt(row['floor_us'])} | {fmt(row.get('plain_us_per_delivery'))} | {fmt(row.get('ratio'), 2)} "
            f"| {fmt(row['paced_rate'], 0)} | {fmt(row['p50_ms'])} | {p99} | {fmt(row.get('plain_p99_ms'))} "
            f"| {fmt(row['peak_rss_mib'])} | {fmt(row['rss_per_client_kib'], 0)} |"
        )
    return "\n".join(lines)


def targets_report(rows: Sequence[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        size = row["clients"]
        if size in TARGET_RATIO_SIZES and row.get("ratio") is not None:
            verdict = "met" if row["ratio"] <= TARGET_RATIO else "MISSED"
            lines.append(f"ratio <= {TARGET_RATIO} at N={size}: {row['ratio']:.2f} ({verdict})")
        if size in TARGET_P99_MS and row["p99_ms"] is not None:
            target = TARGET_P99_MS[size]
            verdict = "met" if row["p99_ms"] < target and row["paced_drained"] else "MISSED"
            lines.append(
                f"p99 < {target:g} ms at N={size}, {row['paced_rate']:g} lines/s: {row['p99_ms']:.1f} ms ({verdict})"
            )
    return lines


def write_plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [row["clients"] for row in rows]
    figure, (throughput_axes, latency_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    throughput_axes.plot(sizes, [row["deliveries_per_s"] for row in rows], "o-", label="chat server")
    if all("plain_deliveries_per_s" in row for row in rows):
        throughput_axes.plot(sizes, [row["plain_deliveries_per_s"] for row in rows], "s--", label="plaintext baseline")
    throughput_axes.set(xscale="log", yscale="log", xlabel="clients N", ylabel="deliveries per second")
    throughput_axes.set_title("Saturation throughput")
    latency_axes.plot(sizes, [row["p99_ms"] or float("nan") for row in rows], "o-", label="chat p99")
    latency_axes.plot(sizes, [row["p50_ms"] or float("nan") for row in rows], "^:", label="chat p50")
    if all(row.get("plain_p99_ms") is not None for row in rows):
        latency_axes.plot(sizes, [row["plain_p99_ms"] for row in rows], "s--", label="plaintext p99")
    latency_axes.plot(
        list(TARGET_P99_MS), list(TARGET_P99_MS.values()), "rx", markersize=10, linestyle="", label="p99 target"
    )
    latency_axes.set(xscale="log", yscale="log", xlabel="clients N", ylabel="end-to-end latency, ms")
    latency_axes.set_title("Paced load: min(50 lines/s, 10,000 deliveries/s)")
    for axes in (throughput_axes, latency_axes):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# --------------------------------------------------------------------------- main


def parse_sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or any(size < 2 for size in sizes):
        raise argparse.ArgumentTypeError("sizes are comma-separated numbers of clients, each at least 2")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10,50 and 2 s phases: under a minute")
    parser.add_argument("--sizes", type=parse_sizes, help="comma-separated N (default 10,50,200,1000)")
    parser.add_argument("--duration", type=float, help="measured seconds of each phase (default 10; quick 2)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every number measured to FILE")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="draw throughput and p99 against N (matplotlib)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plaintext baseline")
    parser.add_argument("--paced-rate", type=float, default=PACED_MESSAGES_PER_SECOND, metavar="LINES_PER_S")
    parser.add_argument("--paced-deliveries-cap", type=float, default=PACED_DELIVERIES_CAP, metavar="PER_S")
    harness.add_server_option(parser)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=list(DEFAULT_SERVER_ARGS),
        metavar="ARG",
        help="extra argument for server.py, repeatable (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=("memory", "redis"),
        default="memory",
        help="redis: start a private redis-server and run the server with --backend redis://... (default: memory)",
    )
    parser.add_argument(
        "--workers", type=int, default=1, metavar="N", help="server processes on the port (needs --backend redis)"
    )
    add_redis_options(parser)
    parser.add_argument("--work-dir", type=Path, help="keep the server data and logs here (default: a temp dir)")
    return parser


def add_redis_options(parser: argparse.ArgumentParser) -> None:
    """``--redis-server PATH`` and ``--redis-aof``: the Redis a Redis deployment is measured with."""
    parser.add_argument(
        "--redis-server",
        default=harness.REDIS_SERVER,
        metavar="PATH",
        help="the redis-server to start (default: %(default)s)",
    )
    parser.add_argument(
        "--redis-aof",
        action="store_true",
        help="Redis keeps an append-only file (appendfsync everysec) instead of nothing on disk",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers > 1 and args.backend != "redis":
        parser.error("--workers needs --backend redis (the processes share rooms through it)")
    if args.backend == "redis" and not args.redis_server:
        parser.error("redis-server is not installed (Debian: apt-get install redis-server); or give --redis-server")
    deployment = Deployment(args.backend, args.workers, args.redis_server, args.redis_aof)
    sizes = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    phases = Phases(warmup=min(MAX_WARMUP, duration * WARMUP_FRACTION), duration=duration)
    harness.raise_open_file_limit(4 * max(sizes) + 256)
    command = "python benchmarks/fanout.py " + " ".join(shlex.quote(arg) for arg in (argv or sys.argv[1:]))
    report: dict[str, Any] = {
        "command": command.strip(),
        "machine": harness.machine_info(),
        "source": {},
        "sizes": [],
    }
    report["settings"] = {
        "sizes": sizes,
        "warmup_s": phases.warmup,
        "duration_s": phases.duration,
        "paced_rate_lines_per_s": args.paced_rate,
        "paced_deliveries_cap_per_s": args.paced_deliveries_cap,
        "saturation_in_flight_deliveries": SATURATION_IN_FLIGHT,
        "backend": deployment.backend,
        "workers": deployment.workers,
        "redis_append_only": deployment.redis_append_only,
    }
    references = measure_references(REFERENCE_SECONDS / 4 if args.quick or duration < 2 else REFERENCE_SECONDS)
    report["references"] = references
    floor_us = references["floor_us"]
    log(
        f"crypto floor {floor_us:.1f} us per delivery (RSA-OAEP wrap {references['rsa_oaep_wrap_us']:.1f}, "
        f"AES-GCM {references['aes_gcm_us']:.1f}, HMAC {references['hmac_us']:.1f}); "
        f"SecureChannel.seal {references['secure_channel_seal_us']:.1f} us; "
        f"2 threads of RSA wraps run {references['gil_rsa_wrap']['speedup']:.2f}x as fast as 1"
    )
    with tempfile.TemporaryDirectory(prefix="chat-bench-") as temp:
        work_dir = args.work_dir or Path(temp)
        server_path, users_path = harness.prepare_run(args.server, work_dir, max(sizes), report)
        keys = [crypto_utils.generate_private_key() for _ in range(CLIENT_KEY_COUNT)]
        rows = []
        for size in sizes:
            rate = paced_rate(size, args.paced_rate, args.paced_deliveries_cap)
            window = max(MIN_WINDOW_MESSAGES, math.ceil(SATURATION_IN_FLIGHT / (size - 1)))
            log(f"N={size}: paced {rate:g} lines/s, saturation window {window} lines")
            chat = run_chat_size(
                size, work_dir, users_path, keys, phases, rate, window, server_path, args.server_arg, deployment
            )
            plain = None
            if not args.no_plain:
                plain = run_plain_size(size, work_dir, references["sealed_frame_bytes"] - 4, phases, rate, window)
            row = summarize(size, chat, plain, floor_us)
            rows.append(row)
            report["sizes"].append({"clients": size, "chat": chat, "plain": plain, "summary": row})
    source_after = harness.source_info(args.server)
    if source_after["sha256"] != report["source"]["sha256"]:
        # Not a problem for the numbers (the server ran from the snapshot); worth knowing.
        report["checkout_changed_during_run"] = source_after
        log("note: the checkout changed during the run; the server ran from the snapshot taken at its start")
    table = markdown_table(rows)
    print(table)
    for line in targets_report(rows):
        print(line)
    report["targets"] = targets_report(rows)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")
    if args.plot:
        write_plot(rows, args.plot)
        log(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    run_main(main)

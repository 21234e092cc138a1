"""Profile the real server under saturated fan-out with py-spy, and say where the CPU goes.

    pip install py-spy      # dev only, see requirements-bench.txt
    python benchmarks/profile_server.py --clients 200 --seconds 10 --out benchmarks/results/profile-200
    python benchmarks/profile_server.py --clients 200 --paced 50      # fanout.py's paced load instead

Starts ``python server.py`` as in ``fanout.py``, logs the clients in, keeps the
server saturated with the same closed loop, and samples it with ``py-spy
record`` (idle threads, such as writers waiting on an empty queue, are not
sampled). Writes the raw collapsed stacks (``.txt``, loadable in speedscope or
flamegraph.pl) and prints the functions ranked by self and by inclusive time,
plus a grouping of the samples into what the time is spent on.
"""

from __future__ import annotations

import argparse
import collections
import math
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import fanout  # noqa: E402
import harness  # noqa: E402
from loadclient import ReadLoop  # noqa: E402

from securechat import crypto_utils  # noqa: E402
from securechat.client import KnownHosts  # noqa: E402

#: Sampling rate of py-spy (per second, per thread).
SAMPLE_RATE = 250
#: Where a stack is counted, checked from the innermost frame out: the first match wins.
CATEGORIES = (
    ("RSA-OAEP wrap (encrypt)", re.compile(r"^wrap_key \(")),
    ("RSA-OAEP unwrap (decrypt, inbound line)", re.compile(r"^open_sealed \(")),
    ("AES-GCM and os.urandom", re.compile(r"^seal \(crypto_utils")),
    ("session HMAC", re.compile(r"^session_mac \(")),
    ("JWT and account checks (inbound line)", re.compile(r"^(TokenAuthority\.\w+|ChatServer\.verify_token) \(")),
    ("socket receive (read_frame)", re.compile(r"^(recv_exact|read_frame) \(")),
    ("queue put/get, Condition", re.compile(r"^(OutboundQueue\.\w+|Condition\.\w+|ClientConnection\.deliver) \(")),
    ("fan-out (room)", re.compile(r"^LocalRoom\.\w+ \(")),
    (
        "seal bookkeeping: Envelope, framing, associated data",
        re.compile(r"^(SecureChannel\.\w+|Envelope\.\w+|encode_frame|associated_data) \("),
    ),
    # Last: what the writer does in its own frame is mostly the sendall() call.
    ("writer's own line (mostly sendall)", re.compile(r"^ClientConnection\._run_writer \(")),
)


def parse_collapsed(path: Path) -> list[tuple[list[str], int]]:
    """Lines of ``frame;frame;... count``; returns (frames outermost first, count)."""
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def short(frame: str) -> str:
    """``name (path/file.py:line)`` with only the file's base name."""
    match = re.match(r"(.*) \((.*?)([^/]+\.py)(:\d+)?\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({match.group(3)}{match.group(4) or ''})"


def function_of(frame: str) -> str:
    return re.sub(r":\d+\)$", ")", short(frame))


def categorize(python_frames: list[str]) -> str:
    """The category of the innermost frame that has one."""
    for frame in reversed(python_frames):
        name = short(frame)
        for label, pattern in CATEGORIES:
            if pattern.match(name):
                return label
    return "other Python"


def summarize(stacks: list[tuple[list[str], int]], top: int = 25) -> str:
    total = sum(count for _, count in stacks)
    if total == 0:
        return "no samples"
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    lines_self: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    for frames, count in stacks:
        python_frames = [frame for frame in frames if ".py" in frame]
        if not python_frames:
            continue
        self_time[function_of(python_frames[-1])] += count
        lines_self[short(python_frames[-1])] += count
        for name in {function_of(frame) for frame in python_frames}:
            inclusive[name] += count
        categories[categorize(python_frames)] += count
    out = [f"{total} samples"]
    out.append("\nBy category (first match from the innermost frame):")
    for label, count in categories.most_common():
        out.append(f"  {100 * count / total:5.1f}%  {label}")
    out.append("\nSelf time by line:")
    for name, count in lines_self.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    out.append("\nSelf time by function:")
    for name, count in self_time.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    out.append("\nInclusive time by function:")
    for name, count in inclusive.most_common(top):
        out.append(f"  {100 * count / total:5.1f}%  {name}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Profile the chat server under saturated (or paced) fan-out.")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gil", action="store_true", help="sample only the thread holding the GIL")
    parser.add_argument(
        "--paced",
        type=float,
        metavar="LINES_PER_S",
        help="profile fanout.py's paced load at this rate instead of the closed loop (where does a paced delivery's "
        "extra CPU go?)",
    )
    parser.add_argument(
        "--backend",
        choices=("memory", "redis"),
        default="memory",
        help="redis: the server runs on a private redis-server, as fanout.py --backend redis (one process)",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "profile", help="path prefix")
    args = parser.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(py_spy).exists():
        print("py-spy is not installed: pip install -r requirements-bench.txt", file=sys.stderr)
        return 1
    harness.raise_open_file_limit(4 * args.clients + 256)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    collapsed = args.out.with_suffix(".txt")
    window = max(fanout.MIN_WINDOW_MESSAGES, math.ceil(fanout.SATURATION_IN_FLIGHT / (args.clients - 1)))
    with tempfile.TemporaryDirectory(prefix="chat-profile-") as temp:
        work_dir = Path(temp)
        users_path = work_dir / "users.json"
        harness.write_users_file(users_path, harness.bench_user_names(args.clients))
        keys = [crypto_utils.generate_private_key() for _ in range(fanout.CLIENT_KEY_COUNT)]
        clients: list[fanout.Client] = []
        redis = harness.RedisProcess(work_dir / "redis") if args.backend == "redis" else None
        try:
            server = harness.start_chat_server(work_dir, users_path, redis=redis)
        except BaseException:
            if redis is not None:
                redis.stop()
            raise
        recorder: subprocess.Popen[bytes] | None = None
        read_loop = ReadLoop()
        read_loop.start()
        try:
            fanout.connect_chat_clients(
                server, harness.bench_user_names(args.clients), keys, KnownHosts(work_dir / "kh"), clients, read_loop
            )
            expected = args.clients * (args.clients - 1) // 2
            fanout.wait_until(lambda: sum(c.notice_frames for c in clients) >= expected, fanout.DRAIN_TIMEOUT, clients)
            command = [
                py_spy,
                "record",
                "--pid",
                str(server.pid),
                "--duration",
                str(math.ceil(args.seconds)),
                "--rate",
                str(SAMPLE_RATE),
                "--format",
                "raw",
                "--output",
                str(collapsed),
                "--nonblocking",
            ]
            if args.gil:
                command.append("--gil")
            result: dict[str, object] = {}
            per_line = fanout.deliveries_per_line(clients)

            def load() -> None:
                phases = fanout.Phases(warmup=1.0, duration=args.seconds + 1.0)
                if args.paced:
                    result.update(fanout.run_paced(clients, server, args.paced, phases, per_line))
                else:
                    result.update(fanout.run_saturation(clients, server, phases, window, per_line))

            driver = threading.Thread(target=load, name="profile-load")
            driver.start()
            recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            driver.join()
            _, errors = recorder.communicate(timeout=60)
            if recorder.returncode != 0:
                print(f"py-spy failed: {errors.decode(errors='replace')}", file=sys.stderr)
                return 1
        finally:
            if recorder is not None and recorder.poll() is None:
                recorder.kill()
                recorder.wait()
            server.stop()
            fanout.close_all(clients)
            read_loop.stop()
            if redis is not None:
                redis.stop()
    print(
        f"N={args.clients}, {f'paced {args.paced:g} lines/s' if args.paced else 'closed loop'}: "
        f"{result.get('deliveries_per_s', 0):.0f} deliveries/s, "
        f"{result.get('server_cpu_us_per_delivery', 0):.1f} us server CPU per delivery "
        f"(under py-spy, {'GIL holder only' if args.gil else 'all non-idle threads'})"
    )
    summary = summarize(parse_collapsed(collapsed))
    print(summary)
    args.out.with_suffix(".summary.txt").write_text(summary + "\n")
    print(f"\nraw stacks: {collapsed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

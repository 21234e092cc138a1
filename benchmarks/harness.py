"""Plumbing shared by the benchmarks: server subprocesses, /proc readings, users, machine facts.

Nothing here generates load. A server runs as a child process so that its own
CPU time and peak memory can be read from ``/proc/PID`` apart from the load. With
``--workers N`` the server is a supervisor and its N worker processes: their CPU is
summed over the whole process tree. A Redis deployment's ``redis-server`` is started
here too (``RedisProcess``), private to one run, so that its CPU is read the same way.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from securechat.accounts import hash_password  # noqa: E402

#: The one password of every benchmark user (hashed once, the hash reused for all).
BENCH_PASSWORD = "bench-password-not-a-secret"
#: How long a server may take to print its address (the first run generates its RSA key).
SERVER_START_TIMEOUT = 60.0
#: How long a server may take to exit after SIGTERM before it is killed.
SERVER_STOP_TIMEOUT = 30.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: Packages whose versions go into the report.
REPORTED_PACKAGES = ("cryptography", "PyJWT", "redis", "matplotlib", "py-spy")
#: The Redis server a Redis deployment is measured with (the distribution's package: apt-get install redis-server).
REDIS_SERVER = shutil.which("redis-server") or ""
#: How long redis-server may take to answer its first PING.
REDIS_START_TIMEOUT = 15.0
#: How long ``import-users`` may take to copy the benchmark's accounts into Redis.
IMPORT_USERS_TIMEOUT = 60.0


def bench_user_names(count: int) -> list[str]:
    return [f"bench{index:04d}" for index in range(count)]


def write_users_file(path: Path, names: list[str]) -> None:
    """Write a user store holding ``names``, all with ``BENCH_PASSWORD``.

    Argon2id is slow on purpose, so the hash is computed once and shared: the
    server still verifies it at every login, which is the cost that matters.
    """
    password_hash = hash_password(BENCH_PASSWORD)
    document = {
        "format": 1,
        "users": {name: {"password_hash": password_hash, "demo": False, "created": ""} for name in names},
    }
    path.write_text(json.dumps(document))
    path.chmod(0o600)


def raise_open_file_limit(wanted: int) -> int:
    """Raise this process's soft limit on open files (children inherit it); returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, wanted)) if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


# --------------------------------------------------------------------------- /proc readings


def stat_fields(path: Path) -> list[str]:
    """The fields of a ``/proc/PID/stat`` (or ``.../task/TID/stat``) file from the third on.

    So field N of proc(5) is at index N - 3. Raises ``OSError`` if the file is gone.
    """
    text = path.read_text()
    # The command name may hold spaces and parentheses: fields start after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_times(pid: int | str = "self") -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads, from ``/proc/PID/stat``."""
    fields = stat_fields(Path(f"/proc/{pid}/stat"))
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return utime / CLOCK_TICKS, stime / CLOCK_TICKS


def cpu_seconds(pid: int | str = "self") -> float:
    """User plus system CPU time of a process (all its threads)."""
    return sum(cpu_times(pid))


def thread_cpu(pid: int | str) -> dict[int, tuple[float, int]]:
    """CPU seconds (user plus system) and nice value of each live thread of a process.

    The nice value tells the server's password-hashing threads apart: they run
    at a lower priority than the rest (``server.lower_thread_priority``).
    """
    threads: dict[int, tuple[float, int]] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            fields = stat_fields(stat)
        except OSError:
            continue  # the thread ended while we looked
        # Fields 14, 15 (utime, stime) and 19 (nice) of proc(5).
        threads[int(stat.parent.name)] = ((int(fields[11]) + int(fields[12])) / CLOCK_TICKS, int(fields[16]))
    return threads


def child_pids(pid: int) -> list[int]:
    """The children of a process, from ``/proc/PID/task/TID/children`` of each of its threads."""
    children: list[int] = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children += [int(child) for child in listing.read_text().split()]
        except OSError:
            continue  # the thread ended while we looked
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--workers`` supervisor and its workers), parents first."""
    tree = [pid]
    for parent in tree:  # grows as it goes
        tree += child_pids(parent)
    return tree


def tree_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and its live descendants.

    A descendant that exits takes its CPU time away from the sum (its parent collects
    it only once it waits for it), so a window in which a worker died is not to be trusted.
    """
    user = system = 0.0
    for member in process_tree(pid):
        try:
            member_user, member_system = cpu_times(member)
        except OSError:
            continue  # it exited while we looked
        user += member_user
        system += member_system
    return user, system


def machine_busy_seconds() -> float:
    """CPU seconds every process on the machine has used since boot (``/proc/stat``, all cores).

    Read before and after a window, minus what the server and the benchmark
    used, it tells how much else ran meanwhile: this machine may be shared.
    """
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(value) for value in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def context_switches(pid: int | str) -> int:
    """Voluntary plus involuntary context switches summed over the live threads of a process."""
    total = 0
    for status in Path(f"/proc/{pid}/task").glob("*/status"):
        try:
            for line in status.read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split()[1])
        except OSError:
            continue  # the thread ended while we looked
    return total


def memory_kib(pid: int | str, field: str) -> int:
    """A ``/proc/PID/status`` memory line in KiB: VmHWM (peak resident), VmRSS (now)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def connections_on_port(pid: int | str, port: int) -> int:
    """Established TCP connections a process holds on its local ``port``: with --workers, how the
    kernel spread the clients. Matches the process's socket descriptors with ``/proc/net/tcp``."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            # local_address is HEX_IP:HEX_PORT; state 01 is ESTABLISHED; the inode is field 10.
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(f"socket:[{fields[9]}]")
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd) in inodes
        except OSError:
            continue  # closed while we looked
    return count


def thread_count(pid: int | str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


# --------------------------------------------------------------------------- server subprocesses


class ServerProcess:
    """A server program in a child process, ready once it has printed ``Listening on HOST:PORT``.

    Its standard error goes to ``log_path`` (a pipe nobody reads would fill up
    and stall the server). ``stop()`` sends SIGTERM, waits, and kills if it must;
    it is also what leaving the ``with`` block does. CPU times, context switches
    and memory are those of the process and its children (``--workers``).
    """

    def __init__(self, command: list[str], log_path: Path, start_timeout: float = SERVER_START_TIMEOUT):
        self.command = command
        self.log_path = log_path
        self.fingerprint = ""
        self.host = ""
        self.port = 0
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, cwd=ROOT
        )
        try:
            self._wait_until_listening(start_timeout)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int:
        return self.process.pid

    def _wait_until_listening(self, timeout: float) -> None:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        pending = b""
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not selector.select(timeout=left):
                    continue
                chunk = os.read(self.process.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{self.command[1]} exited before listening: {self.log_tail()}")
                pending += chunk
                text = pending.decode(errors="replace")
                if match := re.search(r"fingerprint: \d+ (SHA256:\S+)", text):
                    self.fingerprint = match.group(1)
                # "Listening on HOST:PORT", and with --workers " (N worker processes)" after it.
                if match := re.search(r"Listening on (\S+):(\d+)[ \n]", text):
                    self.host, self.port = match.group(1), int(match.group(2))
                    return
        raise RuntimeError(f"{self.command[1]} did not start listening within {timeout:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def workers(self) -> list[int]:
        """The worker processes of a ``--workers`` supervisor (none for a single process)."""
        return child_pids(self.pid)

    def cpu_seconds(self) -> float:
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        return tree_cpu_times(self.pid)

    def context_switches(self) -> int:
        return sum(self._each(context_switches))

    def peak_rss_kib(self) -> int:
        """The peak resident memory of the processes, summed (each one's own peak)."""
        return sum(self._each(lambda pid: memory_kib(pid, "VmHWM")))

    def rss_kib(self) -> int:
        return sum(self._each(lambda pid: memory_kib(pid, "VmRSS")))

    def threads(self) -> int:
        return sum(self._each(thread_count))

    def _each(self, reading: Callable[[int], int]) -> list[int]:
        values = []
        for pid in process_tree(self.pid):
            try:
                values.append(reading(pid))
            except OSError:
                continue  # it exited while we looked
        return values

    def stop(self, timeout: float = SERVER_STOP_TIMEOUT) -> int:
        """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_chat_server(
    work_dir: Path,
    users_path: Path,
    *extra: str,
    server_path: Path = ROOT / "server.py",
    redis: RedisProcess | None = None,
    workers: int = 1,
) -> ServerProcess:
    """``python server.py`` on 127.0.0.1, port 0, with the benchmark's limits lifted.

    ``server_path`` may name another copy of the project's ``server.py`` (with
    its sibling modules beside it), to measure a change before applying it. With
    ``redis`` the server shares its rooms through it (``--backend``), and its accounts
    are copied into it first (``import-users``: with Redis the accounts live there);
    ``workers`` above 1 runs that many processes on the port (``--workers``).
    """
    deployment: list[str] = []
    if redis is not None:
        import_users(server_path, users_path, redis.url)
        deployment += ["--backend", redis.url]
    if workers != 1:
        deployment += ["--workers", str(workers)]
    command = [
        sys.executable,
        str(server_path),
        *deployment,
        "--port",
        "0",
        "--data-dir",
        str(work_dir / "server-data"),
        "--users",
        str(users_path),
        # Flood control stays on, as it is by default, with a budget no benchmark reaches: what is
        # measured is what every line costs in a real deployment (with Redis, the shared budget).
        "--flood-rate",
        "1000000",
        "--flood-burst",
        "1000000",
        "--max-per-address",
        "5000",
        "--connect-rate",
        "0",
        "--max-clients",
        "5000",
        # A storm's 500 connections say hello at once: past 100 still logging in, the oldest is dropped.
        "--max-startups",
        "5000",
        "--send-queue",
        "100000",
        "--log-level",
        "WARNING",
        *extra,
    ]
    return ServerProcess(command, work_dir / "server.log")


def add_server_option(parser: argparse.ArgumentParser) -> None:
    """``--server PATH``: the server.py a benchmark measures (a copy of it, taken when the run starts)."""
    parser.add_argument(
        "--server",
        type=Path,
        default=ROOT / "server.py",
        metavar="PATH",
        help="server.py to measure (default: this checkout's); a patched copy or another checkout measures a change",
    )


def import_users(server_path: Path, users_path: Path, redis_url: str) -> None:
    """``server.py import-users USERS --backend URL``: a Redis deployment's accounts live in Redis."""
    done = subprocess.run(
        [sys.executable, str(server_path), "import-users", str(users_path), "--backend", redis_url],
        capture_output=True,
        text=True,
        timeout=IMPORT_USERS_TIMEOUT,
        cwd=ROOT,
        check=False,
    )
    if done.returncode != 0 or not done.stdout.startswith("imported"):
        raise RuntimeError(f"import-users failed: {(done.stderr or done.stdout).strip()[-500:]}")


def free_loopback_port() -> int:
    """A TCP port nothing listens on at 127.0.0.1 just now (redis-server cannot be given port 0)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until_redis_answers(process: subprocess.Popen[bytes], port: int, timeout: float) -> None:
    """Return once the redis-server ``process`` answers PING on ``port``; ``RuntimeError`` if it exits
    first or stays silent for ``timeout`` seconds. (The tests' Redis waits with this too.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited with status {process.returncode} before answering")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer within {timeout:.0f} s")


class RedisProcess:
    """A ``redis-server`` of one benchmark run: a free loopback port, a folder of its own, no persistence.

    Nothing is written to disk (``--save "" --appendonly no``) unless ``append_only``
    (``appendfsync everysec``, what a deployment that keeps history across a restart runs).
    Its CPU time is read from ``/proc`` like the server's; ``command_calls()`` counts the
    commands it has run (``INFO commandstats``). ``stop()`` (or leaving the ``with`` block)
    shuts it down and waits.
    """

    def __init__(self, folder: Path, executable: str = REDIS_SERVER, append_only: bool = False) -> None:
        if not executable:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_loopback_port()
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if append_only else ["--appendonly", "no"]
        command = [executable, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(folder)]
        command += ["--save", "", *persistence, "--logfile", str(folder / "redis.log")]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, cwd=folder)
        self._client: Any = None
        try:
            wait_until_redis_answers(self.process, self.port, REDIS_START_TIMEOUT)
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User plus system CPU time of redis-server (all its threads)."""
        return cpu_seconds(self.pid)

    def command_calls(self) -> dict[str, int]:
        """Commands run so far, by name (``INFO commandstats``; the INFO calls asking are left out).

        A script's own calls (``redis.call`` inside EVALSHA) are counted under their names too.
        """
        import redis  # only a Redis deployment's benchmark needs the client

        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0)
        stats = self._client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(values["calls"]) for name, values in stats.items()}
        calls.pop("info", None)
        return calls

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=SERVER_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RedisProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def start_plain_server(work_dir: Path, *extra: str) -> ServerProcess:
    """The plaintext baseline, ``benchmarks/plain_server.py``, on 127.0.0.1, port 0."""
    command = [sys.executable, str(BENCH_DIR / "plain_server.py"), "--port", "0", *extra]
    return ServerProcess(command, work_dir / "plain_server.log")


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in REPORTED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def openssl_version() -> str:
    try:
        from cryptography.hazmat.backends.openssl.backend import backend

        return backend.openssl_version_text()
    except Exception:
        return "unknown"


#: What makes up the server, relative to the folder of its server.py: the entry point, and the
#: package's modules (an older checkout kept them beside server.py instead).
SOURCE_FILES = ("server.py", "securechat/*.py", "*.py")


def server_sources(source_dir: Path) -> list[Path]:
    """The server's source files in a checkout, in a stable order."""
    found: dict[Path, None] = {}
    for pattern in SOURCE_FILES:
        for path in sorted(source_dir.glob(pattern)):
            found[path] = None
    return list(found)


def snapshot_server(server_path: Path, destination: Path) -> Path:
    """Copy ``server_path`` and the modules beside it to ``destination``; returns the copy's server.py.

    The commit and the digests of the original are kept in ``SOURCE.json`` beside the copy.
    """
    source_dir = server_path.resolve().parent
    destination.mkdir(parents=True, exist_ok=True)
    for module in server_sources(source_dir):
        target = destination / module.relative_to(source_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(module, target)
    (destination / "SOURCE.json").write_text(json.dumps(source_info(server_path)))
    return destination / server_path.name


def prepare_run(server_path: Path, work_dir: Path, clients: int, report: dict[str, Any]) -> tuple[Path, Path]:
    """A run's copy of the server and its users.json for ``clients`` benchmark users, in ``work_dir``;
    returns (the copy's server.py, users.json), and records which code it is in ``report["source"]``.

    The server runs from a copy taken now, so edits to the checkout during a long run cannot mix
    two versions in one table.
    """
    work_dir.mkdir(parents=True, exist_ok=True)
    copy = snapshot_server(server_path, work_dir / "server-src")
    report["source"] = source_info(copy)
    users_path = work_dir / "users.json"
    write_users_file(users_path, bench_user_names(clients))
    return copy, users_path


def source_info(server_path: Path = ROOT / "server.py") -> dict[str, object]:
    """Which code was measured: the commit, whether the server's modules differ from it, their digests."""
    source_dir = server_path.resolve().parent
    recorded = source_dir / "SOURCE.json"
    if recorded.exists():  # a snapshot: report where it was taken from
        return json.loads(recorded.read_text())

    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=source_dir, capture_output=True, text=True, timeout=10, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip()

    digests = {}
    sources = server_sources(source_dir)
    for path in sources:
        digests[str(path.relative_to(source_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return {
        "directory": str(source_dir),
        "commit": git("rev-parse", "--short", "HEAD"),
        "modified": git("status", "--porcelain", "--", *(str(path) for path in sources)).splitlines(),
        "sha256": digests,
    }


def redis_version(executable: str = REDIS_SERVER) -> str:
    """``redis-server --version``, or why there is none."""
    if not executable:
        return "not installed"
    try:
        done = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return done.stdout.strip()


def machine_info() -> dict[str, object]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": package_versions(),
        "openssl": openssl_version(),
        "redis_server": redis_version(),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }

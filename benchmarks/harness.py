"""Plumbing shared by the benchmarks: server subprocesses, /proc readings, users, machine facts.

Nothing here generates load. A server runs as a child process so that its own
CPU time and peak memory can be read from ``/proc/PID`` apart from the load.
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
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

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
REPORTED_PACKAGES = ("cryptography", "PyJWT", "matplotlib", "py-spy")


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
    it is also what leaving the ``with`` block does.
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
                if match := re.search(r"Listening on (\S+):(\d+)\n", text):
                    self.host, self.port = match.group(1), int(match.group(2))
                    return
        raise RuntimeError(f"{self.command[1]} did not start listening within {timeout:.0f} s")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_times(self) -> tuple[float, float]:
        return cpu_times(self.pid)

    def context_switches(self) -> int:
        return context_switches(self.pid)

    def peak_rss_kib(self) -> int:
        return memory_kib(self.pid, "VmHWM")

    def rss_kib(self) -> int:
        return memory_kib(self.pid, "VmRSS")

    def threads(self) -> int:
        return thread_count(self.pid)

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
    work_dir: Path, users_path: Path, *extra: str, server_path: Path = ROOT / "server.py"
) -> ServerProcess:
    """``python server.py`` on 127.0.0.1, port 0, with the benchmark's limits lifted.

    ``server_path`` may name another copy of the project's ``server.py`` (with
    its sibling modules beside it), to measure a change before applying it.
    """
    command = [
        sys.executable,
        str(server_path),
        "--port",
        "0",
        "--data-dir",
        str(work_dir / "server-data"),
        "--users",
        str(users_path),
        "--flood-rate",
        "0",
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


def machine_info() -> dict[str, object]:
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "packages": package_versions(),
        "openssl": openssl_version(),
        "load_average": Path("/proc/loadavg").read_text().split()[:3],
    }

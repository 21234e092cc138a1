"""The fan-out, login-storm and workers benchmarks' quick paths run end to end and report sane numbers.

Each runs as a subprocess: ``benchmarks/fanout.py`` with five clients and one
second phases (the real server, real logins, the plaintext baseline and the
crypto floor), ``benchmarks/storm.py`` with twelve logins beside three talkers,
``benchmarks/workers.py`` with a handful of clients on one process, on Redis and
on two workers (it starts its own redis-server). Only that they complete and
that every number is present and positive is checked; speed is never asserted
(this machine is shared).
"""

import json
import subprocess
import sys

import pytest
from conftest import REDIS_SERVER, ROOT, TIMEOUT

BENCHMARK_TIMEOUT = max(100.0, TIMEOUT * 20)


def run_benchmark(script: str, tmp_path, *args: str) -> tuple[str, dict]:
    """Run ``benchmarks/SCRIPT`` with ``args``; returns what it printed and the JSON report it wrote."""
    result_path = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / script),
            *args,
            "--json",
            str(result_path),
            "--work-dir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=BENCHMARK_TIMEOUT,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(result_path.read_text())


def test_quick_fanout_benchmark_reports_every_number(tmp_path):
    stdout, report = run_benchmark("fanout.py", tmp_path, "--sizes", "5", "--duration", "1")
    assert "| 5 |" in stdout, stdout

    references = report["references"]
    for name in ("floor_us", "rsa_oaep_wrap_us", "aes_gcm_us", "hmac_us", "secure_channel_seal_us"):
        assert references[name] > 0, name
    assert references["gil_rsa_wrap"]["speedup"] > 0

    (size,) = report["sizes"]
    assert size["clients"] == 5
    chat, plain, summary = size["chat"], size["plain"], size["summary"]

    saturation = chat["saturation"]
    assert saturation["deliveries"] > 0
    assert saturation["deliveries_per_s"] > 0
    assert saturation["server_cpu_us_per_delivery"] > 0
    assert saturation["drained"]
    # Sampled deliveries were opened in full (MAC, AES-GCM, RSA) and all verified.
    assert saturation["verified_samples"] > 0
    assert saturation["verify_failures"] == 0

    paced = chat["paced"]
    assert paced["lines_sent"] > 0
    assert paced["drained"] and paced["undelivered"] == 0
    assert paced["latency_samples"] > 0 and paced["verify_failures"] == 0
    assert 0 < paced["p50_ms"] <= paced["p99_ms"] <= paced["max_ms"]

    assert chat["peak_rss_kib"] > 0
    assert plain["saturation"]["deliveries_per_s"] > 0
    assert plain["saturation"]["server_cpu_us_per_delivery"] > 0
    assert summary["ratio"] > 0
    assert report["machine"]["nproc"] >= 1


def test_quick_storm_benchmark_reports_every_number(tmp_path):
    """The login storm's quick path: every login succeeds and the CPU split is measured."""
    stdout, report = run_benchmark("storm.py", tmp_path, "--quick", "--clients", "12", "--background", "3")
    assert "achieved / allowed" in stdout, stdout

    hashing, storm, talkers = report["hashing"], report["storm"], report["talkers"]
    assert hashing["ceiling_per_s"] > 0 and hashing["before"]["cpu_ms_each"] > 0
    assert report["rsa_wrap_floor_us"]["before"] > 0 and report["rsa_wrap_floor_us"]["after"] > 0
    assert storm["batches_opened_after"] > 0  # the logins' lobby entries came as batches, kept until then
    assert storm["logins_ok"] == 12 and storm["logins_failed"] == 0, storm["failure_reasons"]
    assert storm["logins_per_s"] > 0 and storm["ratio_to_hashing_ceiling"] > 0
    rescaled = storm["ratio_on_cores_left_to_server"]  # None only if others took every core
    assert rescaled is None or rescaled >= storm["ratio_to_hashing_ceiling"]
    assert storm["join_notices_drained"]
    # Twelve Argon2id verifications ran on the server's lowered-priority threads (Linux).
    if sys.platform.startswith("linux"):
        assert storm["hashing_cpu_s"] is not None and storm["hashing_cpu_s"] > 0
        assert storm["other_server_cpu_ms_per_login"] is not None
    assert storm["server_cpu_s"] > 0 and storm["load_generator_cpu_fraction"] > 0
    assert talkers["before_storm"]["samples"] > 0 and talkers["verify_failures"] == 0
    assert talkers["dropped"] == 0


@pytest.mark.skipif(not REDIS_SERVER, reason="redis-server is not installed (Debian: apt-get install redis-server)")
def test_workers_benchmark_measures_every_process_and_redis(tmp_path):
    """One round of the deployments side by side: the workers' and Redis's CPU are read and every goal is judged."""
    sizes = ("--light-size", "4", "--main-size", "6", "--heavy-size", "0")
    stdout, report = run_benchmark("workers.py", tmp_path, "--rounds", "1", "--duration", "1", *sizes)
    assert "| N=6, main | redis x2 |" in stdout, stdout
    assert report["machine"]["redis_server"].startswith("Redis server")

    runs = {(run["clients"], run["deployment_label"]): run for run in report["runs"]}
    assert set(runs) == {(size, label) for size in (4, 6) for label in ("memory", "redis", "redis x2")}
    for run in runs.values():
        assert run["paced"]["drained"] and run["paced"]["verify_failures"] == 0
        assert run["paced"]["total_cpu_us_per_delivery"] > 0 and run["floor"]["min"] > 0
        assert run["floor"]["parallel"]["speedup"] > 0  # what 2 processes of crypto get from the machine
    two = runs[(6, "redis x2")]
    assert sum(two["clients_per_process"]) == 6 and len(two["clients_per_process"]) == 3  # supervisor + 2 workers
    saturation = two["saturation"]
    assert saturation["drained"] and saturation["verify_failures"] == 0
    assert len(saturation["server_process_cpu_fractions"]) == 3
    # Redis's CPU is counted apart from the server's, and so are the commands a line costs it.
    assert saturation["redis_cpu_us_per_delivery"] > 0
    assert saturation["total_cpu_us_per_delivery"] > saturation["server_cpu_us_per_delivery"]
    assert saturation["redis_calls_per_line"]["xadd"] > 0
    assert runs[(6, "memory")]["saturation"]["redis_cpu_us_per_delivery"] == 0
    assert {goal["verdict"] for goal in report["goals"]} <= {"met", "MISSED", "n/a"}
    assert len(report["goals"]) >= 6 and report["capacity"]

"""The deployment examples: the systemd unit and the Dockerfile run the real program.

Neither systemd nor a Docker daemon runs here, so the tests read both files and hand
their command lines to the server's own parser (and, with the paths moved into a temporary
folder, to the server itself with ``--print-config``); ``systemd-analyze``, where it is
installed, checks the unit.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest
from conftest import ROOT, TIMEOUT

from securechat.admin import build_parser
from securechat.server_cli import EXIT_BAD_CONFIG

UNIT = ROOT / "deploy" / "chat.service"
DOCKERFILE = ROOT / "Dockerfile"


def effective_config(argv: list[str], moved: dict[str, Path]) -> dict:
    """What ``server.py ARGV --print-config`` prints, each path of ``moved`` replaced by its local stand-in."""
    local = [str(moved.get(arg, arg)) for arg in argv]
    result = subprocess.run(
        [sys.executable, str(ROOT / "server.py"), *local, "--print-config"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert (result.returncode, result.stderr) == (0, ""), result
    return tomllib.loads(result.stdout)


# --------------------------------------------------------------------------- the systemd unit


def unit_settings() -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, each key with its values in order (a key may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_the_unit_runs_the_installed_server_with_the_config_file_as_its_own_user(tmp_path):
    unit = unit_settings()
    program, *argv = shlex.split(unit["ExecStart"][0])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert PurePosixPath(program).name == "chat-server"
    assert scripts["chat-server"] == "securechat.server_cli:main"
    args = build_parser().parse_args(argv)
    assert (args.command, args.print_config) == (None, False)
    assert args.config == Path("/etc/securechat/chat.toml")
    data_dir = PurePosixPath(args.data_dir)
    assert data_dir == PurePosixPath("/var/lib") / unit["StateDirectory"][0]
    assert PurePosixPath(args.users).parent == data_dir
    assert unit["ReadWritePaths"] == [str(data_dir)]
    assert unit["StateDirectoryMode"] == ["0700"]
    assert unit["User"][0] not in ("root", "0") and unit["Group"][0] not in ("root", "0")

    # The whole command line, paths moved here, is one the server accepts.
    moved = {"/etc/securechat/chat.toml": ROOT / "chat.toml", str(data_dir): tmp_path / "data"}
    moved[str(args.users)] = tmp_path / "data" / "users.json"
    printed = effective_config(argv, moved)
    assert printed["data-dir"] == str(tmp_path / "data")
    assert printed["users"] == str(tmp_path / "data" / "users.json")


def test_the_unit_is_hardened_restarts_on_failure_and_stops_on_sigterm():
    unit = unit_settings()
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }.items():
        assert unit.get(key) == [value], key
    # A bad configuration is not retried: starting again would not fix it.
    assert unit["RestartPreventExitStatus"] == [str(EXIT_BAD_CONFIG)]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_accepts_the_unit_and_rates_it_ok(tmp_path):
    # verify also wants the program to exist: the stand-in is this Python.
    text = UNIT.read_text()
    program = shlex.split(unit_settings()["ExecStart"][0])[0]
    copy = tmp_path / "chat.service"
    copy.write_text(text.replace(f"ExecStart={program} ", f"ExecStart={sys.executable} "))
    verified = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=TIMEOUT * 4
    )
    assert (verified.returncode, verified.stdout, verified.stderr) == (0, "", "")  # no unknown or bad setting
    rated = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(copy)], capture_output=True, text=True, timeout=TIMEOUT * 4
    )
    level = re.search(r"Overall exposure level for chat.service: ([\d.]+) (\w+)", rated.stdout)
    assert level, rated.stdout + rated.stderr
    assert level.group(2) in ("PERFECT", "SAFE", "OK"), level.group(0)


# --------------------------------------------------------------------------- the Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile's instructions in order, as (INSTRUCTION, arguments), continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, arguments = line.strip().partition(" ")
            instructions.append((name.upper(), arguments.strip()))
    return instructions


def instruction(name: str) -> list[str]:
    return [arguments for kind, arguments in dockerfile_instructions() if kind == name]


def test_the_image_is_slim_python_of_the_lock_files_version():
    (base,) = instruction("FROM")
    locked_with = re.search(r"with Python (\d+\.\d+)", (ROOT / "requirements.lock").read_text()).group(1)
    assert re.fullmatch(rf"python:{re.escape(locked_with)}-slim(-\w+)?", base), base


def test_the_image_installs_the_hashed_lock_file_only():
    steps = dockerfile_instructions()
    (at,) = [index for index, (kind, arguments) in enumerate(steps) if kind == "RUN" and "pip install" in arguments]
    words = shlex.split(steps[at][1])
    assert "--require-hashes" in words
    assert words[words.index("-r") + 1] == "requirements.lock"
    # Only the lock file before the install, so that a change to the code does not reinstall everything.
    assert [step for step in steps[:at] if step[0] == "COPY"] == [("COPY", "requirements.lock ./")]


def test_the_image_copies_the_program_and_no_secret():
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert patterns[0] == "*"  # nothing in the build context but what is let back in
    allowed = {line.removeprefix("!").rstrip("/") for line in patterns if line.startswith("!")}
    for arguments in instruction("COPY"):
        *sources, _ = shlex.split(arguments)
        for source in sources:
            assert (ROOT / source).exists(), source
            assert source.rstrip("/") in allowed, f"{source} is copied but not let into the build context"
    assert not {"users.json", "server-data", ".git"} & allowed


def test_the_image_runs_the_server_as_a_user_on_every_interface_with_its_data_in_the_volume(tmp_path):
    names = [name for name, _ in dockerfile_instructions()]
    (user,) = instruction("USER")
    assert user not in ("root", "0")
    assert names.index("USER") < names.index("ENTRYPOINT")
    (entrypoint,) = instruction("ENTRYPOINT")
    python, script, *argv = json.loads(entrypoint)  # the exec form: the server gets SIGTERM itself
    assert (python, script) == ("python", str(PurePosixPath(instruction("WORKDIR")[0]) / "server.py"))
    args = build_parser().parse_args(argv)
    (volume,) = instruction("VOLUME")
    assert (args.command, args.host, str(args.data_dir)) == (None, "0.0.0.0", volume)
    assert PurePosixPath(args.users).parent == PurePosixPath(volume)
    config_copy = [arguments.split() for arguments in instruction("COPY") if arguments.startswith("chat.toml ")]
    assert config_copy == [["chat.toml", str(args.config)]]

    # The whole command line, paths moved here, is one the server accepts, on the port it exposes.
    moved = {str(args.config): ROOT / "chat.toml", volume: tmp_path / "data", str(args.users): tmp_path / "u.json"}
    printed = effective_config(argv, moved)
    assert instruction("EXPOSE") == [str(printed["port"])]
    assert printed["host"] == "0.0.0.0"


def _pinned(lock: Path) -> dict[str, str]:
    """``{canonical name: version}`` of every ``name==version`` line of a lock file."""
    from packaging.utils import canonicalize_name

    found: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if match := re.match(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)", line):
            found[canonicalize_name(match.group(1))] = match.group(2)
    return found


@pytest.mark.parametrize("lock_name", ["requirements.lock", "requirements-dev.lock"])
def test_the_lock_files_pin_what_the_oldest_python_the_readme_supports_needs(lock_name):
    """On Debian 12's Python 3.11.2, `pip install --require-hashes -r requirements.lock` refused to install
    anything: redis needs async-timeout before Python 3.11.3, and pip-compile, run on a newer Python, left
    it out. Checked by what the installed pinned packages say they need on 3.11.0."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    locked = _pinned(ROOT / lock_name)
    oldest = {**default_environment(), "python_full_version": "3.11.0", "python_version": "3.11", "extra": ""}
    missing, checked = [], 0
    for name, version in locked.items():
        try:
            if metadata.version(name) != version:
                continue  # only the pinned version's metadata says what the pin needs
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate(oldest):
                continue
            if canonicalize_name(requirement.name) not in locked:
                missing.append(f"{requirement} (for {name}=={version})")
    assert checked >= 5, "too few of the pinned packages are installed here to check"
    assert not missing, f"{lock_name} lacks, on Python 3.11.0: {missing}"


@pytest.mark.skipif(not (ROOT / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_what_pip_install_leaves_in_the_checkout_is_neither_tracked_nor_linted():
    """README: "To install the programs instead, pip install .". pip builds in the checkout, leaving
    build/lib/securechat/ and an .egg-info folder: git listed them as new, and `make test` stopped at
    `ruff check .`, which linted the copy in build/ without securechat/config.py's per-file ignore."""
    left = ["build/lib/securechat/config.py", "secure_terminal_chat.egg-info/PKG-INFO", "dist/x.whl"]
    checked = subprocess.run(["git", "check-ignore", *left], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert checked.stdout.split() == left, f"not ignored: {sorted(set(left) - set(checked.stdout.split()))}"

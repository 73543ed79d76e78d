"""systemd: sd_notify on a real datagram socket, socket activation with a real inherited
descriptor, and the unit files checked by ``systemd-analyze`` (see docs/systemd.md)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import SocketClient
from tests.support.helpers_daemon import REPO_ROOT, DaemonProc, clean_env

UNITS = REPO_ROOT / "systemd"
# The exposure figures reached by the units (docs/systemd.md says why not lower); a higher
# one is a regression. The user unit is assessed offline as if it ran as root. The root unit
# went from 2.3 to 2.6 when it traded CAP_DAC_OVERRIDE and CAP_FOWNER for CAP_SETUID and
# CAP_SETGID (acting as each caller, never for them), which the score counts higher; as a
# dedicated user (systemd/dedicated-user.conf) it is 2.0.
MAX_EXPOSURE = 2.6
MAX_DEDICATED_EXPOSURE = 2.0
MAX_USER_EXPOSURE = 6.4


class NotifyListener:
    """A real AF_UNIX datagram socket standing in for systemd's notify socket. Records every
    message with its arrival time; on READY=1 it checks at once that the daemon answers."""

    def __init__(self, root: Path, daemon_socket: Path) -> None:
        self.path = root / "notify.sock"
        self.daemon_socket = daemon_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, list[str]]] = []
        self.health_at_ready: dict[str, object] | None = None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = data.decode().split("\n")
            if "READY=1" in fields:
                self.health_at_ready = SocketClient(self.daemon_socket, timeout_s=5).health()
            self.messages.append((time.monotonic(), fields))

    def times(self, field: str) -> list[float]:
        return [t for t, fields in self.messages if field in fields]

    def fields(self, prefix: str) -> list[str]:
        return [f for _, fields in self.messages for f in fields if f.startswith(prefix)]

    def wait_for(self, field: str, timeout_s: float = 10) -> None:
        deadline = time.monotonic() + timeout_s
        while not self.times(field):
            assert time.monotonic() < deadline, f"no {field} within {timeout_s} s: {self.messages}"
            time.sleep(0.02)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.sock.close()


def _daemon_in(root: Path, extra_env: dict[str, str] | None = None) -> DaemonProc:
    """A daemon (not started) whose files live in ``root``, as helpers_daemon lays them out."""
    env = clean_env()
    env.update({
        "CHRONICLE_AGENT_AGENT__STATE_DIR": str(root / "state"),
        "CHRONICLE_AGENT_SOCKET": str(root / "agent.sock"),
        "XDG_CONFIG_HOME": str(root / "cfg"),
    })
    env.update(extra_env or {})
    d = DaemonProc(root, env)
    d.config_dir.mkdir(parents=True)
    return d


@pytest.fixture
def short_dir() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ca-sd-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_sd_notify_ready_status_watchdog_stopping(short_dir: Path) -> None:
    watchdog_usec = 400_000  # pings every 0.2 s
    daemon_socket = short_dir / "agent.sock"
    listener = NotifyListener(short_dir, daemon_socket)
    try:
        env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(watchdog_usec)}
        d = _daemon_in(short_dir, env)
        assert d.socket_path == daemon_socket
        with d:
            d.start()
            listener.wait_for("READY=1")
            # READY=1 came once the socket answered: the listener asked at once, and got it
            assert listener.health_at_ready is not None
            assert listener.health_at_ready["pid"] == d.pid
            statuses = listener.fields("STATUS=")
            assert statuses, listener.messages
            assert re.fullmatch(r"STATUS=\d+ queued, \d+ running, \d+\.\d MB/s up", statuses[0])

            time.sleep(2.0)
            pings = [t for t in listener.times("WATCHDOG=1") if t >= listener.times("READY=1")[0]]
            # about 10 in 2 s at one per 0.2 s
            assert 6 <= len(pings) <= 14, pings
            gaps = sorted(b - a for a, b in zip(pings, pings[1:], strict=False))
            assert 0.1 <= gaps[len(gaps) // 2] <= 0.35, gaps
            assert not listener.times("STOPPING=1")

            assert d.stop() == 0
            listener.wait_for("STOPPING=1", timeout_s=5)
            assert listener.times("STOPPING=1")[0] >= listener.times("READY=1")[0]
    finally:
        listener.close()


def test_blocked_loop_stops_watchdog_pings(short_dir: Path) -> None:
    """``debug.block_loop`` sleeps on the event loop's thread when the upload reaches
    before_register: the WATCHDOG=1 pings stop for as long, then come again at the interval.
    Pings sent from another thread would show no gap, so this fails if the watchdog ever stops
    depending on the loop (systemd would then never restart a stuck daemon)."""
    watchdog_usec = 400_000  # pings every 0.2 s
    block_s = 2.0
    daemon_socket = short_dir / "agent.sock"
    src = short_dir / "ckpt.bin"
    src.write_bytes(os.urandom(64 * 1024))
    listener = NotifyListener(short_dir, daemon_socket)
    try:
        # No WATCHDOG_PID: its pid is known only once it runs, and an absent WATCHDOG_PID
        # is accepted (a wrong one is not: test_no_notify_socket_no_op)
        env = {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": str(watchdog_usec),
               "CHRONICLE_AGENT_DEBUG__BLOCK_LOOP": f"before_register:{block_s}"}
        d = _daemon_in(short_dir, env)
        with d:
            d.start()
            listener.wait_for("READY=1")
            ready = listener.times("READY=1")[0]
            time.sleep(1.0)  # pings at the interval before the block
            asked = time.monotonic()
            client = d.client()
            job = client.request("POST", "/v1/uploads",
                                 {"path": str(src), "asset_type": "checkpoint"})
            final = client.wait_job(job["job_id"], 60)
            assert final["state"] == "done", (final, d.log_tail())
            time.sleep(1.0)  # pings at the interval after it
            pings = [t for t in listener.times("WATCHDOG=1") if t >= ready]
            assert "blocking the event loop for 2 s at before_register" in d.log_text()

            gaps = [(b - a, a) for a, b in zip(pings, pings[1:], strict=False)]
            longest, start = max(gaps)
            # one gap as long as the block (plus at most an interval), once the upload began
            assert block_s - 0.5 <= longest <= block_s + 1.0, gaps
            assert start >= asked - 0.3, (start - asked, gaps)
            assert all(g < 1.0 for g, a in gaps if a != start), gaps
            # before and after it, pings at the interval: they resumed
            before = [g for g, a in gaps if a < start]
            after = [g for g, a in gaps if a > start]
            assert len(before) >= 4 and len(after) >= 4, gaps
            for side in (before, after):
                assert 0.1 <= sorted(side)[len(side) // 2] <= 0.35, gaps
    finally:
        listener.close()


def test_block_loop_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from agent import crashpoints
    from agent.config import DebugSection

    slept: list[float] = []
    monkeypatch.setattr(crashpoints.time, "sleep", slept.append)
    b = crashpoints.LoopBlock("after_part:2:1.5")
    assert (b.name, b.n, b.seconds) == ("after_part", 2, 1.5)
    for name in ("after_part", "before_finalize", "after_part", "after_part"):
        b.hit(name)
    assert slept == [1.5]  # the 2nd after_part, once
    slept.clear()
    c = crashpoints.CrashPoints("", "before_register:2")  # no :N = the first hit
    assert not c.armed
    c.hit("before_register")
    c.hit("before_register")
    assert slept == [2.0]
    slept.clear()
    crashpoints.from_settings("", "/nonexistent", "mid_download:100:0.5").progress(
        "mid_download", 150)
    assert slept == [0.5]
    assert DebugSection().block_loop == ""  # off by default
    for bad in ("before_register", "before_register:soon", "x:1:2:3"):
        with pytest.raises(ValidationError):
            DebugSection(block_loop=bad)


def test_no_notify_socket_no_op(short_dir: Path) -> None:
    from agent.sdnotify import Notifier, listen_socket, watchdog_interval_s

    n = Notifier({})
    assert not n.enabled and not n.ready()
    assert watchdog_interval_s({}) is None
    assert watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval_s({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}) is None
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "1"}  # meant for another process
    assert listen_socket(env) is None and env["LISTEN_FDS"] == "1"


def test_sd_notify_abstract_namespace() -> None:
    from agent.sdnotify import Notifier

    name = f"chronicle-agent-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready("up")
        assert s.recv(4096) == b"READY=1\nSTATUS=up"
        n.close()


# A shim that puts the inherited descriptor at fd 3 and sets LISTEN_PID to its own pid, then
# becomes the daemon (execv keeps the pid), as systemd does for a socket-activated service.
_SHIM = (
    "import os, sys\n"
    "fd = int(sys.argv[1])\n"
    "if fd != 3:\n"
    "    os.dup2(fd, 3)\n"
    "    os.close(fd)\n"
    "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='agent')\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'agent', 'daemon'])\n"
)


def test_socket_activation_uses_inherited_socket_and_keeps_it(short_dir: Path) -> None:
    path = short_dir / "agent.sock"
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(path))
    listening.listen(16)
    # CHRONICLE_AGENT_SOCKET is the same path: a daemon that tried to bind it would find it
    # in use and exit
    d = _daemon_in(short_dir)
    assert d.socket_path == path
    try:
        with open(d.log_path, "ab") as log:
            d.proc = subprocess.Popen(
                [sys.executable, "-c", _SHIM, str(listening.fileno())],
                pass_fds=(listening.fileno(),), env=d.env, cwd=short_dir,
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        health = d.wait_healthy()
        assert health["pid"] == d.pid
        assert health["socket"] == str(path)
        assert d.stop() == 0, d.log_tail()
        # the socket belongs to systemd's .socket unit: still there, still listening
        assert stat.S_ISSOCK(path.lstat().st_mode), d.log_tail()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))
    finally:
        d.close(remove=False)
        listening.close()


# ---- the unit files, offline --------------------------------------------------------------


def _systemd_analyze() -> str:
    exe = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not os.access(exe, os.X_OK):
        pytest.fail("systemd-analyze is missing: install Debian's `systemd` package "
                    "(apt-get install systemd) to check the unit files")
    return exe


def _entry_point(tmp: Path) -> str:
    """An absolute, existing ExecStart= binary: the installed console script, else a wrapper
    around this interpreter (a checkout that was not pip-installed)."""
    for candidate in (Path(sys.executable).parent / "chronicle-agent",
                      Path(shutil.which("chronicle-agent") or "/nonexistent")):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    wrapper = tmp / "chronicle-agent"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m agent "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def _copy_units(src: Path, dest: Path, exe: str) -> list[str]:
    dest.mkdir(parents=True)
    out = []
    for unit in sorted(src.glob("chronicle-agent.*")):
        text = re.sub(r"(?m)^ExecStart=\S+", f"ExecStart={exe}", unit.read_text())
        (dest / unit.name).write_text(text)
        out.append(str(dest / unit.name))
    assert len(out) == 2, out
    return out


def test_units_verify(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    exe = _entry_point(tmp_path)
    system = _copy_units(UNITS, tmp_path / "system", exe)
    r = subprocess.run([analyze, "verify", *system], capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == 0, r.stdout + r.stderr

    user = _copy_units(UNITS / "user", tmp_path / "user", exe)
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    r = subprocess.run([analyze, "--user", "verify", *user], capture_output=True, text=True,
                       timeout=60, check=False, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def _exposure(unit: Path, *args: str, env: dict[str, str] | None = None) -> float:
    r = subprocess.run(
        [_systemd_analyze(), *args, "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )
    m = re.search(r"Overall exposure level for chronicle-agent\.service: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


def test_system_unit_exposure() -> None:
    assert _exposure(UNITS / "chronicle-agent.service") <= MAX_EXPOSURE


def test_dedicated_user_drop_in_exposure(tmp_path: Path) -> None:
    """The unit with systemd/dedicated-user.conf applied (its [Service] lines after the
    unit's own, as systemd applies a drop-in)."""
    unit = (UNITS / "chronicle-agent.service").read_text()
    drop_in = (UNITS / "dedicated-user.conf").read_text().split("[Service]\n", 1)[1]
    merged = tmp_path / "chronicle-agent.service"
    merged.write_text(unit.replace("\n[Install]", "\n" + drop_in + "\n[Install]"))
    assert "User=chronicle-agent" in merged.read_text()
    assert _exposure(merged) <= MAX_DEDICATED_EXPOSURE


def test_user_unit_exposure(tmp_path: Path) -> None:
    runtime = tmp_path / "rt"
    runtime.mkdir(mode=0o700)
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    exposure = _exposure(UNITS / "user" / "chronicle-agent.service", "--user", env=env)
    assert exposure <= MAX_USER_EXPOSURE

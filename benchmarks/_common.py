"""What the benchmarks share: a local Chronicle server as its own process, and a fresh
daemon pointed at it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.client import SocketClient  # noqa: E402


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


# A benchmark stopped with SIGTERM or SIGHUP (a closed terminal, a time limit) unwinds
# through its ``finally`` blocks, which stop its processes and remove its gigabytes of
# temp files; the default action would leave both behind.
for _sig in (signal.SIGTERM, signal.SIGHUP):
    signal.signal(_sig, _exit_on_signal)


class Server:
    """``chronicle-agent server`` on an ephemeral loopback port, run under ``prefix``
    (e.g. ``["nice", "-n", "5"]``) so it stands in for a remote machine."""

    def __init__(self, root: Path, prefix: list[str] | None = None, repo: Path = REPO) -> None:
        """``repo``: the checkout whose ``agent`` package the server runs."""
        env = dict(os.environ, PYTHONPATH=str(repo))
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "agent", "server", "--listen",
             "127.0.0.1:0", "--state-dir", str(root / "server")],
            env=env, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        info: dict[str, str] = {}
        assert self.proc.stdout is not None
        while len(info) < 2:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("server did not start")
            k, _, v = line.strip().partition(": ")
            if k in ("url", "tokens_file"):
                info[k] = v
        self.url = info["url"]
        self.token = next(iter(json.loads(Path(info["tokens_file"]).read_text())["tokens"]))

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


NO_HOLD_BACK = {"CHRONICLE_AGENT_AGENT__BUSY_CPU_FRACTION": "0"}
"""For a daemon measured beside its own store and server on this machine: their CPU is not
training's (agent.busy_cpu_fraction), so the daemon must not hold back for it."""


class Daemon:
    """A fresh ``chronicle-agent daemon`` in its own short temp dir, using ``server``; with
    ``server=None``, its embedded local Chronicle (no URL configured, and none of this
    environment's ``CHRONICLE_AGENT_*`` settings), as a new user runs it."""

    def __init__(self, server: Server | None, extra_env: dict[str, str] | None = None,
                 repo: Path = REPO, timeout_s: float = 5, hold_back: bool = False) -> None:
        """``repo``: the checkout whose ``agent`` package the daemon runs (another one to
        compare two versions side by side). ``timeout_s``: its socket client's.
        ``hold_back``: keep ``agent.busy_cpu_fraction`` (off by default here: the server
        and the store run on this machine, their CPU would read as training's and the
        daemon would cap its transfers at ``agent.busy_bytes_per_s``)."""
        self.dir = Path(tempfile.mkdtemp(prefix="cab-", dir="/tmp"))
        env = dict(os.environ)
        if server is None:
            env = {k: v for k, v in env.items() if not k.startswith("CHRONICLE_AGENT_")}
        else:
            env.update(CHRONICLE_AGENT_CHRONICLE__URL=server.url,
                       CHRONICLE_AGENT_CHRONICLE__TOKEN=server.token)
        if not hold_back:
            env.update(NO_HOLD_BACK)
        env.update(extra_env or {}, PYTHONPATH=str(repo),
                   CHRONICLE_AGENT_AGENT__STATE_DIR=str(self.dir / "state"),
                   CHRONICLE_AGENT_SOCKET=str(self.dir / "a.sock"),
                   XDG_CONFIG_HOME=str(self.dir / "cfg"))
        with open(self.dir / "log", "wb") as log:
            # cwd: `python -m` puts it first on sys.path, before PYTHONPATH
            self.proc = subprocess.Popen([sys.executable, "-m", "agent", "daemon"], env=env,
                                         cwd=repo, stdout=subprocess.DEVNULL, stderr=log)
        self.client = SocketClient(self.dir / "a.sock", timeout_s=timeout_s)
        for _ in range(400):
            try:
                self.client.health()
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError(f"daemon did not start: {(self.dir / 'log').read_text()[-2000:]}")

    def peak_rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024

    def stop(self) -> None:
        import shutil

        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)

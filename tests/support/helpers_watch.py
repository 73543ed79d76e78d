"""Shared pieces of the watcher, run and exec tests: a daemon with watch rules and short
intervals, writer processes (real Python scripts, with torch or safetensors where that is
the point), and waiting."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.chronicle import contract
from agent.chronicle.sdk import Chronicle
from agent.client import TERMINAL_STATES
from tests.support.helpers_daemon import DaemonProc, clean_env, start_daemon
from tests.support.helpers_e2e import chronicle_for

T = TypeVar("T")

FAST_WATCH_ENV = {
    "CHRONICLE_AGENT_WATCHER__RESCAN_S": "1",
    "CHRONICLE_AGENT_WATCHER__CHECK_S": "0.1",
    "CHRONICLE_AGENT_WATCHER__DEBOUNCE_MS": "200",
    "CHRONICLE_AGENT_WATCHER__STEP_MS": "20",
}


def watch_daemon(rules: list[dict[str, Any]] | None = None,
                 extra_env: dict[str, str] | None = None) -> DaemonProc:
    """A daemon whose config has these ``[[watch]]`` rules (given through the environment,
    as JSON) and short watcher intervals."""
    env = dict(FAST_WATCH_ENV)
    if rules:
        env["CHRONICLE_AGENT_WATCH"] = json.dumps(rules)
    env.update(extra_env or {})
    return start_daemon(env)


def second_daemon(first: DaemonProc, rules: list[dict[str, Any]],
                  extra_env: dict[str, str] | None = None) -> DaemonProc:
    """Another daemon (own state dir and socket) on the SAME Chronicle as ``first``: its
    embedded server's URL and the local user's token."""
    info = json.loads((first.state_dir / "server" / "endpoint.json").read_text())
    tokens = json.loads(Path(info["tokens_file"]).read_text())["tokens"]
    env = {"CHRONICLE_AGENT_CHRONICLE__URL": info["url"],
           "CHRONICLE_AGENT_CHRONICLE__TOKEN": next(iter(tokens))}
    env.update(extra_env or {})
    return watch_daemon(rules, env)


def wait_until(fn: Callable[[], T | None], timeout_s: float = 30.0, what: str = "",
               every_s: float = 0.05) -> T:
    """Poll ``fn`` until it returns something truthy; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what or fn}")
        time.sleep(every_s)


def writer_env(daemon: DaemonProc | None = None, **more: str) -> dict[str, str]:
    env = clean_env()
    env["PYTHONWARNINGS"] = "ignore"  # torch without numpy says so at import
    if daemon is not None:
        env["CHRONICLE_AGENT_SOCKET"] = str(daemon.socket_path)
    env.update(more)
    return env


def script(tmp: Path, name: str, body: str) -> Path:
    p = tmp / name
    p.write_text(textwrap.dedent(body))
    return p


def run_script(path: Path, *args: str, env: dict[str, str] | None = None,
               timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(path), *args], env=env or writer_env(),
                          capture_output=True, text=True, timeout=timeout_s, check=False)


def spawn_script(path: Path, *args: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(path), *args], env=env or writer_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def jobs(d: DaemonProc, run_id: str | None = None) -> list[dict[str, Any]]:
    return d.client().list_jobs(run_id=run_id)


def by_checkpoint(d: DaemonProc, run_id: str | None = None) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for j in jobs(d, run_id):
        if "checkpoint" in j:
            out.setdefault(j["checkpoint"], []).append(j)
    return out


def wait_jobs_terminal(d: DaemonProc, n: int, run_id: str | None = None,
                       timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Wait until at least ``n`` watched-checkpoint jobs exist and all are terminal."""
    def ready() -> list[dict[str, Any]] | None:
        js = [j for j in jobs(d, run_id) if "checkpoint" in j]
        if len(js) >= n and all(j["state"] in TERMINAL_STATES for j in js):
            return js
        return None
    return wait_until(ready, timeout_s, f"{n} terminal checkpoint jobs")


def download(d: DaemonProc, asset_id: str, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    chronicle_for(d).assets.download(asset_id, dest, timeout_s=60)
    return dest


def tree(p: Path) -> dict[str, bytes]:
    return {f.relative_to(p).as_posix(): f.read_bytes() for f in sorted(p.rglob("*"))
            if f.is_file()}


def run_status(chron: Chronicle, run_id: str) -> str | None:
    return chron.send(contract.get_run(run_id)).status  # type: ignore[no-any-return]


def daemon_run(d: DaemonProc, run_id: str) -> dict[str, Any]:
    return d.client().request("GET", f"/v1/runs/{run_id}")

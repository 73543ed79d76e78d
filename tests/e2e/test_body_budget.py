"""The socket API's memory under many large request bodies at once: a shared budget of body
bytes (agent.api_body_budget_bytes) and a per-request maximum of what the largest legitimate
body needs (an inline content of server.inline_max_bytes, plus 1 MiB). Real Unix-socket
clients in threads, the daemon's RSS sampled with psutil."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from tests.support.helpers_daemon import start_daemon
from tests.support.helpers_e2e import socket_exchange

MIB = 1 << 20


def raw_post(socket_path: Path, path: str, body: bytes) -> tuple[int, dict[str, object], str]:
    status, raw, headers = socket_exchange(socket_path, "POST", path, body, timeout_s=120)
    return status, json.loads(raw or b"{}"), headers.get("Retry-After") or ""


def test_concurrent_large_bodies_keep_the_daemon_bounded(tmp_path: Path) -> None:
    env = {"CHRONICLE_AGENT_AGENT__API_BODY_BUDGET_BYTES": str(24 * MIB),
           "CHRONICLE_AGENT_AGENT__WORKERS": "1"}
    with start_daemon(env) as d:
        proc = psutil.Process(d.pid)
        base = proc.memory_info().rss
        peak = base
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                peak = max(peak, proc.memory_info().rss)
                time.sleep(0.01)

        sampler = threading.Thread(target=sample)
        sampler.start()
        inline = json.dumps({"asset_type": "metrics",
                             "content": "x" * (7 * MIB + 900 * 1024)}).encode()
        huge = b'{"asset_type": "metrics", "content": "' + b"y" * (60 * MIB) + b'"}'
        try:
            with ThreadPoolExecutor(32) as pool:
                results = list(pool.map(
                    lambda body: raw_post(d.socket_path, "/v1/assets/inline", body),
                    [inline] * 16 + [huge] * 16))
        finally:
            stop.set()
            sampler.join()
        statuses = [r[0] for r in results]
        assert all(s == 413 for s in statuses[16:]), statuses  # the 60 MiB ones: too large
        assert results[16][1]["error"]["code"] == "payload_too_large"  # type: ignore[index]
        accepted = statuses[:16].count(202)
        busy = [r for r in results[:16] if r[0] == 503]
        assert accepted >= 1 and accepted + len(busy) == 16, statuses
        assert busy, "16 bodies of 8 MiB at once never met the 24 MiB budget"
        assert busy[0][1]["error"]["code"] == "busy" and busy[0][2] == "1"  # type: ignore[index]
        assert "agent.api_body_budget_bytes" in busy[0][1]["error"]["message"]  # type: ignore[index]
        grown = (peak - base) / MIB
        print(f"RSS grew by {grown:.0f} MiB; {accepted} accepted, {len(busy)} busy")
        # before: 16 x 64 MiB bodies took it to 1.27 GB; now the budget (3 bodies) and the
        # jobs' own copies while they are sent
        assert grown < 400, f"RSS grew by {grown:.0f} MiB"
        # the Python client waits out a busy daemon: all 16 get through in the end
        c = d.client(timeout_s=120)
        body = {"asset_type": "metrics", "content": "z" * (7 * MIB)}
        with ThreadPoolExecutor(16) as pool:
            jobs = list(pool.map(lambda _: c.request("POST", "/v1/assets/inline", body),
                                 range(16)))
        assert all(j["state"] in ("queued", "running", "done") for j in jobs)

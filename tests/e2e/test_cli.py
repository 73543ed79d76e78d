"""The command line, called as a function (``cli(*args)``): exit codes, messages, output.

What the daemon answers is scripted here with :class:`FakeDaemon` (a real HTTP server on a
real Unix socket); tests/e2e/test_cli_e2e.py runs the same commands against the real daemon.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cli import JsonFormatter, cli, format_jobs_table
from agent.progress import RateMeter, format_bytes, format_duration, render, wait_with_progress
from tests.support.helpers_daemon import REPO_ROOT, FakeDaemon, Request, clean_env


def _job(state: str = "queued", **extra: Any) -> dict[str, Any]:
    job = {
        "job_id": "job_1", "kind": "upload", "state": state, "asset_id": None, "run_id": None,
        "bytes_total": 0, "bytes_done": 0, "attempts": 1, "error": None,
    }
    job.update(extra)
    return job


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No user config, no daemon: the socket points at a path nobody listens on."""
    for key in list(os.environ):
        if key.startswith("CHRONICLE_AGENT_") or key == "METHODIC_RUN_ID":
            monkeypatch.delenv(key)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("CHRONICLE_AGENT_CONFIG", str(empty))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", str(tmp_path / "no-daemon.sock"))
    return tmp_path


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDaemon]:
    with FakeDaemon() as f:
        monkeypatch.setenv("CHRONICLE_AGENT_SOCKET", str(f.socket_path))
        yield f


# ---- usage, configuration and reachability (no daemon needed) -------------------------------


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--help") == 0
    out = capsys.readouterr().out
    for command in ("daemon", "server", "upload", "upload-inline", "download", "status",
                    "jobs", "cancel", "retry"):
        assert command in out
    assert cli("upload", "--help") == 0
    assert "--type" in capsys.readouterr().out


def test_main_module_help_and_unreachable(isolated_env: Path) -> None:
    env = clean_env()
    env["CHRONICLE_AGENT_SOCKET"] = str(isolated_env / "none.sock")
    env["CHRONICLE_AGENT_CONFIG"] = str(isolated_env / "empty.toml")
    run = subprocess.run([sys.executable, "-m", "agent", "--help"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 0 and "chronicle-agent" in run.stdout
    run = subprocess.run([sys.executable, "-m", "agent", "status"], env=env, cwd=REPO_ROOT,
                         capture_output=True, text=True, check=False)
    assert run.returncode == 3, run.stderr
    assert "none.sock" in run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("status",),
        ("status", "--json"),
        ("jobs",),
        ("cancel", "job_1"),
        ("retry", "job_1"),
        ("upload-inline", "--type", "notes", "--json-content", '{"a": 1}'),
    ],
)
def test_no_daemon_exits_3(
    args: tuple[str, ...], isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(*args) == 3
    err = capsys.readouterr().err
    assert str(isolated_env / "no-daemon.sock") in err
    assert "chronicle-agent daemon" in err


def test_no_daemon_upload_and_download_exit_3(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = isolated_env / "model.bin"
    f.write_bytes(b"x")
    assert cli("upload", str(f), "--type", "checkpoint") == 3
    assert cli("download", "asset_1", str(isolated_env / "dest")) == 3
    assert capsys.readouterr().err.count("start it with `chronicle-agent daemon`") == 2


def test_socket_option_is_scoped_to_the_call(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = os.environ["CHRONICLE_AGENT_SOCKET"]
    other = isolated_env / "other.sock"
    assert cli("status", "--socket", str(other)) == 3
    assert str(other) in capsys.readouterr().err
    assert cli("--socket", str(other), "jobs") == 3
    assert str(other) in capsys.readouterr().err
    assert os.environ["CHRONICLE_AGENT_SOCKET"] == before


def test_missing_path_exits_2_without_the_daemon(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("upload", "does/not/exist", "--type", "checkpoint") == 2
    err = capsys.readouterr().err
    assert "no such file or directory: does/not/exist" in err
    assert "daemon" not in err
    assert cli("upload-inline", "--type", "notes", "--file", "nope.md") == 2
    assert "no such file or directory: nope.md" in capsys.readouterr().err


def test_bad_json_content_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("upload-inline", "--type", "notes", "--json-content", "{not json") == 2
    err = capsys.readouterr().err
    assert "--json-content is not valid JSON" in err and "line 1 column 2" in err


def test_bad_json_file_exits_2(isolated_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = isolated_env / "bad.json"
    f.write_text("[1,")
    assert cli("upload-inline", "--type", "notes", "--file", str(f)) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_unknown_config_key_exits_2(
    monkeypatch: pytest.MonkeyPatch, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = isolated_env / "bogus.toml"
    cfg.write_text("[upload]\nconcurency = 8\n")
    monkeypatch.setenv("CHRONICLE_AGENT_CONFIG", str(cfg))
    assert cli("status") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "upload.concurency" in err
    monkeypatch.delenv("CHRONICLE_AGENT_CONFIG")
    assert cli("--config", str(cfg), "jobs") == 2
    assert "upload.concurency" in capsys.readouterr().err


def test_bad_config_value_and_missing_config_exit_2(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = isolated_env / "bad.toml"
    cfg.write_text("[upload]\nconcurrency = 0\n")
    assert cli("status", "--config", str(cfg)) == 2
    assert "upload.concurrency" in capsys.readouterr().err
    assert cli("status", "--config", str(isolated_env / "absent.toml")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_download_dest_must_be_new_or_empty(
    isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    full = isolated_env / "full"
    full.mkdir()
    (full / "x").write_text("x")
    assert cli("download", "asset_1", str(full)) == 2
    assert "not an empty directory" in capsys.readouterr().err
    a_file = isolated_env / "a_file"
    a_file.write_text("x")
    assert cli("download", "asset_1", str(a_file)) == 2
    assert "not an empty directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        (),
        ("nonsense",),
        ("upload", "x"),
        ("upload-inline", "--type", "t"),
        ("upload-inline", "--type", "t", "--file", "f", "--json-content", "{}"),
        ("status", "--log-format", "xml"),
    ],
)
def test_argparse_errors_exit_2(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(*args) == 2
    assert "usage:" in capsys.readouterr().err


# ---- against a scripted daemon ------------------------------------------------------------


def test_upload_queues_and_prints_job_id(
    fake: FakeDaemon, isolated_env: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake.routes[("POST", "/v1/uploads")] = (202, _job())
    d = isolated_env / "ckpt"
    d.mkdir()
    monkeypatch.chdir(isolated_env)
    monkeypatch.setenv("METHODIC_RUN_ID", "run_env")
    assert cli("upload", "ckpt", "--type", "checkpoint", "--visibility", "team") == 0
    assert capsys.readouterr().out == "job_1\n"
    assert fake.requests[-1].body == {
        "path": str(d), "asset_type": "checkpoint", "run_id": "run_env", "visibility": "team",
    }
    assert cli("upload", "ckpt", "--type", "checkpoint", "--run", "run_x", "--json",
               "--content-type", "application/x-tar") == 0
    assert json.loads(capsys.readouterr().out) == _job()
    assert fake.requests[-1].body["run_id"] == "run_x"
    assert fake.requests[-1].body["content_type"] == "application/x-tar"


def test_upload_wait_done(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.routes[("POST", "/v1/uploads")] = (202, _job())
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (
        200, _job("done", asset_id="asset_7", bytes_total=3, bytes_done=3)
    )
    f = isolated_env / "f.bin"
    f.write_bytes(b"abc")
    assert cli("upload", str(f), "--type", "checkpoint", "--wait") == 0
    assert capsys.readouterr().out == "asset_7\n"
    assert cli("upload", str(f), "--type", "checkpoint", "--wait", "--json") == 0
    assert json.loads(capsys.readouterr().out)["asset_id"] == "asset_7"


def test_upload_wait_failed_exits_1(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.routes[("POST", "/v1/uploads")] = (202, _job())
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (200, _job(
        "failed", error={"code": "storage_refused", "message": "HTTP 403 from storage"}
    ))
    f = isolated_env / "f.bin"
    f.write_bytes(b"abc")
    assert cli("upload", str(f), "--type", "checkpoint", "--wait") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "job_1 ended failed" in err
    assert "storage_refused" in err and "HTTP 403 from storage" in err


def test_refusal_exits_1(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.routes[("POST", "/v1/uploads")] = (
        403, {"error": {"code": "forbidden", "message": "path is outside agent.roots"}}
    )
    assert cli("upload", str(isolated_env), "--type", "checkpoint") == 1
    assert "forbidden: path is outside agent.roots" in capsys.readouterr().err
    assert cli("cancel", "job_nope") == 1
    assert "not_found" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "text", "extra", "content", "ctype"),
    [
        ("h.md", "# Hypothesis\n", (), "# Hypothesis\n", "text/markdown"),
        ("n.txt", "plain", (), "plain", "text/plain"),
        ("r.json", '{"a": [1, 2]}', (), {"a": [1, 2]}, None),
        ("h.md", "x", ("--content-type", "text/x-rst"), "x", "text/x-rst"),
    ],
)
def test_upload_inline_file(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str],
    name: str, text: str, extra: tuple[str, ...], content: Any, ctype: str | None,
) -> None:
    fake.routes[("POST", "/v1/assets/inline")] = (202, _job(kind="inline"))
    f = isolated_env / name
    f.write_text(text)
    assert cli("upload-inline", "--type", "research_report", "--file", str(f), *extra) == 0
    body = fake.requests[-1].body
    assert body["content"] == content
    assert body.get("content_type") == ctype
    assert body["asset_type"] == "research_report"


def test_upload_inline_json_content_wait(
    fake: FakeDaemon, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.routes[("POST", "/v1/assets/inline")] = (202, _job(kind="inline"))
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (200, _job("done", asset_id="asset_i"))
    assert cli("upload-inline", "--type", "takeaways_report", "--json-content",
               '{"summary": "ok"}', "--run", "run_1", "--wait") == 0
    assert capsys.readouterr().out == "asset_i\n"
    assert fake.requests[0].body == {
        "asset_type": "takeaways_report", "content": {"summary": "ok"}, "run_id": "run_1",
    }


def test_download_json_and_warnings(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = [{"name": "a/b.bin", "size": 3, "sha256": "ab" * 32}]
    fake.routes[("POST", "/v1/downloads")] = (202, _job(kind="download"))
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (200, _job(
        "done", kind="download", result={"files": files},
        warnings=["asset asset_1 is deprecated: superseded"],
    ))
    empty = isolated_env / "empty"
    empty.mkdir()
    assert cli("download", "asset_1", str(empty), "--json", "--allow-invalid") == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"asset_id": "asset_1", "dest": str(empty), "files": files}
    assert "warning: asset asset_1 is deprecated: superseded" in err
    assert fake.requests[0].body == {
        "asset_id": "asset_1", "dest": str(empty), "allow_invalid": True,
    }
    assert cli("download", "asset_1", str(isolated_env / "new")) == 0
    assert "1 file(s)" in capsys.readouterr().out


def test_download_failed_exits_1(
    fake: FakeDaemon, isolated_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.routes[("POST", "/v1/downloads")] = (202, _job(kind="download"))
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (200, _job("failed", kind="download", error={
        "code": "verification_failed", "message": "a.bin: sha256 mismatch"}))
    assert cli("download", "asset_1", str(isolated_env / "d"), "--json") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "verification_failed: a.bin: sha256 mismatch" in err


HEALTH = {
    "version": "0.1.0", "chronicle_url": "http://127.0.0.1:4242",
    "queue": {"queued": 2, "running": 1, "done": 10},
    "transfer": {"bytes_per_s_up": 1048576, "bytes_per_s_down": 0}, "staging_bytes": 2048,
}


def test_status(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.routes[("GET", "/v1/health")] = (200, HEALTH)
    assert cli("status") == 0
    out = capsys.readouterr().out
    assert "0.1.0" in out and "http://127.0.0.1:4242" in out
    assert "queued 2" in out and "1.0 MiB/s" in out and "2.0 KiB" in out
    assert cli("status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == HEALTH


def test_jobs_cancel_retry(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    jobs = [
        _job("running", bytes_total=200, bytes_done=50, asset_id="asset_1"),
        _job("failed", job_id="job_2", kind="download",
             error={"code": "not_found", "message": "no asset"}),
    ]
    fake.routes[("GET", "/v1/jobs")] = (200, {"jobs": jobs})
    assert cli("jobs", "--run", "run_1", "--state", "running") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["JOB", "KIND", "STATE", "PROGRESS", "ASSET", "ERROR"]
    assert "25%" in out[1] and "asset_1" in out[1]
    assert "not_found: no asset" in out[2]
    assert fake.requests[-1].query == {"run_id": "run_1", "state": "running"}
    assert cli("jobs", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"jobs": jobs}

    fake.routes[("POST", "/v1/jobs/job_1/cancel")] = (200, _job("cancelled"))
    fake.routes[("POST", "/v1/jobs/job_2/retry")] = (200, _job("queued", job_id="job_2"))
    assert cli("cancel", "job_1") == 0
    assert "cancelled" in capsys.readouterr().out
    assert cli("retry", "job_2", "--json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "queued"


def test_jobs_empty(fake: FakeDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    fake.routes[("GET", "/v1/jobs")] = (200, {"jobs": []})
    assert cli("jobs") == 0
    out, err = capsys.readouterr()
    assert out == "" and "no jobs" in err


# ---- progress and log formatting -----------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_drawn_on_a_tty(fake: FakeDaemon) -> None:
    states = iter([
        _job("running", bytes_total=1000, bytes_done=100),
        _job("running", bytes_total=1000, bytes_done=600),
        _job("done", bytes_total=1000, bytes_done=1000, asset_id="asset_1"),
    ])

    def next_state(r: Request) -> tuple[int, Any]:
        return 200, next(states)

    fake.routes[("GET", "/v1/jobs/job_1")] = next_state
    stream = _Tty()
    final = wait_with_progress(fake.client(), _job(), stream, poll_s=0.01)
    assert final["state"] == "done"
    text = stream.getvalue()
    assert text.count("\r") == 4 and text.endswith("\n")
    assert "100%" in text and "done" in text


def test_no_progress_off_a_tty(fake: FakeDaemon) -> None:
    fake.routes[("GET", "/v1/jobs/job_1/wait")] = (200, _job("done"))
    stream = io.StringIO()
    assert wait_with_progress(fake.client(), _job(), stream)["state"] == "done"
    assert stream.getvalue() == ""


def test_render_and_units() -> None:
    line = render(_job("running", bytes_total=4 * 1024**3, bytes_done=1024**3, attempts=2),
                  rate=100 * 1024**2)
    assert "25%" in line and "1.0 GiB / 4.0 GiB" in line
    assert "100.0 MiB/s" in line and "ETA 0:31" in line and "attempt 2" in line
    assert render(_job("queued"), None).endswith("queued")
    assert format_bytes(512) == "512 B" and format_bytes(1536) == "1.5 KiB"
    assert format_duration(3725) == "1:02:05" and format_duration(59) == "0:59"
    meter = RateMeter(window_s=10)
    meter.add(0.0, 0)
    assert meter.rate() is None
    meter.add(2.0, 200)
    assert meter.rate() == 100
    meter.add(3.0, 50)  # restarted from scratch
    assert meter.rate() is None


def test_jobs_table_alignment() -> None:
    table = format_jobs_table([_job(), _job(job_id="a_much_longer_job_id")]).splitlines()
    assert table[1].index("upload") == table[2].index("upload") == table[0].index("KIND")


def test_json_log_lines() -> None:
    record = logging.LogRecord("agent.x", logging.INFO, __file__, 1, "job %s done", ("j1",),
                               None)
    record.job_id = "j1"
    line = JsonFormatter().format(record)
    data = json.loads(line)
    assert data["msg"] == "job j1 done" and data["level"] == "info"
    assert data["logger"] == "agent.x" and data["job_id"] == "j1" and "ts" in data
    assert "\n" not in line


def test_cli_leaves_no_log_handlers(fake: FakeDaemon) -> None:
    fake.routes[("GET", "/v1/health")] = (200, HEALTH)
    before = list(logging.getLogger().handlers)
    assert cli("status", "-v", "--log-format", "json") == 0
    assert logging.getLogger().handlers == before

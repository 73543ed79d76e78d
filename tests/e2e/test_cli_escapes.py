"""Names and messages that came from users or Chronicle cannot drive the terminal: the CLI's
human output shows control characters (ESC, CR, C1, DEL) as visible escapes. A real daemon,
a file named with an escape sequence and a carriage return, an asset id that holds them."""

from __future__ import annotations

from pathlib import Path

from agent.termsafe import visible
from tests.support.helpers_daemon import start_daemon

EVIL = "red\x1b[31m\rcover\x9b2J\x7f"
"""An SGR sequence, a carriage return (overwrites the line), a C1 CSI and a DEL."""


def assert_clean(text: str) -> None:
    for ch in ("\x1b", "\r", "\x9b", "\x7f"):
        assert ch not in text, repr(text)


def test_visible_escapes_every_control_character() -> None:
    assert visible(EVIL) == "red\\x1b[31m\\rcover\\x9b2J\\x7f"
    assert visible("a\u202eb\x00") == "a\\u202eb\\x00"  # a bidi override, NUL
    assert visible("plain text, ünïcödé") == "plain text, ünïcödé"
    assert visible("two\nlines\x1b", keep_newlines=True) == "two\nlines\\x1b"
    assert visible("two\nlines") == "two\\nlines"


def test_cli_output_holds_no_raw_control_characters(tmp_path: Path) -> None:
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / f"{EVIL}.bin").write_bytes(b"x" * 1000)
    with start_daemon() as d:
        up = d.run_cli("upload", str(src), "--type", "checkpoint", "--wait")
        # the server refuses a name it cannot store, and the refusal shows it, escaped
        assert up.returncode == 1, up.stdout + up.stderr
        assert_clean(up.stdout + up.stderr)
        assert "red\\x1b[31m\\rcover\\x9b2J\\x7f.bin" in up.stderr, up.stderr
        jid = [w for w in up.stderr.split() if w.startswith("job_")][0]
        shown = d.run_cli("jobs")
        assert_clean(shown.stdout + shown.stderr)
        assert jid in shown.stdout

        dl = d.run_cli("download", f"ast_{EVIL}", str(tmp_path / "dest"))
        assert dl.returncode == 1
        assert_clean(dl.stdout + dl.stderr)
        assert "ast_red\\x1b[31m" in dl.stderr, dl.stderr
        jobs = d.run_cli("jobs")
        assert jobs.returncode == 0, jobs.stderr
        assert_clean(jobs.stdout + jobs.stderr)
        assert len(jobs.stdout.strip().splitlines()) == 3  # header, upload, download
        watch = d.run_cli("status", "--watch", "--count", "1")
        assert_clean(watch.stdout)
        missing = d.run_cli("upload", str(tmp_path / EVIL), "--type", "t")
        assert missing.returncode == 2
        assert_clean(missing.stderr)
        assert "red\\x1b[31m" in missing.stderr

#!/usr/bin/env python3
"""Mutation smoke: do the tests notice realistic faults?

A short list of faults a maintainer could plausibly introduce (a dropped check, a wrong
comparison, a forgotten header) is applied to the code one at a time, and for each one the
few tests that should catch it are run. A fault the tests notice is KILLED. A fault they do
not notice is SURVIVED: somewhere a test cannot see that kind of fault (its assertion is too
weak, it never reaches that path, or the fault is masked by a second line of defence that
nothing checks on its own). Each SURVIVED line is worth reading as "this bug would ship".

How it works: the committed HEAD is checked out into a throwaway git worktree
(``git worktree add --detach <tmpdir> HEAD``); uncommitted changes in the working tree are
not part of it. For each mutation its snippet is replaced in that worktree (an exact
string replace that must match exactly once: else the mutation is STALE, reported and not
run), its tests run with the repository's venv::

    <repo>/.venv/bin/python -m pytest -x -q -p no:cacheprovider <tests...>

(cwd and ``PYTHONPATH`` the worktree, no bytecode written, at most 600 s per mutation), and
``git checkout -- .`` restores the worktree. The worktree is removed at the end, also after
Ctrl-C or an error, unless ``--keep`` is given.

Run it from anywhere, with any Python 3.11 (it uses the standard library only)::

    python tools/mutation_smoke.py                      # every mutation (tens of minutes)
    python tools/mutation_smoke.py --only gc_grace,seal_distcp_without_metadata
    python tools/mutation_smoke.py --check              # snippets and tests still there?
    python tools/mutation_smoke.py --keep               # leave the worktree and logs

``--check`` runs no tests: it verifies against HEAD that every mutation's snippet occurs
exactly once in its file and that the tests it names still exist (the test file, a
``file::function`` node's function, each word of a ``-k`` expression in a test's name);
it exits 1 if any mutation is STALE. Keep it passing when the code changes: a STALE
mutation means the snippet (or its tests) must follow the code.

Output: one line per mutation (name, verdict, seconds, the tests it ran; for a KILLED one
the first failing test), then ``killed K of N (P %)``. Verdicts:

- KILLED: a test failed (pytest exit 1) with the fault in place;
- TIMEOUT: the tests ran past 600 s (counted as killed: the fault was noticed, as a hang);
- SURVIVED: every test passed with the fault in place;
- STALE: the snippet or the named tests are not in HEAD (not run, not counted);
- ERROR: pytest could not run the tests (exit 2-5: collection error, nothing selected,
  ...), not counted; the tail of its output goes to stderr.

A mutation's tests are one or more pytest invocations (``-k`` applies to one invocation
only), run in order until one fails. KILLED only means something if those tests pass on
the unmutated HEAD: if in doubt, run them on HEAD first. The exit status is 0 whatever the
verdicts (this is a report, not a gate), except for ``--check`` (1 when something is
stale), a usage error (2) and an interruption (130).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = REPO / ".venv" / "bin" / "python"
TIMEOUT_S = 600.0
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    """The file mutated, relative to the repository."""
    old: str
    """What is replaced: must occur exactly once in ``path``."""
    new: str
    tests: tuple[str, ...]
    """One pytest invocation's arguments each (shell words), run in order."""
    fault: str


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "seal_distcp_without_metadata",
        "agent/watch/seal.py",
        'if any(n.endswith(".distcp") for n in names) and ".metadata" not in names:',
        'if any(n.endswith(".dcp") for n in names) and ".metadata" not in names:',
        ("tests/unit/test_seal.py", "tests/e2e/test_watch.py -k late_metadata"),
        "looks_unfinished checks the wrong extension: DCP shards without .metadata may be "
        "sealed by quiescence",
    ),
    Mutation(
        "run_end_keeps_presigned",
        "agent/runs/registry.py",
        "        recs = await q.do(runstore.unfinalized_presigned, q.s, info.run_id)\n"
        "        for rec in recs:\n",
        "        recs = await q.do(runstore.unfinalized_presigned, q.s, info.run_id)\n"
        "        return 0\n"
        "        for rec in recs:\n",
        ("tests/e2e/test_runs.py -k dead_run_abandons",),
        "a dead run's unfinalized presigned assets are not abandoned by the daemon",
    ),
    Mutation(
        "redact_keeps_query",
        "agent/transfer/http.py",
        '    return f"{parts.scheme}://{parts.netloc}{parts.path}" + ("?…" if parts.query '
        'else "")',
        '    return f"{parts.scheme}://{parts.netloc}{parts.path}" + (f"?{parts.query}" if '
        'parts.query else "")',
        ("tests/e2e/test_faults.py::test_retryable_faults_are_survived[disk]",
         "tests/e2e/test_upload.py"),
        "redact keeps the query string: presigned URLs' signatures reach the debug log",
    ),
    Mutation(
        "part_etag_not_recorded",
        "agent/queue/store.py",
        "(asset_key, name, part.part_number, part.part_size, part.size, part.etag),",
        '(asset_key, name, part.part_number, part.part_size, part.size, ""),',
        ("tests/unit/test_queue.py tests/e2e/test_crash.py",),
        "the queue records a multipart part without its ETag",
    ),
    Mutation(
        "gc_takes_pending_uploads",
        "agent/server/gc.py",
        'if item.kind == "object" or item.ref in holding.upload_ids:',
        'if item.kind == "object":',
        ("tests/e2e/test_gc.py",),
        "the storage sweep removes the multipart uploads a pending asset's components name",
    ),
    Mutation(
        "gc_grace",
        "agent/server/gc.py",
        "        return grace_s + url_expiry_s\n    return grace_s\n",
        "        return url_expiry_s\n    return 0.0\n",
        ("tests/e2e/test_gc.py -k grace",),
        "the storage sweep ignores server.gc_grace_s (young leftovers removed at once)",
    ),
    Mutation(
        "search_ignores_org_scope",
        "agent/server/db.py",
        "OR a.visibility = 'public'",
        "OR a.visibility != 'private'",
        ("tests/e2e/test_search.py",),
        "search's access rule lets anyone find organization/team assets",
    ),
    Mutation(
        "finalize_skips_size_check",
        "agent/server/assets.py",
        "        if declared is not None and info.size != declared:\n"
        "            raise _mismatch(\n"
        '                f"component {c.name!r}: storage holds {info.size} bytes, declared '
        '{declared}"\n'
        "            )\n",
        "",
        ('tests/e2e/test_server.py -k "wrong_digest_or_size or declared_size_at_register"',),
        "finalize no longer compares the stored size with the declared one",
    ),
    Mutation(
        "download_skips_sha256",
        "agent/transfer/download.py",
        "        if comp.sha256 and sha != comp.sha256:\n"
        "            await run_as(ident, os.unlink, target)\n",
        "        if comp.sha256 and sha != h.hexdigest():\n"
        "            await run_as(ident, os.unlink, target)\n",
        ("tests/e2e/test_download.py::test_corrupted_byte_is_fetched_again_never_accepted",),
        "a downloaded component's SHA-256 is compared with itself, never with the asset's",
    ),
    Mutation(
        "503_not_retried",
        "agent/errors.py",
        "RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})",
        "RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 504})",
        ("tests/e2e/test_faults.py::test_retryable_faults_are_survived[disk]",),
        "a 503 without an S3 error code is not retried",
    ),
    Mutation(
        "upload_urls_not_activity",
        "agent/server/assets.py",
        "            save(conn)\n            db.touch(conn, asset_id)\n",
        "            save(conn)\n",
        ("tests/e2e/test_pending_ttl.py::test_an_idle_pending_asset_expires_a_busy_one_does_not",),
        "asking for upload URLs is not recorded as upload activity: busy assets expire",
    ),
    Mutation(
        "checksum_headers_dropped",
        "agent/transfer/upload.py",
        "self.plans[name] = Plan(url=url, headers=urls.upload_headers.get(name))",
        "self.plans[name] = Plan(url=url)",
        ("tests/e2e/test_checksum_urls.py::test_the_daemon_uploads_with_and_without_the_feature",),
        "the daemon drops the headers the server lists for a checksum-bound URL",
    ),
    Mutation(
        "upload_gate_ignores_state",
        "agent/server/assets.py",
        'ok = await core.db.read(db.planned_key, asset_id, key) == "pending"',
        "ok = await core.db.read(db.planned_key, asset_id, key) is not None",
        ("tests/e2e/test_server_hardening.py::"
         "test_disk_put_refused_once_abandoned_or_deleted_while_pending",),
        "the disk store's upload gate lets a PUT through for an asset no longer pending",
    ),
    Mutation(
        "socket_job_owner_unchecked",
        "agent/api/app.py",
        "if job is None or (uid not in (0, job.uid)):",
        "if job is None:",
        ("tests/e2e/test_two_users.py::test_jobs_belong_to_the_uid_that_made_them",),
        "the socket API lets any uid see, cancel and retry another uid's job",
    ),
)

Reader = Callable[[str], "str | None"]
"""A file's text at a path relative to the repository, or None if it is not there."""


def head_reader(path: str) -> str | None:
    r = subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, capture_output=True)
    return r.stdout.decode() if r.returncode == 0 else None


def dir_reader(root: Path) -> Reader:
    def read(path: str) -> str | None:
        try:
            return (root / path).read_text()
        except OSError:
            return None
    return read


def code_problem(m: Mutation, read: Reader) -> str | None:
    """Why the snippet cannot be applied to ``read``'s copy (or its mutant would not
    compile), or None."""
    text = read(m.path)
    if text is None:
        return f"{m.path} does not exist"
    n = text.count(m.old)
    if n != 1:
        return f"the snippet occurs {n} times in {m.path}, not once"
    try:
        compile(text.replace(m.old, m.new, 1), m.path, "exec")
    except SyntaxError as e:
        return f"the mutant of {m.path} does not compile: {e}"
    return None


def tests_problem(m: Mutation, read: Reader) -> str | None:
    """Why the tests ``m`` names may be gone, or None. Static and approximate: the files
    exist, a node's function is defined there, each word of a -k expression is part of a
    test function's name in that invocation's files."""
    for spec in m.tests:
        words = shlex.split(spec)
        names: list[str] = []
        keyword = None
        for i, w in enumerate(words):
            if w == "-k":
                keyword = words[i + 1]
            elif i and words[i - 1] == "-k":
                continue
            elif not w.startswith("-"):
                path, _, node = w.partition("::")
                text = read(path)
                if text is None:
                    return f"{path} does not exist"
                func = re.sub(r"\[.*\]$", "", node)
                if func and not re.search(rf"^\s*(async\s+)?def {re.escape(func)}\(", text,
                                          re.M):
                    return f"{path} has no {func}"
                names += re.findall(r"^\s*(?:async\s+)?def (test\w*)\(", text, re.M)
        if keyword is not None:
            for word in re.findall(r"\w+", keyword):
                if word not in ("and", "or", "not") and not any(word in n for n in names):
                    return f"no test name contains {word!r} ({spec})"
    return None


def problem(m: Mutation, read: Reader) -> str | None:
    code = code_problem(m, read)
    if code is not None:
        return "code: " + code
    tests = tests_problem(m, read)
    return None if tests is None else "tests: " + tests


# ---- running ----------------------------------------------------------------------------------


def git(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)


def stop_group(proc: subprocess.Popen[str]) -> None:
    """Stop the pytest we started and its process group: SIGINT first (its fixtures stop
    their daemons), SIGKILL after 30 s."""
    for sig, wait_s in ((signal.SIGINT, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def pytest(args: list[str], worktree: Path, env: dict[str, str], timeout_s: float,
           log: Path) -> int | None:
    """Run pytest with ``args`` in the worktree; its exit code, None on timeout. Its
    output is appended to ``log``."""
    with open(log, "a") as out:
        out.write(f"$ {shlex.join(args)}\n")
        out.flush()
        proc = subprocess.Popen([str(PYTHON), *PYTEST, *args], cwd=worktree, env=env,
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True, text=True)
        try:
            return proc.wait(max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            stop_group(proc)
            return None
        except BaseException:  # Ctrl-C: its own session did not get it
            stop_group(proc)
            raise


def first_failure(log: Path) -> str:
    """The first test pytest's summary (``-ra``) names as failed, or ""."""
    for line in log.read_text(errors="replace").splitlines():
        found = re.match(r"(?:FAILED|ERROR) (\S+\.py(?:::\S+)?)", line)
        if found:
            return found[1]
    return ""


def tail(log: Path, n: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:])


def run_one(m: Mutation, worktree: Path, env: dict[str, str], logs: Path
            ) -> tuple[str, str]:
    """Apply ``m`` in the worktree, run its tests, restore: (verdict, detail)."""
    why = problem(m, dir_reader(worktree))
    if why is not None:
        return "STALE", why
    target = worktree / m.path
    target.write_text(target.read_text().replace(m.old, m.new, 1))
    log = logs / f"{m.name}.log"
    deadline = time.monotonic() + TIMEOUT_S
    errors: list[str] = []
    try:
        for spec in m.tests:
            rc = pytest(shlex.split(spec), worktree, env, deadline - time.monotonic(), log)
            if rc is None:
                return "TIMEOUT", f"{spec} ran past {TIMEOUT_S:g} s"
            if rc == 1:
                return "KILLED", f"by {first_failure(log) or spec}"
            if rc == 5:
                errors.append(f"no tests selected by {spec}")
            elif rc != 0:
                errors.append(f"pytest exit {rc} on {spec}")
        if errors:
            print(f"--- {m.name}: {'; '.join(errors)}; the end of {log.name}:\n{tail(log)}",
                  file=sys.stderr)
            return "ERROR", "; ".join(errors)
        return "SURVIVED", ""
    finally:
        restore(worktree)


def restore(worktree: Path) -> None:
    r = git("checkout", "--", ".", cwd=worktree)
    left = git("status", "--porcelain", "--untracked-files=no", cwd=worktree)
    if r.returncode != 0 or left.stdout.strip():
        raise RuntimeError(f"could not restore the worktree {worktree}: {r.stderr}"
                           f"{left.stdout}")


def make_env(worktree: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(worktree)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # a restored file must never meet a mutant's .pyc
    return env


def check_imports(worktree: Path, env: dict[str, str]) -> None:
    """The tests must import the worktree's agent, not the editable install's."""
    r = subprocess.run([str(PYTHON), "-c", "import agent, tests; print(agent.__file__); "
                        "print(tests.__file__)"], cwd=worktree, env=env, capture_output=True,
                       text=True)
    files = r.stdout.split()
    if r.returncode != 0 or len(files) != 2 or not all(
            Path(f).resolve().is_relative_to(worktree.resolve()) for f in files):
        raise RuntimeError(f"the worktree's packages are not the ones imported: "
                           f"{r.stdout}{r.stderr}")


def remove_worktree(base: Path, worktree: Path) -> None:
    r = git("worktree", "remove", "--force", str(worktree))
    if r.returncode != 0 and worktree.exists():
        print(f"git worktree remove failed ({r.stderr.strip()}); removing it by hand",
              file=sys.stderr)
        shutil.rmtree(worktree, ignore_errors=True)
        git("worktree", "prune")
    shutil.rmtree(base, ignore_errors=True)


def run(selected: list[Mutation], keep: bool) -> int:
    if not PYTHON.exists():
        print(f"no venv python at {PYTHON}", file=sys.stderr)
        return 2
    base = Path(tempfile.mkdtemp(prefix="mutation-smoke-"))
    worktree, logs = base / "wt", base / "logs"
    logs.mkdir()
    added = git("worktree", "add", "--detach", str(worktree), "HEAD")
    if added.returncode != 0:
        print(f"git worktree add failed: {added.stderr}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
        return 2
    head = git("rev-parse", "--short", "HEAD").stdout.strip()
    print(f"HEAD {head} in {worktree}; {len(selected)} mutation(s)", file=sys.stderr)
    counts: dict[str, int] = {}
    try:
        env = make_env(worktree)
        check_imports(worktree, env)
        width = max(len(m.name) for m in selected)
        for m in selected:
            t0 = time.monotonic()
            verdict, detail = run_one(m, worktree, env, logs)
            counts[verdict] = counts.get(verdict, 0) + 1
            line = (f"{m.name:<{width}}  {verdict:<8} {time.monotonic() - t0:7.1f}s  "
                    f"{' ; '.join(m.tests)}")
            print(line + (f"  [{detail}]" if detail else ""), flush=True)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if keep:
            print(f"kept: the worktree {worktree} (remove it with git worktree remove "
                  f"--force {worktree}) and the logs in {logs}", file=sys.stderr)
        else:
            remove_worktree(base, worktree)
        summary(counts)
    return 0


def summary(counts: dict[str, int]) -> None:
    killed = counts.get("KILLED", 0) + counts.get("TIMEOUT", 0)
    n = killed + counts.get("SURVIVED", 0)
    pct = f"{100 * killed / n:.0f}" if n else "-"
    rest = [f"{counts[v]} {v}" for v in ("STALE", "ERROR") if counts.get(v)]
    print(f"killed {killed} of {n} ({pct} %)" +
          (f"; not counted: {', '.join(rest)}" if rest else ""), flush=True)


def check(selected: list[Mutation]) -> int:
    width = max(len(m.name) for m in selected)
    here = dir_reader(REPO)
    stale = 0
    for m in selected:
        why = problem(m, head_reader)
        if why is None:
            print(f"{m.name:<{width}}  OK     {m.path}")
            continue
        stale += 1
        note = "" if problem(m, here) else " (the working tree's copy is fine: uncommitted)"
        print(f"{m.name:<{width}}  STALE  {why}{note}")
    print(f"{len(selected) - stale} of {len(selected)} mutation(s) apply to HEAD")
    return 1 if stale else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutation names (default: all): "
                    + ", ".join(m.name for m in MUTATIONS))
    ap.add_argument("--check", action="store_true",
                    help="only verify that every snippet and test is in HEAD (exit 1 if not)")
    ap.add_argument("--keep", action="store_true",
                    help="leave the worktree and the pytest logs for a look")
    args = ap.parse_args(argv)
    selected = list(MUTATIONS)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        by_name = {m.name: m for m in MUTATIONS}
        unknown = [w for w in wanted if w not in by_name]
        if unknown:
            ap.error(f"unknown mutation(s) {', '.join(unknown)}; known: "
                     + ", ".join(by_name))
        selected = [by_name[w] for w in dict.fromkeys(wanted)]
    if args.check:
        return check(selected)

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt  # the worktree is removed on the way out

    signal.signal(signal.SIGTERM, terminated)
    return run(selected, args.keep)


if __name__ == "__main__":
    sys.exit(main())

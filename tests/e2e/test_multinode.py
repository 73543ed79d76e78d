"""One checkpoint written by several nodes: each node's agent joins the run's one asset of
each checkpoint with the files it holds; the node holding the index finalizes it.

One machine stands in for the nodes: a daemon per node (its own state directory, socket and
"node-local" checkpoint directory), one local Chronicle on SeaweedFS that they share, and a
real ``torch.distributed.checkpoint.save`` from a 4-process gloo group, each node's ranks
writing into their node's directory (global rank 0 writes ``.metadata`` on node 0)."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

from tests.support.helpers_daemon import DaemonProc, start_daemon
from tests.support.helpers_seaweed import Seaweed, use_seaweed_env
from tests.support.helpers_standalone import Standalone, standalone_server
from tests.support.helpers_watch import daemon_run, run_status, tree, wait_until, writer_env

WRITER = Path(__file__).resolve().parents[1] / "support" / "writers" / "dcp_nodes.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def cluster(seaweed: Seaweed, tmp_path: Path,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Standalone, list[DaemonProc]]]:
    """A local Chronicle on its own SeaweedFS bucket, and two daemons (nodes) using it."""
    use_seaweed_env(seaweed, monkeypatch)
    bucket = f"mn-{secrets.token_hex(4)}"
    with standalone_server(tmp_path / "srv", {"user_alice": []},
                           storage=seaweed.storage_url(bucket)) as srv, ExitStack() as stack:
        env = {"CHRONICLE_AGENT_CHRONICLE__URL": srv.url,
               "CHRONICLE_AGENT_CHRONICLE__TOKEN": srv.tokens["user_alice"]}
        nodes = [stack.enter_context(start_daemon(env)) for _ in range(2)]
        yield srv, nodes


def exec_node(d: DaemonProc, run_id: str, out: Path, rank: int, first_rank: int, port: int,
              steps: int) -> subprocess.Popen[str]:
    cmd = [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch", str(out),
           "--type", "checkpoint", "--nodes", "2", "--node-rank", str(rank),
           "--quiescence-s", "2", "--", sys.executable, str(WRITER), str(out),
           "--first-rank", str(first_rank), "--local", "2", "--world", "4", "--port",
           str(port), "--steps", str(steps)]
    return subprocess.Popen(cmd, env=writer_env(d), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def node_jobs(d: DaemonProc, run_id: str) -> list[dict[str, Any]]:
    r = d.run_cli("jobs", "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    return [j for j in json.loads(r.stdout)["jobs"] if "checkpoint" in j]


def test_node_local_dcp_steps_end_as_one_asset_each(
        cluster: tuple[Standalone, list[DaemonProc]], seaweed: Seaweed, tmp_path: Path) -> None:
    srv, nodes = cluster
    run_id, port, steps = f"run_mn_{secrets.token_hex(3)}", free_port(), 3
    outs = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    procs = [exec_node(d, run_id, out, rank, 2 * rank, port, steps)
             for rank, (d, out) in enumerate(zip(nodes, outs, strict=True))]
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    for d in nodes:  # every job of the run terminal on every node, and the run ended there
        wait_until(lambda d=d: daemon_run(d, run_id)["state"] == "ended", 60,
                   f"run {run_id} to end on {d.root}", every_s=0.2)

    ch = srv.client("user_alice")
    assets = wait_until(lambda: [a for a in ch.assets.list(output_of=run_id)
                                 if a.state == "ready"] if all(
        a.state == "ready" for a in ch.assets.list(output_of=run_id)) else None, 30,
        "every asset of the run ready")
    assert len(assets) == steps, [(a.asset_id, a.state) for a in assets]

    # every step is one asset holding the union of both nodes' files, byte for byte, read
    # back from the store by an independent S3 client (a step's .metadata tells it apart)
    s3 = s3_client(seaweed)
    local = {n: {**tree(outs[0] / f"step-{n}"), **tree(outs[1] / f"step-{n}")}
             for n in range(1, steps + 1)}
    seen = []
    for a in assets:
        assert {c.name for c in a.components} == {".metadata", *(f"__{r}_0.distcp"
                                                                 for r in range(4))}
        urls = ch.assets.get(a.asset_id, include_presigned=True).download_urls
        meta = s3_read(s3, urls[".metadata"])
        step = next(n for n, files in local.items() if files[".metadata"] == meta)
        seen.append(step)
        for name, data in local[step].items():
            assert s3_read(s3, urls[name]) == data, (step, name)
    assert sorted(seen) == list(range(1, steps + 1))

    # each node sent only its own files, and only node 0 (holding .metadata) finalized
    for rank, d in enumerate(nodes):
        js = node_jobs(d, run_id)
        assert len(js) == steps and all(j["state"] == "done" for j in js), js
        for j in js:
            result = j.get("result") or {}
            assert result.get("joined") is True, j
            assert result["finalized_here"] is (rank == 0), j
            assert result["files_here"] == (3 if rank == 0 else 2), j
    # node 0 ended the run on Chronicle, once its own jobs were done; node 1 left it to it
    assert run_status(ch, run_id) == "finished"
    assert "node 0 ends it on Chronicle" in nodes[1].log_text()
    assert "node 0 ends it on Chronicle" not in nodes[0].log_text()


def s3_client(sw: Seaweed) -> Any:
    import botocore.session

    return botocore.session.Session().create_client(
        "s3", region_name="us-east-1", endpoint_url=sw.endpoint,
        aws_access_key_id=sw.access_key, aws_secret_access_key=sw.secret_key)


def s3_read(s3: Any, url: str) -> bytes:
    """An object's bytes, by the bucket and key a (path-style) download URL names."""
    bucket, _, key = urlsplit(url).path.lstrip("/").partition("/")
    return s3.get_object(Bucket=bucket, Key=unquote(key))["Body"].read()  # type: ignore[no-any-return]

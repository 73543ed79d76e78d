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
from tests.support.helpers_e2e import socket_get_text
from tests.support.helpers_seaweed import Seaweed, use_seaweed_env
from tests.support.helpers_standalone import Standalone, standalone_server
from tests.support.helpers_watch import daemon_run, run_status, tree, wait_until, writer_env

WRITERS = Path(__file__).resolve().parents[1] / "support" / "writers"
WRITER = WRITERS / "dcp_nodes.py"
ST_WRITER = WRITERS / "safetensors_nodes.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def server(seaweed: Seaweed, tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[Standalone]:
    """A local Chronicle on a SeaweedFS bucket of its own, that every node's daemon uses."""
    use_seaweed_env(seaweed, monkeypatch)
    with standalone_server(tmp_path / "srv", {"user_alice": []},
                           storage=seaweed.storage_url(f"mn-{secrets.token_hex(4)}")) as srv:
        yield srv


def nodes(stack: ExitStack, srv: Standalone, *envs: dict[str, str]) -> list[DaemonProc]:
    """A daemon per node, each with its own state directory and socket, all on ``srv``."""
    env = {"CHRONICLE_AGENT_CHRONICLE__URL": srv.url,
           "CHRONICLE_AGENT_CHRONICLE__TOKEN": srv.tokens["user_alice"]}
    return [stack.enter_context(start_daemon({**env, **more})) for more in envs]


def writer(out: Path, rank: int, port: int, steps: int, nodes: int = 2) -> list[str]:
    """Node ``rank``'s ranks of a 4-rank DCP job over ``nodes`` nodes (4 / nodes ranks
    each: 2*rank, 2*rank+1 with two nodes), writing to ``out``."""
    local = 4 // nodes
    return [sys.executable, str(WRITER), str(out), "--first-rank", str(local * rank),
            "--local", str(local), "--world", "4", "--port", str(port), "--steps", str(steps)]


def exec_node(d: DaemonProc | None, run_id: str, out: Path, rank: int, port: int,
              steps: int, quiescence_s: float = 2, nodes: int = 2,
              shared: bool = False) -> subprocess.Popen[str]:
    """Node ``rank``'s ranks under ``chronicle-agent exec --nodes N`` with its daemon
    ``d``; without one (None), the ranks alone: a node whose part nobody uploads."""
    cmd = writer(out, rank, port, steps, nodes)
    if d is not None:
        cmd = [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch", str(out),
               "--type", "checkpoint", "--nodes", str(nodes), "--node-rank", str(rank),
               "--quiescence-s", str(quiescence_s), *(["--shared"] if shared else []),
               "--", *cmd]
    return subprocess.Popen(cmd, env=writer_env(d), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(procs: list[subprocess.Popen[str]], daemons: list[DaemonProc], run_id: str) -> None:
    """Every node's command exits 0; then every job of the run is terminal on every node,
    and the run ended there."""
    for p in procs:
        _, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
    for d in daemons:
        try:
            wait_until(lambda d=d: daemon_run(d, run_id)["state"] == "ended", 60,
                       f"run {run_id} to end on {d.root}", every_s=0.2)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{describe(daemons, run_id)}") from None


def describe(daemons: list[DaemonProc], run_id: str) -> str:
    """Each node's jobs of the run and the tail of its log (requests left out)."""
    out = []
    for rank, d in enumerate(daemons):
        lines = [ln for ln in d.log_text().splitlines()
                 if "agent.server.access" not in ln and "agent.transfer." not in ln]
        out += [f"--- node {rank} jobs:", *(f"{j['state']} {j.get('error')} {j.get('result')}"
                                            for j in node_jobs(d, run_id)),
                f"--- node {rank} log:", *lines[-40:]]
    return "\n".join(out)


def node_jobs(d: DaemonProc, run_id: str) -> list[dict[str, Any]]:
    r = d.run_cli("jobs", "--run", run_id, "--json")
    assert r.returncode == 0, r.stderr
    return [j for j in json.loads(r.stdout)["jobs"] if "checkpoint" in j]


def check_steps(srv: Standalone, seaweed: Seaweed, run_id: str, outs: list[Path],
                steps: int, markers: set[str] | None = None) -> None:
    """Every step is one ready asset holding the union of every node's files, byte for
    byte, read back from the store by an independent S3 client (a step's .metadata tells it
    apart: the names are the same every step)."""
    ch = srv.client("user_alice")
    assets = wait_until(lambda: [a for a in ch.assets.list(output_of=run_id)
                                 if a.state == "ready"] if all(
        a.state == "ready" for a in ch.assets.list(output_of=run_id)) else None, 30,
        "every asset of the run ready")
    assert len(assets) == steps, [(a.asset_id, a.state) for a in assets]
    s3 = s3_client(seaweed)
    local = {n: {k: v for out in outs for k, v in tree(out / f"step-{n}").items()}
             for n in range(1, steps + 1)}
    seen = []
    for a in assets:
        assert {c.name for c in a.components} == {
            ".metadata", *(f"__{r}_0.distcp" for r in range(4)),
            *(markers if markers is not None else {  # who joined
                ".chronicle-nodes/0.index",
                *(f".chronicle-nodes/{r}" for r in range(1, len(outs)))})}
        urls = ch.assets.get(a.asset_id, include_presigned=True).download_urls
        meta = s3_read(s3, urls[".metadata"])
        step = next(n for n, files in local.items() if files[".metadata"] == meta)
        seen.append(step)
        for name, data in local[step].items():
            assert s3_read(s3, urls[name]) == data, (step, name)
    assert sorted(seen) == list(range(1, steps + 1))
    assert run_status(ch, run_id) == "finished"


def test_four_nodes_dcp_steps_end_as_one_asset_each_and_every_rank_restores_its_own(
        server: Standalone, seaweed: Seaweed, tmp_path: Path) -> None:
    """Four nodes of one rank each: three steps of a real dcp.save, one asset per step.
    Then every node restores only its rank's shard and .metadata through its own daemon:
    its shard comes from its node cache (it uploaded it), only .metadata is fetched, by the
    nodes that did not write it; and dcp.load on every rank, from its node's restored
    directory, gets back what that rank saved."""
    run_id, port, steps, n = f"run_mn_{secrets.token_hex(3)}", free_port(), 3, 4
    outs = [tmp_path / f"node{r}" / "ckpt" for r in range(n)]
    with ExitStack() as stack:
        daemons = nodes(stack, server, *({} for _ in range(n)))
        finish([exec_node(d, run_id, out, rank, port, steps, nodes=n)
                for rank, (d, out) in enumerate(zip(daemons, outs, strict=True))],
               daemons, run_id)
        check_steps(server, seaweed, run_id, outs, steps)
        # each node sent only its own files, and only node 0 (holding .metadata) finalized
        for rank, d in enumerate(daemons):
            js = node_jobs(d, run_id)
            assert len(js) == steps and all(j["state"] == "done" for j in js), js
            for j in js:
                result = j.get("result") or {}
                assert result.get("joined") is True, j
                assert result["finalized_here"] is (rank == 0), j
                assert result["files_here"] == (2 if rank == 0 else 1), j
        # node 0 ended the run on Chronicle once its own jobs were done; the others left it
        for rank, d in enumerate(daemons):
            assert ("node 0 ends it on Chronicle" in d.log_text()) is (rank > 0), rank

        # restore the last step per rank, with filters, each node through its own daemon
        restored = [tmp_path / f"node{r}" / "restore" for r in range(n)]
        for rank, d in enumerate(daemons):
            wait_until(lambda d=d: len(list((d.state_dir / "cache" / "objects").iterdir()))
                       == steps, 30, "every step's own files kept in the node cache")
            r = subprocess.run(
                [sys.executable, "-m", "agent", "download", "--run", run_id, "--type",
                 "checkpoint", "--latest", str(restored[rank]), "--include", ".metadata",
                 "--include", f"__{rank}_*", "--json"], env=writer_env(d),
                capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, r.stderr
            got = json.loads(r.stdout)
            assert tree(restored[rank]) == {
                k: v for k, v in tree(outs[0] / f"step-{steps}").items() if k == ".metadata"
            } | tree(outs[rank] / f"step-{steps}"), rank
            # its own shard from its node cache: only .metadata fetched, where not written
            assert got["fetched"] == (0 if rank == 0 else 1), (rank, got)
        load_port = free_port()
        loaders = [subprocess.Popen(
            [sys.executable, str(WRITER), str(restored[rank]), "--first-rank", str(rank),
             "--local", "1", "--world", "4", "--port", str(load_port), "--load", str(steps)],
            env=writer_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank in range(n)]
        for p in loaders:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, err[-3000:]


def test_shared_directory_spreads_the_bytes_across_the_agents(
        server: Standalone, seaweed: Seaweed, tmp_path: Path) -> None:
    """Four nodes' agents watching one shared directory that a real dcp.save from four
    ranks (one per node) writes: each agent sees every step whole and sends its share of
    the files only (split by bytes, the same on every node); one asset per step, byte for
    byte, finalized by node 0."""
    run_id, port, steps, n = f"run_sh_{secrets.token_hex(3)}", free_port(), 2, 4
    out = tmp_path / "shared" / "ckpt"
    with ExitStack() as stack:
        daemons = nodes(stack, server, *({} for _ in range(n)))
        finish([exec_node(d, run_id, out, rank, port, steps, nodes=n, shared=True)
                for rank, d in enumerate(daemons)], daemons, run_id)
        check_steps(server, seaweed, run_id, [out], steps,
                    {f".chronicle-nodes/{r}" for r in range(n)})
        total = {k: sum(len(v) for v in tree(out / f"step-{k}").values())
                 for k in range(1, steps + 1)}
        split: dict[int, list[int]] = {}
        for rank, d in enumerate(daemons):
            js = node_jobs(d, run_id)
            assert len(js) == steps and all(j["state"] == "done" for j in js), describe(
                daemons, run_id)
            for j in js:
                res = j["result"]
                assert res["share"] == rank and res["finalized_here"] is (rank == 0), res
                assert not res.get("taken_over"), res
                split.setdefault(rank, []).append(res["bytes_here"])
        for k in range(steps):  # the split: every agent sent a share, together all of it
            sent = [split[r][k] for r in range(n)]
            assert sum(sent) in total.values(), (sent, total)
            assert all(b > 0.2 * sum(sent) for b in sent), sent
        print(f"shared directory, {n} agents, bytes sent per agent each step: {split}")


def test_a_silent_agents_share_is_taken_over(
        server: Standalone, seaweed: Seaweed, tmp_path: Path) -> None:
    """Three nodes' agents on one shared directory; node 2's agent dies (kill -9) right
    after it registered its share of the first step and never comes back. The others take
    over its share of that step (claimed, then silent) and of the next (never claimed)
    after runs.takeover_s: every step is still one whole asset, byte for byte."""
    run_id, port, steps, n = f"run_sh_{secrets.token_hex(3)}", free_port(), 2, 3
    out = tmp_path / "shared" / "ckpt"
    fast = {"CHRONICLE_AGENT_RUNS__TAKEOVER_S": "4"}
    with ExitStack() as stack:
        daemons = nodes(stack, server, fast, fast,
                        {**fast, "CHRONICLE_AGENT_DEBUG__CRASH_POINT": "after_register@1"})
        procs = [subprocess.Popen(  # node 0: ranks 0 and 1; node 1: rank 2; node 2: rank 3
            [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch", str(out),
             "--type", "checkpoint", "--nodes", str(n), "--node-rank", str(rank),
             "--quiescence-s", "30", "--shared", "--", sys.executable, str(WRITER), str(out),
             "--first-rank", str(first), "--local", str(2 if rank == 0 else 1), "--world",
             "4", "--port", str(port), "--steps", str(steps)],
            env=writer_env(d), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for rank, first, d in zip((0, 1, 2), (0, 2, 3), daemons, strict=True)]
        dead = daemons[2]
        assert dead.proc is not None
        dead.proc.wait(120)
        assert dead.proc.returncode == -9, dead.log_tail()
        procs[2].communicate(timeout=180)  # its ranks go on; its exec cannot report
        finish(procs[:2], daemons[:2], run_id)
        check_steps(server, seaweed, run_id, [out], steps,
                    {f".chronicle-nodes/{r}" for r in range(n)})
        took = [s for d in daemons[:2] for j in node_jobs(d, run_id)
                for s in (j.get("result") or {}).get("taken_over") or []]
        assert sorted(took) == [2] * steps, describe(daemons[:2], run_id)
        assert any("takes it over" in d.log_text() for d in daemons[:2])


@pytest.mark.parametrize("index_on", ["1", "none"])
def test_three_nodes_by_a_safetensors_index_or_by_their_count(
        server: Standalone, seaweed: Seaweed, tmp_path: Path, index_on: str) -> None:
    """Three nodes, each writing its own real safetensors shard of each step. With an index
    (written on node 1, naming every shard) node 1 finalizes; with none, node 0 does once
    all three nodes joined. Either way one asset per step, byte-exact, and only that node
    finalized."""
    run_id, steps, n = f"run_st_{secrets.token_hex(3)}", 2, 3
    outs = [tmp_path / f"node{r}" / "ckpt" for r in range(n)]
    shards = [f"model-{r + 1:05d}-of-{n:05d}.safetensors" for r in range(n)]
    index = ["model.safetensors.index.json"] if index_on != "none" else []
    finalizer = int(index_on) if index else 0
    with ExitStack() as stack:
        daemons = nodes(stack, server, *({} for _ in range(n)))
        procs = []
        for rank, (d, out) in enumerate(zip(daemons, outs, strict=True)):
            cmd = [sys.executable, "-m", "agent", "exec", "--run", run_id, "--watch",
                   str(out), "--type", "checkpoint", "--nodes", str(n), "--node-rank",
                   str(rank), "--quiescence-s", "1", "--", sys.executable,
                   str(ST_WRITER), str(out), "--rank", str(rank), "--nodes", str(n),
                   "--steps", str(steps), "--index-on", index_on]
            procs.append(subprocess.Popen(cmd, env=writer_env(d), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        finish(procs, daemons, run_id)
        ch = server.client("user_alice")
        assets = ch.assets.list(output_of=run_id)
        assert len(assets) == steps and all(a.state == "ready" for a in assets), assets
        s3 = s3_client(seaweed)
        for a in assets:
            markers = {f".chronicle-nodes/{r}" + (".index" if index and r == finalizer
                                                  else "") for r in range(n)}
            assert {c.name for c in a.components} == {*shards, *index, *markers}
            urls = ch.assets.get(a.asset_id, include_presigned=True).download_urls
            got = {name: s3_read(s3, urls[name]) for name in [*shards, *index]}
            step = next(k for k in range(1, steps + 1) if all(
                got[shards[r]] == (outs[r] / f"step-{k}" / shards[r]).read_bytes()
                for r in range(n)))
            if index:
                assert got[index[0]] == (outs[finalizer] / f"step-{step}" / index[0]
                                         ).read_bytes()
        for rank, d in enumerate(daemons):
            js = node_jobs(d, run_id)
            assert len(js) == steps and all(j["state"] == "done" for j in js), describe(
                daemons, run_id)
            assert all(j["result"]["finalized_here"] is (rank == finalizer) for j in js), (
                rank, [j["result"] for j in js], describe(daemons, run_id))
        assert run_status(ch, run_id) == "finished"


def test_without_asset_keys_each_node_part_is_an_asset_of_its_own(
        seaweed: Seaweed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Against a Chronicle that does not offer asset_keys, each daemon says so once and
    uploads its node's part of each step as an asset of its own, named by the node's
    marker; nothing is lost and node 0 ends the run once the others' parts are ready (node
    1, which has no .metadata, seals by a longer quiescence: its last part registers well
    after node 0's is ready, and a run ended on Chronicle would refuse it)."""
    use_seaweed_env(seaweed, monkeypatch)
    run_id, port, steps = f"run_mn_{secrets.token_hex(3)}", free_port(), 2
    outs = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    with standalone_server(tmp_path / "srv", {"user_alice": []}, asset_keys=False,
                           storage=seaweed.storage_url(f"mn-{secrets.token_hex(4)}")
                           ) as srv, ExitStack() as stack:
        daemons = nodes(stack, srv, {}, {})
        finish([exec_node(d, run_id, out, rank, port, steps, quiescence_s=2 + 5 * rank)
                for rank, (d, out) in enumerate(zip(daemons, outs, strict=True))],
               daemons, run_id)
        ch = srv.client("user_alice")
        assets = ch.assets.list(output_of=run_id)
        assert len(assets) == 2 * steps and all(a.state == "ready" for a in assets), assets
        parts = sorted(sorted(c.name for c in a.components) for a in assets)
        assert parts == sorted(
            [[f".chronicle-nodes/step-{s}/0", ".metadata", "__0_0.distcp", "__1_0.distcp"]
             for s in range(1, steps + 1)]
            + [[f".chronicle-nodes/step-{s}/1", "__2_0.distcp", "__3_0.distcp"]
               for s in range(1, steps + 1)])
        for d in daemons:
            assert d.log_text().count("does not offer assets built by several uploaders") == 1
            assert all(j["state"] == "done" for j in node_jobs(d, run_id))
        assert run_status(ch, run_id) == "finished"


def test_an_agent_killed_mid_step_finishes_its_part_after_its_restart(
        server: Standalone, seaweed: Seaweed, tmp_path: Path) -> None:
    """Node 1's daemon kills itself (kill -9) once its first file of step-1 is uploaded;
    restarted, it uploads the rest of its part, and every step ends whole."""
    run_id, port, steps = f"run_mn_{secrets.token_hex(3)}", free_port(), 2
    outs = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    with ExitStack() as stack:
        daemons = nodes(stack, server, {}, {
            "CHRONICLE_AGENT_DEBUG__CRASH_POINT": "after_component:1@1"})
        procs = [exec_node(d, run_id, out, rank, port, steps)
                 for rank, (d, out) in enumerate(zip(daemons, outs, strict=True))]
        killed = daemons[1]
        assert killed.proc is not None
        killed.proc.wait(120)
        assert killed.proc.returncode == -9, killed.log_tail()
        killed.start()  # the crash point is armed on the first start only
        finish(procs, daemons, run_id)
        check_steps(server, seaweed, run_id, outs, steps)
        assert all(j["state"] == "done" for j in node_jobs(killed, run_id)), describe(
            daemons, run_id)


def test_a_node_that_never_uploads_leaves_no_partial_asset(
        server: Standalone, seaweed: Seaweed, tmp_path: Path) -> None:
    """Node 1's ranks write their shards, but no agent uploads them: node 0 never finalizes
    a step; once its run has ended and runs.join_wait_s passed, it abandons each step's
    asset and its jobs fail nodes_missing, with a WARNING and a count in /metrics."""
    run_id, port, steps = f"run_mn_{secrets.token_hex(3)}", free_port(), 2
    outs = [tmp_path / "node0" / "ckpt", tmp_path / "node1" / "ckpt"]
    with ExitStack() as stack:
        (d,) = nodes(stack, server, {"CHRONICLE_AGENT_RUNS__JOIN_WAIT_S": "2"})
        finish([exec_node(d, run_id, outs[0], 0, port, steps),
                exec_node(None, run_id, outs[1], 1, port, steps)], [d], run_id)
        assets = server.client("user_alice").assets.list(output_of=run_id)
        assert len(assets) == steps and all(a.state == "abandoned" for a in assets), assets
        assert all("never arrived from the other nodes" in (a.abandoned_reason or "")
                   for a in assets), assets
        js = node_jobs(d, run_id)
        assert [j["state"] for j in js] == ["failed"] * steps, js
        assert all(j["error"]["code"] == "nodes_missing" for j in js), js
        assert "__2_0.distcp" in js[0]["error"]["message"], js
        assert "WARNING" in d.log_text() and "nodes_missing" in d.log_text()
        metrics = socket_get_text(d.socket_path, "/metrics")
        assert f'chronicle_agent_jobs{{state="failed"}} {steps}' in metrics, metrics


def s3_client(sw: Seaweed) -> Any:
    import botocore.session

    return botocore.session.Session().create_client(
        "s3", region_name="us-east-1", endpoint_url=sw.endpoint,
        aws_access_key_id=sw.access_key, aws_secret_access_key=sw.secret_key)


def s3_read(s3: Any, url: str) -> bytes:
    """An object's bytes, by the bucket and key a (path-style) download URL names."""
    bucket, _, key = urlsplit(url).path.lstrip("/").partition("/")
    return s3.get_object(Bucket=bucket, Key=unquote(key))["Body"].read()  # type: ignore[no-any-return]

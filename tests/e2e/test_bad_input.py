"""Bad input to the socket API gets a clear error naming what was wrong, and loses
nothing: work queued before it still completes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from agent.errors import ApiError
from tests.support.helpers_daemon import DaemonProc


def raw_request(sock_path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock_path))
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def test_malformed_json_is_a_400_naming_it(daemon: DaemonProc) -> None:
    body = b'{"path": "/x", "asset_type": '
    resp = raw_request(daemon.socket_path, b"POST /v1/uploads HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nConnection: close\r\n"
                       b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    head, _, payload = resp.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"invalid_request" in payload and b"malformed JSON" in payload


@pytest.mark.parametrize(("path", "body", "needle"), [
    ("/v1/uploads", {"path": "relative/dir", "asset_type": "checkpoint"}, "absolute"),
    ("/v1/uploads", {"path": "/no/such/dir", "asset_type": "checkpoint"},
     "no such file or directory"),
    ("/v1/uploads", {"path": "/tmp", "asset_type": ""}, "asset_type"),
    ("/v1/uploads", {"path": "/tmp", "asset_type": "x", "colour": "red"}, "colour"),
    ("/v1/uploads", {"path": "/tmp", "asset_type": "x", "visibility": "world"}, "visibility"),
    ("/v1/downloads", {"asset_id": "ast_1", "dest": "rel"}, "absolute"),
    ("/v1/assets/presigned", {"asset_type": "x", "components": []}, "components"),
])
def test_bad_requests_are_refused_with_the_reason(
    daemon: DaemonProc, path: str, body: dict[str, object], needle: str
) -> None:
    with pytest.raises(ApiError) as e:
        daemon.client().request("POST", path, body)
    assert e.value.status == 400
    assert needle in e.value.message


def test_unknown_job_and_route(daemon: DaemonProc) -> None:
    with pytest.raises(ApiError) as e:
        daemon.client().request("GET", "/v1/jobs/job_nope")
    assert e.value.status == 404 and e.value.code == "not_found"
    with pytest.raises(ApiError) as e:
        daemon.client().request("GET", "/v1/nothing-here")
    assert e.value.status == 404


def test_nothing_queued_is_lost_across_bad_input_and_a_kill(
    daemon: DaemonProc, tmp_path: Path
) -> None:
    f = tmp_path / "good.bin"
    f.write_bytes(os.urandom(100_000))
    client = daemon.client()
    good = client.request("POST", "/v1/uploads", {"path": str(f), "asset_type": "checkpoint"})
    daemon.kill()  # acknowledged means durable: a kill -9 right after loses nothing
    daemon.start()
    client = daemon.client()
    for bad in ({"path": "nope"}, {"asset_type": "x"}, {"path": "/nope", "asset_type": "x"}):
        with pytest.raises(ApiError):
            client.request("POST", "/v1/uploads", bad)
    final = client.wait_job(good["job_id"], 60)
    assert final["state"] == "done"
    jobs = client.list_jobs()
    assert [j["job_id"] for j in jobs] == [good["job_id"]]  # the refusals queued nothing

"""Large components fetched as ranged GETs at once, for real: a daemon whose
storage traffic goes through the fault proxy (which counts requests and bytes), the local
server's disk store and SeaweedFS.

- byte-exact, several GETs of the one URL, nothing but the component at the destination;
- after ``kill -9`` mid-download, the restart fetches only the ranges not recorded whole;
- a byte flipped in flight in one range: found by a second fetch of every range, that
  range rewritten, the destination never holds a corrupt file; corrupted every time, the
  job fails and leaves nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_download import (
    WAIT_S,
    download,
    killed_mid_download,
    no_partials,
    start_download,
    upload,
)
from tests.support.faultproxy import FaultProxy
from tests.support.helpers_e2e import MiB, assert_same_tree, proxied_daemon, write_random
from tests.support.helpers_seaweed import Seaweed

RANGE = MiB
RANGED_ENV = {"CHRONICLE_AGENT_DOWNLOAD__RANGE_BYTES": str(RANGE),
              "CHRONICLE_AGENT_DOWNLOAD__CACHE_MAX_BYTES": "0"}
BIG = 11 * MiB + 4321  # 12 ranges, uploaded as a 3-part multipart component


def source(root: Path) -> Path:
    write_random(root / "big.bin", BIG)
    (root / "small.txt").write_text("small")
    return root


def big_gets(proxy: FaultProxy, aid: str) -> list[dict[str, Any]]:
    """The GETs of big.bin the proxy saw (disk store or S3 paths)."""
    return [e for e in proxy.stats()["log"] if e["method"] == "GET"
            and aid in e["path"] and e["path"].endswith("big.bin")]


@pytest.mark.parametrize("store", ["disk", "s3"])
def test_a_large_component_comes_as_ranges_at_once_byte_exact(
    tmp_path: Path, store: str, request: pytest.FixtureRequest
) -> None:
    seaweed: Seaweed | None = request.getfixturevalue("seaweed") if store == "s3" else None
    src = source(tmp_path / "src")
    with proxied_daemon(RANGED_ENV, seaweed=seaweed) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        dest = tmp_path / "dest"
        download(daemon, aid, dest)
        assert_same_tree(src, dest)  # no record of ranges left beside the files
        assert no_partials(tmp_path)
        assert len(big_gets(proxy, aid)) == 12
        assert proxy.stats()["bytes_down"] == BIG + len("small")


def test_kill_mid_download_fetches_only_the_missing_ranges(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    env = {**RANGED_ENV,
           "CHRONICLE_AGENT_DEBUG__CRASH_POINT": f"mid_download:{10 * MiB}@2",
           "CHRONICLE_AGENT_UPLOAD__BANDWIDTH_LIMIT_BYTES_PER_S": str(20 * MiB)}
    with proxied_daemon(env) as (daemon, proxy):
        dest = tmp_path / "dest"
        # after 10 MiB: with at most 8 ranges in flight (under 1 MiB each unrecorded), at
        # least two are whole and recorded by then
        aid, job_id = killed_mid_download(daemon, proxy, src, dest)
        partial = next(p for p in tmp_path.iterdir() if ".chronicle-partial-" in p.name)
        record = json.loads((partial / ".big.bin.chronicle-ranges").read_text())
        whole = len(record["done"])
        assert 1 <= whole < 12, record
        sent_before = proxy.stats()["bytes_down"]
        daemon.start()
        final = daemon.client().wait_job(job_id, WAIT_S)
        assert final["state"] == "done", (final, daemon.log_tail())
        assert_same_tree(src, dest)
        assert no_partials(tmp_path)
        assert f"resuming, {whole} of 12 ranges already here" in daemon.log_text()
        resent = proxy.stats()["bytes_down"] - sent_before
        small_again = len("small")  # small.txt may not have been fetched before the kill
        missing = sum(min(RANGE, BIG - i * RANGE) for i in range(12)
                      if i not in record["done"])  # the last range is short
        assert resent <= missing + small_again
        assert len(big_gets(proxy, aid)) >= 12 - whole


def test_a_range_corrupted_in_flight_is_found_and_fetched_again(tmp_path: Path) -> None:
    src = source(tmp_path / "src")
    with proxied_daemon(RANGED_ENV) as (daemon, proxy):
        aid = upload(daemon, src)
        proxy.reset_stats()
        proxy.set_rules([{"action": "corrupt_response", "method": "GET",
                          "path_regex": "big\\.bin", "after": 4, "times": 1,
                          "offset": 777}])
        dest = tmp_path / "dest"
        download(daemon, aid, dest)
        assert_same_tree(src, dest)
        assert proxy.stats()["faults"] == {"corrupt_response": 1}
        assert len(big_gets(proxy, aid)) == 24  # every range once more, to find the bad one
        log = daemon.log_text()
        assert "SHA-256 mismatch; fetching every range again" in log
        assert log.count("differed from a second fetch: rewritten") == 1

        # corrupted every time: the job fails, nothing at the destination, no partials
        aid2 = upload(daemon, source(tmp_path / "src2"))
        proxy.set_rules([{"action": "corrupt_response", "method": "GET",
                          "path_regex": "big\\.bin", "offset": 5, "times": -1}])
        dest2 = tmp_path / "dest2"
        final = daemon.client().wait_job(start_download(daemon, aid2, dest2), WAIT_S)
        assert final["state"] == "failed", final
        assert final["error"]["code"] == "checksum_mismatch", final
        assert not dest2.exists() and no_partials(tmp_path)

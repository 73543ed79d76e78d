"""Search latency of the local server at 100,000 assets (issue 15).

    .venv/bin/python benchmarks/bench_search.py [--assets 100000] [--queries 200]

A server database is filled in one transaction through the server's own row functions
(``agent.server.db.insert_asset``, which also writes the search document): asset types,
component names and, for a third of them, inline text of 20-60 words drawn from a
5000-word vocabulary with a Zipf-like frequency; three principals own them (``user_a`` and
``user_b`` in ``org_1``, ``user_c`` alone), 70 % private, 20 % visible to ``org_1``, 10 %
public, 5 % with a read grant to another principal. Then ``chronicle-agent server`` runs on
that state dir as its own process and each principal sends ``GET /v1/assets/search`` over
one kept-alive connection: a frequent word, a middling one, a rare one, two words, and a
prefix, ``--queries`` times each in random order. Printed: the median and p99 latency per
kind and principal (wall of the HTTP round trip), and how many hits the first page held.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(REPO), str(HERE)]

from _common import Server  # noqa: E402

from agent.server import db  # noqa: E402

TYPES = ["checkpoint", "report", "metrics", "dataset", "config", "eval", "notes", "tokenizer"]
NAMES = ["model.safetensors", "optimizer.pt", "config.json", "tokenizer.json", "README.md",
         "metrics.jsonl", "shard-00001.bin", "vocab.txt", "eval/results.csv", "plots/loss.png"]
PRINCIPALS = {"user_a": ["org_1"], "user_b": ["org_1"], "user_c": []}


def vocabulary(n: int, rng: random.Random) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(letters) for _ in range(rng.randint(4, 10))))
    return sorted(words)


def fill(path: Path, count: int, rng: random.Random) -> list[str]:
    """``count`` assets in ``path``; the vocabulary, most frequent word first."""
    words = vocabulary(5000, rng)
    weights = [1 / (i + 1) for i in range(len(words))]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(f"BEGIN; {db.SCHEMA} PRAGMA user_version={db.SCHEMA_VERSION}; COMMIT;")
    conn.execute("BEGIN")
    now = db.utcnow()
    owners = list(PRINCIPALS)
    for i in range(count):
        asset_id = f"ast_{i:024x}"
        owner = rng.choices(owners, [4, 4, 2])[0]
        vis = rng.choices(["private", "organization", "public"], [7, 2, 1])[0]
        names = rng.sample(NAMES, rng.randint(1, 3))
        text = ""
        if rng.random() < 1 / 3:
            text = " ".join(rng.choices(words, weights, k=rng.randint(20, 60)))
        asset = db.AssetRow(
            asset_id=asset_id, asset_type=rng.choice(TYPES), state="ready", created_by=owner,
            visibility=vis, created_at=now, organization_id="org_1" if vis != "private" or
            owner != "user_c" else None, finalized_at=now,
            components=[db.ComponentRow(n, f"assets/{asset_id}/{n}", k, 1000, "0" * 64, True,
                                        None, uploaded=True) for k, n in enumerate(names)])
        db.insert_asset(conn, asset, text=text)
        if rng.random() < 0.05:
            db.add_grant(conn, asset_id, rng.choice([p for p in owners if p != owner]), "read")
    conn.execute("COMMIT")
    conn.close()
    return words


def tokens_file(path: Path) -> dict[str, str]:
    tokens = {p: os.urandom(12).hex() for p in PRINCIPALS}
    scopes = {p: [{"id": s, "kind": "organization", "name": s} for s in sc]
              for p, sc in PRINCIPALS.items()}
    path.write_text(json.dumps({"tokens": {tokens[p]: {"principal_id": p, "scopes": scopes[p]}
                                           for p in PRINCIPALS}}))
    return tokens


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--assets", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    args = ap.parse_args()
    rng = random.Random(15)
    root = Path(tempfile.mkdtemp(prefix="bench-search-", dir="/tmp"))
    server = None
    try:
        (root / "server").mkdir()
        t0 = time.perf_counter()
        words = fill(root / "server" / "server.db", args.assets, rng)
        print(f"filled {args.assets} assets in {time.perf_counter() - t0:.1f} s "
              f"(database {(root / 'server' / 'server.db').stat().st_size / 2**20:.0f} MiB)")
        tokens = tokens_file(root / "tokens.json")
        os.environ["CHRONICLE_AGENT_SERVER__TOKENS_FILE"] = str(root / "tokens.json")
        server = Server(root)
        host = urllib.parse.urlsplit(server.url)
        kinds = {"frequent word": words[0], "middling word": words[300],
                 "rare word": words[4900], "two words": f"{words[3]} {words[40]}",
                 "prefix": words[10][:3]}
        print(f"{'query':<16}{'principal':<10}{'median ms':>10}{'p99 ms':>9}{'hits':>6}")
        for principal, token in tokens.items():
            conn = http.client.HTTPConnection(host.hostname, host.port, timeout=30)
            plan = [k for k in kinds for _ in range(args.queries)]
            rng.shuffle(plan)
            took: dict[str, list[float]] = {k: [] for k in kinds}
            hits: dict[str, int] = {}
            for kind in plan:
                path = "/v1/assets/search?" + urllib.parse.urlencode({"q": kinds[kind]})
                t = time.perf_counter()
                conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
                resp = conn.getresponse()
                body = resp.read()
                took[kind].append((time.perf_counter() - t) * 1000)
                if resp.status != 200:
                    raise RuntimeError(f"{kind}: HTTP {resp.status} {body[:300]!r}")
                hits[kind] = len(json.loads(body)["assets"])
            conn.close()
            for kind, ms in took.items():
                ms.sort()
                p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
                print(f"{kind:<16}{principal:<10}{statistics.median(ms):>10.1f}{p99:>9.1f}"
                      f"{hits[kind]:>6}", flush=True)
    finally:
        if server is not None:
            server.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

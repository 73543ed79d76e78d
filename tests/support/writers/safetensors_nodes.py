"""One node's part of a sharded safetensors checkpoint written by several nodes, each into
its own (node-local) directory, the way a model's shards are written by rank.

    python tests/support/writers/safetensors_nodes.py OUT --rank R --nodes N
        [--steps 2] [--pause-s 0.5] [--index-on R|none]

Each step, node R writes ``OUT/step-K/model-0000{R+1}-of-0000{N}.safetensors`` (real
safetensors, numpy arrays) and, on the node ``--index-on`` names, the
``model.safetensors.index.json`` whose ``weight_map`` names every node's shard, written last;
with ``--index-on none``, no index anywhere (a writer the agent knows nothing of)."""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from safetensors.numpy import save_file


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--pause-s", type=float, default=0.5)
    p.add_argument("--index-on", default="0")
    a = p.parse_args()
    rng = np.random.default_rng(a.rank)
    shard = lambda r: f"model-{r + 1:05d}-of-{a.nodes:05d}.safetensors"  # noqa: E731
    for step in range(1, a.steps + 1):
        time.sleep(a.pause_s)  # a stand-in for a step's compute
        d = os.path.join(a.out, f"step-{step}")
        os.makedirs(d, exist_ok=True)
        tensors = {f"layers.{a.rank}.weight": rng.standard_normal((128, 128), dtype=np.float32),
                   f"layers.{a.rank}.bias": rng.standard_normal(128, dtype=np.float32)}
        save_file(tensors, os.path.join(d, shard(a.rank)))
        if a.index_on == str(a.rank):
            weight_map = {f"layers.{r}.{k}": shard(r) for r in range(a.nodes)
                          for k in ("weight", "bias")}
            with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


if __name__ == "__main__":
    main()

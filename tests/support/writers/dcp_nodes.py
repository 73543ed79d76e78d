"""One node's ranks of a torch.distributed.checkpoint job spread over several nodes, each
node writing to its own (node-local) directory.

    python tests/support/writers/dcp_nodes.py OUT --first-rank R --local N --world W
        --port P [--steps 3] [--pause-s 0.5] [--size-kib 256]

Starts ``--local`` processes with global ranks R..R+N-1 of a gloo group of ``--world``
(rendezvous on 127.0.0.1:P). Each step, every rank saves its own shard of a model (its keys
are its own, so it writes its own ``__<rank>_0.distcp``) with ``dcp.save(state,
checkpoint_id=OUT/step-N)``; global rank 0 writes ``.metadata``, which names every rank's
file, into its node's ``OUT/step-N``. The script exits 0 once every step is saved."""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp


def rank_main(local: int, a: argparse.Namespace) -> None:
    rank = a.first_rank + local
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{a.port}", rank=rank,
                            world_size=a.world)
    torch.manual_seed(rank)
    n = a.size_kib * 256  # float32s
    shard = {f"layer{rank}.weight": torch.randn(n), f"layer{rank}.bias": torch.randn(64)}
    for step in range(1, a.steps + 1):
        for t in shard.values():
            t.add_(0.01 * step)
        time.sleep(a.pause_s)  # a stand-in for a step's compute
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": shard, "step": torch.tensor(step)} if rank == 0
                     else {"model": shard}, checkpoint_id=os.path.join(a.out, f"step-{step}"))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--first-rank", type=int, required=True)
    p.add_argument("--local", type=int, required=True)
    p.add_argument("--world", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--pause-s", type=float, default=0.5)
    p.add_argument("--size-kib", type=int, default=256)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    mp.spawn(rank_main, args=(a,), nprocs=a.local, join=True)


if __name__ == "__main__":
    main()

"""One node's ranks of a torch.distributed.checkpoint job spread over several nodes, each
node writing to its own (node-local) directory.

    python tests/support/writers/dcp_nodes.py OUT --first-rank R --local N --world W
        --port P [--steps 3] [--pause-s 0.5] [--size-kib 256] [--load STEP]

Starts ``--local`` processes with global ranks R..R+N-1 of a gloo group of ``--world``
(rendezvous on 127.0.0.1:P). Each step, every rank saves its own shard of a model (its keys
are its own, so it writes its own ``__<rank>_0.distcp``) with ``dcp.save(state,
checkpoint_id=OUT/step-N)``; global rank 0 writes ``.metadata``, which names every rank's
file, into its node's ``OUT/step-N``. The script exits 0 once every step is saved.

With ``--load STEP``, the same ranks restore instead: each ``dcp.load``s its own keys from
``OUT`` (a restored checkpoint directory holding ``.metadata`` and at least the node's own
ranks' files) and exits non-zero unless every tensor equals what it saved at that step."""

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
    if a.load:
        load(rank, shard, a)
        return
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


def load(rank: int, shard: dict[str, torch.Tensor], a: argparse.Namespace) -> None:
    for step in range(1, a.load + 1):  # what it held when it saved step --load
        for t in shard.values():
            t.add_(0.01 * step)
    got = {"model": {k: torch.zeros_like(v) for k, v in shard.items()}}
    if rank == 0:
        got["step"] = torch.tensor(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(got, checkpoint_id=a.out)
    for k, v in shard.items():
        if not torch.equal(got["model"][k], v):
            raise SystemExit(f"rank {rank}: {k} differs from what step {a.load} saved")
    if rank == 0 and int(got["step"]) != a.load:
        raise SystemExit(f"rank 0: step is {int(got['step'])}, not {a.load}")
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
    p.add_argument("--load", type=int, default=0)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    mp.spawn(rank_main, args=(a,), nprocs=a.local, join=True)


if __name__ == "__main__":
    main()

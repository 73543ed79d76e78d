"""torch.distributed.checkpoint in one process: a tiny model's state saved every step.

    python tests/support/writers/dcp_save.py OUT REF [--steps 4] [--pause-s 0]

``dcp.save(state, checkpoint_id=OUT/step-N)`` (shards, then ``.metadata``); each step dir is
copied to REF right after ``dcp.save`` returned."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import torch  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402

from tests.support.writers._common import record_save, writer_args  # noqa: E402


def main() -> None:
    a = writer_args([("--steps", int, 4)])
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 64))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(32, 64)
    for step in range(1, a.steps + 1):
        loss = (model(x) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(a.pause_s)  # a stand-in for a real step's compute
        path = os.path.join(a.out, f"step-{step}")
        dcp.save({"model": model.state_dict(), "optim": opt.state_dict(),
                  "step": torch.tensor(step)}, checkpoint_id=path)
        record_save(path, a.ref)


if __name__ == "__main__":
    main()

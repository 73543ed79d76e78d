"""Single-file checkpoints, one per step: ``torch.save`` to a temporary name renamed into
place, or ``safetensors.torch.save_file`` straight onto the final name (written in place).

    python tests/support/writers/file_save.py OUT REF --kind rename|safetensors [--steps 4]
        [--mib 1] [--pause-s 0]

OUT/step-N.pt (from OUT/step-N.pt.tmp) or OUT/step-N.safetensors; each copied to REF
right after the save returned."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from tests.support.writers._common import record_save, writer_args  # noqa: E402


def main() -> None:
    a = writer_args([("--kind", str, "rename"), ("--steps", int, 4), ("--mib", float, 1.0)])
    os.makedirs(a.out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    n = int(a.mib * (1 << 20) / 4)
    for step in range(1, a.steps + 1):
        time.sleep(a.pause_s)  # a stand-in for a real step's compute
        state = {"w": torch.randn(n, generator=g), "step": torch.tensor([step])}
        if a.kind == "rename":
            path = os.path.join(a.out, f"step-{step}.pt")
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        else:
            path = os.path.join(a.out, f"step-{step}.safetensors")
            save_file(state, path)
        record_save(path, a.ref)


if __name__ == "__main__":
    main()

"""A Hugging Face Trainer run on a tiny GPT-2 with random weights (CPU, offline).

    python tests/support/writers/hf_train.py OUT REF [--steps 12] [--save-steps 2] [--limit 2]
        [--seed 0] [--kill-in-save N] [--pause-s 0]

Checkpoints go to OUT/checkpoint-N, as the Trainer writes them; each is copied to REF in
``TrainerCallback.on_save`` (called once ``_save_checkpoint`` returned: written and
rotated). ``--kill-in-save N``: the N-th save is cut short by kill -9 after the model and
optimizer are written and before ``trainer_state.json`` (a half-written checkpoint)."""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from tests.support.writers._common import die, record_save, writer_args  # noqa: E402


class Tokens(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 100, (n, 16), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class CopyOnSave(TrainerCallback):
    def __init__(self, out: str, ref: str, pause_s: float) -> None:
        self.out, self.ref, self.pause_s, self.saves = out, ref, pause_s, 0

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.saves += 1
        record_save(os.path.join(self.out, f"checkpoint-{state.global_step}"), self.ref)

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        time.sleep(self.pause_s)  # a stand-in for a real step's compute


def main() -> None:
    a = writer_args([("--steps", int, 12), ("--save-steps", int, 2), ("--limit", int, 2),
                     ("--seed", int, 0), ("--kill-in-save", int, 0)])
    torch.manual_seed(a.seed)
    torch.set_num_threads(1)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100,
                                       n_positions=32))
    copier = CopyOnSave(a.out, a.ref, a.pause_s)

    class KilledMidSave(Trainer):
        def _save_rng_state(self, output_dir):  # type: ignore[no-untyped-def]
            # model and optimizer are written; trainer_state.json is not yet
            if copier.saves + 1 == a.kill_in_save:
                die()
            return super()._save_rng_state(output_dir)

    args = TrainingArguments(
        output_dir=a.out, max_steps=a.steps, save_steps=a.save_steps,
        save_total_limit=a.limit, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=a.seed, data_seed=a.seed)
    KilledMidSave(model=model, args=args, train_dataset=Tokens(64, a.seed),
                  callbacks=[copier]).train()


if __name__ == "__main__":
    main()

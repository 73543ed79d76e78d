"""A Lightning run on a tiny MLP (CPU): ModelCheckpoint(save_top_k=2, save_last=True,
monitor="train_loss", every_n_epochs=1) into OUT.

    python tests/support/writers/lightning_train.py OUT REF [--epochs 6] [--pause-s 0]
        [--kill-after-last-s S]

Lightning calls ``Callback.on_save_checkpoint`` before the file is written, so the copy to
REF is taken in a ``ModelCheckpoint`` subclass right after ``_save_checkpoint`` returned.
``--kill-after-last-s S``: S seconds after the last epoch's ``last.ckpt`` is written, the
process kills itself with kill -9 (before the trainer's own end)."""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

from tests.support.writers._common import die, record_save, writer_args  # noqa: E402


class Tiny(L.LightningModule):
    def __init__(self, pause_s: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 1))
        self.pause_s = pause_s

    def training_step(self, batch: list[torch.Tensor], _: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        time.sleep(self.pause_s)  # a stand-in for a real step's compute
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class CopyingCheckpoint(ModelCheckpoint):
    def __init__(self, ref: str, epochs: int, kill_after_last_s: float, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.ref, self.epochs, self.kill_after_last_s = ref, epochs, kill_after_last_s

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        record_save(filepath, self.ref)
        if (self.kill_after_last_s and os.path.basename(filepath) == "last.ckpt"
                and trainer.current_epoch == self.epochs - 1):
            time.sleep(self.kill_after_last_s)
            die()


def main() -> None:
    a = writer_args([("--epochs", int, 6), ("--kill-after-last-s", float, 0.0)])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    data = torch.utils.data.TensorDataset(x, x.sum(dim=1, keepdim=True))
    ckpt = CopyingCheckpoint(a.ref, a.epochs, a.kill_after_last_s, dirpath=a.out,
                             save_top_k=2, save_last=True, monitor="train_loss", mode="min",
                             every_n_epochs=1, filename="epoch{epoch}-{train_loss:.4f}",
                             auto_insert_metric_name=False)
    trainer = L.Trainer(max_epochs=a.epochs, accelerator="cpu", devices=1, logger=False,
                        callbacks=[ckpt], enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=a.ref)
    trainer.fit(Tiny(a.pause_s), torch.utils.data.DataLoader(data, batch_size=16))


if __name__ == "__main__":
    main()

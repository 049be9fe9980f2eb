"""The one LightningModule: any network, cross-entropy, accuracy, optimiser and schedule from
params, latent-weight clipping for binary layers. Frozen parts are the network's business
(parameters with requires_grad=False are simply not optimised)."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from pipeline.config import Optim
from pipeline.nn.binary import clip_latent_weights


class Classifier(L.LightningModule):
    def __init__(self, net: nn.Module, optim: Optim, lr: float, num_classes: int):
        super().__init__()
        self.net = net
        self.optim, self.lr = optim, lr
        self.accuracy = nn.ModuleDict(
            {split: MulticlassAccuracy(num_classes, average="micro") for split in ("train_", "val_", "test_")}
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = self.accuracy[split + "_"]
        acc.update(logits.detach(), y)
        to_logger = split != "train"  # train metrics go out in on_train_epoch_end, before the checkpoint
        self.log(f"{split}_loss", loss.detach(), on_step=False, on_epoch=True, batch_size=len(y), logger=to_logger)
        self.log(f"{split}_acc", acc, on_step=False, on_epoch=True, batch_size=len(y), prog_bar=split == "val",
                 logger=to_logger)
        return loss

    def on_train_epoch_end(self):
        # Lightning writes the epoch's checkpoints before it logs the epoch's train metrics, so a run
        # killed in between resumed after that epoch and its train_loss never reached MLflow.
        # This hook runs before the checkpoint callbacks.
        if self.logger is not None:
            m = self.trainer.callback_metrics
            self.logger.log_metrics({k: float(m[k]) for k in ("train_loss", "train_acc") if k in m},
                                    step=self.trainer.global_step - 1)

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def on_train_start(self):
        # Lightning 2.6 keeps the modes it is handed; the network decides (frozen BN stays in eval).
        self.net.train()

    def on_train_batch_end(self, outputs, batch, batch_idx):
        clip_latent_weights(self.net)  # after the optimiser step

    def configure_optimizers(self):
        o = self.optim
        params = [p for p in self.net.parameters() if p.requires_grad]
        if o.optimizer == "sgd":
            opt = torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=o.weight_decay)
        elif o.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=o.weight_decay)
        else:
            opt = torch.optim.Adam(params, lr=self.lr, weight_decay=o.weight_decay)
        if o.scheduler == "none":
            return opt
        if o.scheduler == "step":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.step_size, gamma=o.gamma)
        else:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

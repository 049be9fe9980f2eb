"""The one LightningDataModule: prepared tensors (checked against their manifest) in memory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from pipeline.data.prepared import load_prepared


class EpochShuffle(Sampler[int]):
    """A permutation that depends only on (seed, epoch): a run resumed at epoch k sees the same
    order as an uninterrupted one (Lightning calls `set_epoch` at every epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


class PreparedData(L.LightningDataModule):
    def __init__(self, folder: Path, batch_size: int, num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.folder = Path(folder)
        self.manifest, self.splits = load_prepared(self.folder)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed

    @property
    def num_classes(self) -> int:
        return int(self.manifest["num_classes"])

    def with_inputs(self, inputs: dict[str, torch.Tensor]) -> "PreparedData":
        """A copy holding only the splits in `inputs`, with those inputs (e.g. features of a frozen
        prefix, computed once) and the same labels."""
        other = PreparedData.__new__(PreparedData)
        L.LightningDataModule.__init__(other)
        other.folder, other.manifest = self.folder, self.manifest
        other.batch_size, other.num_workers, other.seed = self.batch_size, self.num_workers, self.seed
        other.splits = {k: (x, self.splits[k][1]) for k, x in inputs.items()}
        return other

    def dataset(self, split: str) -> TensorDataset:
        return TensorDataset(*self.splits[split])

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        ds = self.dataset(split)
        sampler = EpochShuffle(len(ds), self.seed) if shuffle else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)

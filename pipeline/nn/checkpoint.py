"""Base model files: `model.pt` holds the architecture and the state dict only, loaded with
weights_only=True; its sha256 identifies the base that adapters were trained against."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.io import sha256 as file_sha256
from pipeline.nn.backbones import Arch, Backbone, build_backbone


def save_base(net: Backbone, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"arch": net.arch.to_dict(), "state_dict": net.state_dict()}, path)
    return sha256(path)


def sha256(path: Path) -> str:
    """A base checkpoint's sha256 (the base's identity), refusing a missing one in one line."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: base model not found; run `pipeline pretrain` (or `dvc repro pretrain`) first")
    return file_sha256(path)


def load_base(path: Path) -> Backbone:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: base model not found; run `pipeline pretrain` (or `dvc repro pretrain`) first")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        net = build_backbone(Arch(**blob["arch"]))
        net.load_state_dict(blob["state_dict"])
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"{path}: not a valid base model file ({type(exc).__name__}); rerun `pipeline pretrain`") from None
    return net

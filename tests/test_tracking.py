"""Where MLflow writes: the project's own store, also from DVC's temporary experiment copies."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import parse_params as _parse


def parse_params(raw: dict):
    raw.setdefault("data", {})["datasets"] = {"mnist_0to4": {"source": "mnist5k"}}
    raw.setdefault("transfer", {})["targets"] = ["mnist_0to4"]
    return _parse(raw)
from pipeline.train.tracking import artifact_location, main_root, tracking_uri, transfer_keys


def test_main_root_of_a_dvc_queue_copy_is_the_project():
    assert main_root(Path("/home/u/proj/.dvc/tmp/exps/tmpab12cd")) == Path("/home/u/proj")
    assert main_root(Path("/home/u/proj/.dvc/tmp/exps/run/tmpx/sub")) == Path("/home/u/proj")
    assert main_root(Path("/home/u/proj")) == Path("/home/u/proj")


def test_default_uri_and_overrides(monkeypatch, tmp_path):
    (tmp_path / "params.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = parse_params({})
    assert tracking_uri(params) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(params) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(params) == "http://127.0.0.1:5000" and artifact_location(params) is None
    pinned = parse_params({"tracking": {"uri": "sqlite:////tmp/x.db"}})
    assert tracking_uri(pinned) == "sqlite:////tmp/x.db"  # params win over the environment


def test_every_method_carries_the_same_keys():
    params = parse_params({})
    keys = [set(transfer_keys("t", m, "binary", params.adapter, 0, 8)) for m in ("full", "head", "serial", "parallel")]
    assert all(k == keys[0] for k in keys)
    head = transfer_keys("t", "head", "binary", params.adapter, 0, 8)
    assert (head["adapter_type"], head["groups"], head["adapter_bits"]) == ("none", 0, 0)

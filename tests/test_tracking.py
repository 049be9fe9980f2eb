"""Where MLflow writes: the project's own store, also from DVC's temporary experiment copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_params
from pipeline.config import parse_params as _parse

from pipeline.train.spec import from_params
from pipeline.train.tracking import artifact_location, main_root, tracking_uri


def test_main_root_of_a_dvc_queue_copy_is_the_project():
    assert main_root(Path("/home/u/proj/.dvc/tmp/exps/tmpab12cd")) == Path("/home/u/proj")
    assert main_root(Path("/home/u/proj/.dvc/tmp/exps/run/tmpx/sub")) == Path("/home/u/proj")
    assert main_root(Path("/home/u/proj")) == Path("/home/u/proj")


def test_default_uri_and_overrides(monkeypatch, tmp_path):
    (tmp_path / "params.yaml").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = _parse(tiny_params())
    assert tracking_uri(params) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert artifact_location(params) == (tmp_path.resolve() / "mlartifacts").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking_uri(params) == "http://127.0.0.1:5000" and artifact_location(params) is None
    pinned = _parse(tiny_params(**{"tracking.uri": "sqlite:////tmp/x.db"}))
    assert tracking_uri(pinned) == "sqlite:////tmp/x.db"  # params win over the environment


def test_every_method_carries_the_same_keys():
    params = _parse(tiny_params())
    keys = [set(from_params(params, "t", m, "binary", 0.01, 0).columns()) for m in ("full", "head", "bn", "serial", "parallel")]
    assert all(k == keys[0] for k in keys)
    head = from_params(params, "t", "head", "binary", 0.01, 0).columns()
    assert (head["adapter_type"], head["groups"], head["adapter_bits"], head["head_bits"]) == ("none", 0, 0, 8)
    serial = from_params(params, "t", "serial", "binary", 0.01, 0).columns()
    assert (serial["adapter_type"], serial["groups"], serial["prune_amount"]) == ("serial", 2, 0.5)  # tiny: groups 2, pruned
    assert from_params(params, "t", "full", "binary", 0.01, 0).columns()["head_bits"] == 32  # a whole float copy


# ------------------------------------------------------------------ what the MLflow UI reads (REST)


def _serve(root: Path):
    """`mlflow server` on the built project's own store, as a user would start it."""
    import subprocess
    import time
    import urllib.request

    from conftest import BIN
    from test_scaleout import free_port

    port = free_port()
    proc = subprocess.Popen([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], cwd=root,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                return proc, url
        except OSError:
            time.sleep(1)
    proc.kill()
    raise AssertionError("mlflow server did not start")


def _get(url: str, path: str, **query) -> dict:
    import json
    import urllib.parse
    import urllib.request

    return json.loads(urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30).read())


def _post(url: str, path: str, body: dict) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(f"{url}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(req, timeout=30).read())


@pytest.mark.slow
def test_rest_api_shows_kind_datasets_and_the_sweep_figure(built_project):
    """The facts the UI shows, read over the REST API the UI itself calls: the experiment is a model-
    training one, every training run names its prepared dataset (digest from the manifest's split
    hashes, split sizes in its profile), and the sweep's parent run holds the Pareto figure."""
    import hashlib
    import json
    import os
    import signal

    root, _, _ = built_project
    proc, url = _serve(root)
    try:
        exp = _get(url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="bnn-adapters")["experiment"]
        tags = {t["key"]: t["value"] for t in exp.get("tags", [])}
        assert tags["mlflow.experimentKind"] == "custom_model_development"
        runs = _post(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 1000})["runs"]
        stage = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])}.get("stage") for r in runs}
        training = [r for r in runs if stage[r["info"]["run_id"]] not in ("sweep",)]
        assert training
        for r in training:
            (ds,) = [d["dataset"] for d in r["inputs"]["dataset_inputs"]]
            manifest = json.loads((root / "data" / "prepared" / ds["name"] / "manifest.json").read_text())
            assert ds["digest"] == hashlib.sha256(json.dumps(manifest["sha256"], sort_keys=True).encode()).hexdigest()[:16]
            profile = json.loads(ds["profile"])
            assert {k: profile[f"{k}_images"] for k in ("train", "val", "test")} == \
                {k: sum(v.values()) for k, v in manifest["counts"].items()}
            assert json.loads(ds["source"])["uri"] == str((root / "data" / "prepared" / ds["name"]).resolve())
        (sweep,) = [r for r in runs if stage[r["info"]["run_id"]] == "sweep"]
        files = _get(url, "/api/2.0/mlflow/artifacts/list", run_id=sweep["info"]["run_id"])["files"]
        assert {"pareto.csv", "pareto_runs.csv", "trials.csv"} <= {f["path"] for f in files}  # its figure: the report's
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)

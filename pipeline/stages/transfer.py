"""Stage `transfer`: one (target, method[, precision]) arm by the study's protocol
(pipeline.train.protocol) -> models/<target>/<variant>/, reports/results/<target>__<variant>.csv,
reports/metrics/transfer_<target>_<variant>{.json,_curve.csv}."""

from __future__ import annotations

from pipeline.config import Params
from pipeline.errors import UserError
from pipeline.train.protocol import run_arm


def run(params: Params, target: str, method: str, precision: str = "binary") -> dict:
    params.dataset(target, "transfer")
    if method != "full" and precision != "binary":
        raise UserError(f"transfer: --precision {precision} applies to --method full only; {method} runs on the binary base")
    return run_arm(params, target, method, precision)

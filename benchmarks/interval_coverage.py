"""How often does each 95% interval for a paired accuracy gap hold the true gap? Simulated
studies of 5 seeds x 2,000 test images (two models on shared images), from test-image variation
dominating to seed-to-seed variation dominating, for three intervals: the report's (stats.paired_ci:
seeds and images both random), a t interval over the 5 seeds' differences (images fixed), and a
binomial-style interval over images pooling the seeds (seeds fixed). Writes
reports/interval_coverage.{csv,png}; tests/test_paired_stats.py uses the same model.

    python benchmarks/interval_coverage.py [--studies 1000]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.stats import mean_ci, paired_ci


def sig(z):
    return 1 / (1 + np.exp(-z))


def logits(rng, shape_images, shape_seeds, gap_logit: float, seed_sd: float, image_sd: float):
    """Logits of A and B on shared images: difficulty b_i ~ N(0, 1.5^2) shared by both (the
    pairing), each model's own lean on each image ~ N(0, image_sd^2), the same for every seed (so
    the test images are a sample that every seed sees), and each model's seed offset ~ N(0, seed_sd^2)."""
    b = rng.normal(0, 1.5, shape_images)
    lean_a, lean_b = rng.normal(0, image_sd, (2, *shape_images))
    off_a, off_b = rng.normal(0, seed_sd, (2, *shape_seeds))
    return 1.5 + b + lean_a + off_a, 1.5 - gap_logit + b + lean_b + off_b


def simulated_studies(rng, studies: int, seeds: int, images: int, gap_logit: float, seed_sd: float, image_sd: float):
    """Correctness of A and B, studies x seeds x images."""
    za, zb = logits(rng, (studies, 1, images), (studies, seeds, 1), gap_logit, seed_sd, image_sd)
    return rng.random((studies, seeds, images)) < sig(za), rng.random((studies, seeds, images)) < sig(zb)


def true_gap(rng, gap_logit: float, seed_sd: float, image_sd: float, n: int = 4_000_000) -> float:
    """The population gap E[P(A correct) - P(B correct)] over images and seeds, by a large sample
    (standard error about 1e-4, a hundredth of the intervals' width)."""
    za, zb = logits(rng, (n,), (n,), gap_logit, seed_sd, image_sd)
    return float(np.mean(sig(za) - sig(zb)))


def intervals(a: np.ndarray, b: np.ndarray) -> dict[str, tuple[float, float]]:
    d = a.astype(float) - b.astype(float)
    seeds = mean_ci(d.mean(1))
    pooled = mean_ci(d.mean(0))  # per-image differences averaged over seeds: images random, seeds fixed
    return {"paired_ci (seeds and images random)": paired_ci(a, b)[:2],
            "t over seeds (images fixed)": seeds, "over images (seeds fixed)": pooled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--out", default="reports")
    args = ap.parse_args()
    rng = np.random.default_rng(20261203)
    rows = []
    for seed_sd, image_sd in ((0.0, 1.0), (0.05, 1.0), (0.1, 0.7), (0.2, 0.3), (0.3, 0.0), (0.5, 0.0)):
        truth = true_gap(rng, 0.2, seed_sd, image_sd)
        hits: dict[str, int] = {}
        for start in range(0, args.studies, 250):
            a, b = simulated_studies(rng, min(250, args.studies - start), 5, 2000, 0.2, seed_sd, image_sd)
            for k in range(len(a)):
                for name, (m, h) in intervals(a[k], b[k]).items():
                    hits[name] = hits.get(name, 0) + (abs(m - truth) <= h)
        for name, n in hits.items():
            p = n / args.studies
            rows.append({"seed_sd": seed_sd, "image_sd": image_sd, "interval": name, "coverage": p,
                         "coverage_se": math.sqrt(p * (1 - p) / args.studies), "studies": args.studies})
        print(f"seed sd {seed_sd}, image sd {image_sd}: " + ", ".join(f"{k} {v / args.studies:.3f}" for k, v in hits.items()))
    df = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "interval_coverage.csv", index=False)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    ax.axhspan(0.93, 0.97, color="gold", alpha=0.3, label="93-97% (the goal)")
    ax.axhline(0.95, color="black", lw=0.8)
    labels = [f"seed sd {s:g}\nimage sd {i:g}" for s, i in df[["seed_sd", "image_sd"]].drop_duplicates().itertuples(index=False)]
    for name, g in df.groupby("interval", sort=False):
        ax.errorbar(range(len(g)), g.coverage, yerr=1.96 * g.coverage_se, marker="o", capsize=3, label=name)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"coverage of the true gap ({args.studies} studies each)")
    ax.set_title("95% intervals for a paired accuracy gap, 5 seeds x 2,000 test images")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "interval_coverage.png", dpi=110)
    print(f"wrote {out / 'interval_coverage.csv'} and {out / 'interval_coverage.png'}")


if __name__ == "__main__":
    main()

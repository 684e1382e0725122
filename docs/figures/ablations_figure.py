"""Draw a run's ablations side by side (the README's zero vs mean vs neuron vs channel figures).

    python docs/figures/ablations_figure.py RUN_DIR OUT.png [--title TEXT]

One row per candidate and ablation from RUN_DIR/verdicts.tsv (the primary metric, all cells): the change with its
95% bootstrap interval (filled: passes the controls; open: does not), and behind it a grey bar over the 2.5-97.5
percentiles of the random draws it is judged against (its ``null_pool`` in collapse.tsv). The dashed line is the
largest-other-weights control. The x axis is symmetric-log: zeroing and mean ablation can differ by 10^5.
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from scsuperweight import results as R  # noqa: E402
from scsuperweight.judge import DRAW_PREFIXES  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("out")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    run = R.load_run(a.run)
    v, col = run.verdicts, run.collapse
    metric = str(v["metric"].iloc[0])
    col = col[(col["metric"] == metric) & (col["group"] == "all")]
    draws = col[col["condition"].astype(str).str.startswith(DRAW_PREFIXES)].drop_duplicates("condition")
    top = col.loc[col["condition"] == "top_outliers", "delta"]
    rows = v.reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(rows) + 1.2))
    y = np.arange(len(rows))[::-1]
    for yi, (_, r) in zip(y, rows.iterrows()):
        pool = draws.loc[draws["control_for"].astype(str) == str(r["null_pool"]), "delta"].to_numpy(float)
        pool = pool[np.isfinite(pool)]
        if pool.size:
            lo, hi = np.percentile(pool, [2.5, 97.5])
            ax.barh(yi, hi - lo, left=lo, height=0.6, color="0.85", zorder=1)
        d, cl, ch = float(r["delta"]), float(r["ci_low"]), float(r["ci_high"])
        color = {"prune": "C3", "mean": "C0", "mean_activation": "C9", "neuron": "C2", "channel": "C1",
                 "joint": "C4"}.get(str(r["ablation"]), "k")
        if np.isfinite(cl) and np.isfinite(ch):
            ax.plot([cl, ch], [yi, yi], color=color, lw=1.5, zorder=2)
        ax.scatter([d], [yi], s=36, zorder=3, color=color if bool(r["passes"]) else "white", edgecolors=color)
    if len(top) and np.isfinite(float(top.iloc[0])):
        ax.axvline(float(top.iloc[0]), ls="--", color="0.4", lw=1, label="top-outliers control")
        ax.legend(loc="lower right", fontsize=7, frameon=False)
    ax.axvline(0, color="k", lw=0.6)
    labels = [f"{r['ablation']}: {r['candidate']}" if r["ablation"] != "joint" else "joint" for _, r in
              rows.iterrows()]
    ax.set_yticks(y, labels, fontsize=7)
    finite = np.abs(rows["delta"].to_numpy(float))
    finite = finite[np.isfinite(finite) & (finite > 0)]
    ax.set_xscale("symlog", linthresh=max(float(finite.min()) if finite.size else 1e-3, 1e-6))
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo * 1.5 if lo < 0 else lo, hi * 3 if hi > 0 else hi)  # room for the outermost points
    ax.tick_params(axis="x", labelsize=6)
    ax.set_xlabel(f"Δ {metric} vs baseline (symlog; filled = passes; grey = its null's 95% range)", fontsize=8)
    if a.title:
        ax.set_title(a.title, fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)


if __name__ == "__main__":
    main()

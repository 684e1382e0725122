"""Several processes and crashes: torchrun 2 ranks vs 1 process (exactness, time), and the time a SIGKILL loses.

1. `scsuperweight scan` then `prune` on the demo model and `synthetic_ad` cells, once as one process (one thread,
   as torchrun's ranks: OMP_NUM_THREADS=1) and once under ``torchrun --standalone --nproc-per-node 2`` (gloo on
   CPU). Printed: each arm's wall time per command, the ratio, and whether every table is identical (run ids
   aside). On a 2-core machine shared with other jobs expect little gain; the point is exactness.
2. Kill-and-resume: `scsuperweight embed` over a per-donor folder, uninterrupted (time T), then a run killed with
   SIGKILL once half its blocks are finished and the same command again. Time lost = (killed run + resume) - T,
   also in blocks (T / blocks per block), and the same for `prune` in conditions. Aim: at most one unit.

Usage: python benchmarks/bench_dist.py [--quick] [--cells N] [--block N] [--only torchrun|embed|prune]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _procs import cli_env, finished_blocks, kill_when, saved_conditions, write_donor_files  # noqa: E402


def _cli(args: list[str], launcher: list[str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([*(launcher or [sys.executable, "-m", "scsuperweight"]), *args], env=cli_env(),
                       capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed: {' '.join(args)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def _tables(out: Path) -> dict:
    import pandas as pd

    def read(p):
        try:
            return pd.read_csv(p, sep="\t").drop(columns="run_id", errors="ignore")
        except pd.errors.EmptyDataError:
            return pd.DataFrame()

    return {p.name: read(p) for p in sorted(out.glob("*.tsv"))}


def _killed_then_resumed(args: list[str], count, half: int) -> tuple[float, int]:
    """Run `args`, SIGKILL it once `count()` reaches `half`, rerun to the end; (seconds of both, units at kill)."""
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "scsuperweight", *args], env=cli_env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        kill_when(p, lambda: count() >= half, f"{half} units were done", timeout=None)
    except RuntimeError as err:
        raise SystemExit(f"{err}; use more cells") from None
    at_kill = count()
    _cli(args)
    return time.perf_counter() - t0, at_kill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (about 3 min on a busy 2-core machine)")
    ap.add_argument("--cells", type=int, default=None, help="cells (default 2000; --quick 400)")
    ap.add_argument("--block", type=int, default=None, help="embed block size (default 200; --quick 40)")
    ap.add_argument("--only", choices=("torchrun", "embed", "prune"), default=None,
                    help="one part: 2 ranks vs 1, or the kill-and-resume of embed or of prune (default all)")
    args = ap.parse_args()
    n = args.cells or (400 if args.quick else 2000)
    block = args.block or (40 if args.quick else 200)
    import anndata as ad  # noqa: F401 - fail early without the dependencies

    from scsuperweight.datasets import synthetic_ad

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adata = synthetic_ad(n_cells=n, n_donors=4, seed=0)
        adata.write_h5ad(tmp / "data.h5ad")
        write_donor_files(adata, tmp / "donors")
        scan = ["scan", "--model", "demo", "--data", str(tmp / "data.h5ad"), "--label-key", "cell_type",
                "--max-cells", str(min(n, 600)), "--no-progress"]
        prune = ["prune", "--model", "demo", "--label-key", "cell_type", "--condition-key", "condition",
                 "--donor-key", "donor", "--max-cells-per-label", "20" if args.quick else "60", "--n-random",
                 "10" if args.quick else "40", "--n-boot", "50", "--max-candidates", "2", "--no-progress"]
        torchrun = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc-per-node", "2", "-m",
                    "scsuperweight"]
        if args.only in (None, "torchrun"):
            _compare_ranks(tmp, n, scan, prune, torchrun)
        elif args.only == "prune":  # the prune kill needs a scan's candidates only
            _cli([*scan, "--out", str(tmp / "1_process")])
        if args.only in (None, "embed"):
            _kill_embed(tmp, block)
        if args.only in (None, "prune"):
            _kill_prune(tmp, prune)


def _compare_ranks(tmp: Path, n: int, scan: list[str], prune: list[str], torchrun: list[str]) -> None:
    """scan then prune as one process and under torchrun with 2 ranks: times, and whether the tables are equal."""
    times = {}
    for arm, launcher in (("1 process", None), ("torchrun 2", torchrun)):
        out = tmp / arm.replace(" ", "_")
        times[arm] = (_cli([*scan, "--out", str(out)], launcher), _cli([*prune, "--out", str(out)], launcher))
    a, b = _tables(tmp / "1_process"), _tables(tmp / "torchrun_2")
    same = set(a) == set(b) and all(a[k].equals(b[k]) for k in a)
    print(f"{n} cells, demo model, CPU, 1 thread per process")
    for arm, (s, p) in times.items():
        print(f"  {arm:>10}: scan {s:6.1f} s, prune {p:6.1f} s")
    print(f"  2 ranks / 1 process: scan {times['torchrun 2'][0] / times['1 process'][0]:.2f}x, "
          f"prune {times['torchrun 2'][1] / times['1 process'][1]:.2f}x; tables identical: {same} "
          f"({', '.join(sorted(a))})")


def _kill_embed(tmp: Path, block: int) -> None:
    """embed over the per-donor folder: uninterrupted, then SIGKILLed at half its blocks and resumed."""
    emb = ["embed", "--model", "demo", "--data", str(tmp / "donors"), "--block-size", str(block),
           "--no-progress"]
    clean = _cli([*emb, "--out", str(tmp / "clean")])
    n_blocks = json.loads((tmp / "clean" / "run.json").read_text())["progress"]["total"]
    both, at = _killed_then_resumed([*emb, "--out", str(tmp / "killed")],
                                    lambda: finished_blocks(tmp / "killed"), n_blocks // 2)
    per = clean / n_blocks
    startup = _cli([*emb, "--out", str(tmp / "killed")])  # a rerun with nothing left to do: start-up + finalize
    lost = both - clean - startup
    print(f"embed: {n_blocks} blocks of {block} cells, uninterrupted {clean:.1f} s; killed at {at} blocks, "
          f"killed + resumed {both:.1f} s; a restart alone costs {startup:.1f} s; lost beyond the restart "
          f"{lost:.1f} s = {lost / per:.2f} blocks")


def _kill_prune(tmp: Path, prune: list[str]) -> None:
    """prune after a scan: uninterrupted, then SIGKILLed at half its conditions and resumed."""
    base = tmp / "1_process"
    for d in ("p_clean", "p_killed"):
        shutil.copytree(base, tmp / d)
        for f in ("collapse.tsv", "verdicts.tsv", "contrasts.tsv", "conditions.tsv"):
            (tmp / d / f).unlink(missing_ok=True)
    clean_p = _cli([*prune, "--out", str(tmp / "p_clean")])
    rec = json.loads((tmp / "p_clean" / "run.json").read_text())["progress"]
    # every condition the prune ran (its progress record counts across the sequential rounds and joint phase)
    total = rec["finished_before"] + rec["computed_now"]
    both_p, at_p = _killed_then_resumed([*prune, "--out", str(tmp / "p_killed")],
                                        lambda: saved_conditions(tmp / "p_killed"), total // 2)
    rec = json.loads((tmp / "p_killed" / "run.json").read_text())["progress"]
    shutil.copytree(tmp / "p_clean", tmp / "p_again")
    # what any restart costs before its first condition: start-up, the sample, its inputs, the plan
    restart = _cli([*prune, "--out", str(tmp / "p_again"), "--dry-run"])
    per_p = (clean_p - restart) / total
    lost = both_p - clean_p - restart
    same_p = all(_tables(tmp / "p_clean")[k].equals(_tables(tmp / "p_killed")[k]) for k in ("collapse.tsv",))
    print(f"prune: {total} conditions, uninterrupted {clean_p:.1f} s; killed with {at_p} finished, killed + "
          f"resumed {both_p:.1f} s; a restart alone (--dry-run: start-up, sample, inputs, plan) costs "
          f"{restart:.1f} s; lost beyond the restart {lost:.1f} s = {lost / per_p:.2f} conditions at the mean "
          f"cost ({per_p:.2f} s; on a shared machine the load's drift can exceed this); the resume found "
          f"{rec['finished_before']} finished and computed {rec['computed_now']}: "
          f"{rec['finished_before'] + rec['computed_now'] - total} recomputed (the one in flight at the kill is "
          f"the most a kill can lose); collapse.tsv identical: {same_p}")


if __name__ == "__main__":
    main()

"""What the default prune plan costs on the whole-human-sized stand-in, and what a budget chooses.

Builds the stand-in in memory (no files), calibrates a forward on this machine, and prints the default plan
(3 candidates in block 2, 40 draws, top outliers, 3 restores, 2 x 6 scale points) over `--cells` cells of
`--tokens` tokens, then the choice for `--budget`. `--quick` uses the tiny stand-in.

    python benchmarks/bench_plan.py --quick
    python benchmarks/bench_plan.py --cells 466 --tokens 1200 --budget 15m
"""

from __future__ import annotations

import argparse

import torch

from scsuperweight.plan import calibrate, choose_budget, format_plan, make_plan, parse_budget
from scsuperweight.standin import parameter_count, standin_model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the tiny stand-in (seconds)")
    ap.add_argument("--cells", type=int, default=466)
    ap.add_argument("--tokens", type=int, default=1200)
    ap.add_argument("--budget", default="15m")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = standin_model("tiny" if a.quick else "human")
    n = model.config.nlayers
    # small models are overhead-bound on one cell: calibrate on a batch the size prune uses for them
    cal = calibrate(model, n_tokens=min(a.tokens, 256), n_cells=16 if a.quick else 1)
    print(f"stand-in: {parameter_count(model) / 1e6:.1f} M parameters; calibration: "
          f"{cal.flop_rate / 1e9:.1f} GFLOP/s ({cal.n_tokens} tokens, {cal.seconds:.2f} s)")
    fixed = [("baseline", n)] + [("prune", 2)] * 3 + [("top_outliers", 2)] + [("restore", 2)] * 3 \
        + [("scale", 2)] * 12
    plan = make_plan(model.config, fixed + [("random", 2)] * 40, n_cells=a.cells, tokens=a.tokens,
                     scan_cells=a.cells, flop_rate=cal.flop_rate, device=cal.device)
    print(format_plan(plan))
    per = a.cells // 5
    choice = choose_budget(parse_budget(a.budget), config=model.config, flop_rate=cal.flop_rate,
                           label_counts={f"type{i}": per for i in range(5)}, tokens=a.tokens,
                           fixed_conditions=fixed, null_layers=[2])
    print(f"\nbudget {a.budget}:")
    print(format_plan(choice.plan))


if __name__ == "__main__":
    main()

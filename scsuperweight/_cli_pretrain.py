"""The `scsuperweight pretrain` subcommand: train a small scGPT from scratch (the demo model's recipe by default)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """\
examples:
  # rebuild the shipped demo model from its recipe (seeded synthetic data, same seed -> same weights)
  scsuperweight pretrain --synthetic --recipe demo --out demo_model

  # a quick smoke run
  scsuperweight pretrain --synthetic --recipe demo --steps 50 --out /tmp/tiny

  # your own data (raw counts), held-out kNN on a label, then continue an interrupted run
  scsuperweight pretrain --data brain.h5ad --label-key cell_type --out my_model
  scsuperweight pretrain --data brain.h5ad --label-key cell_type --out my_model --resume

  # an exploratory recipe for real data (HVGs, zeros in the sequences); measured on Darmanis 2015: <cls> kNN 0.43
  # vs 0.755 for PCA, embeddings still collapsed -- see scsuperweight/train.py for why
  scsuperweight pretrain --data darmanis2015_GSE67835.h5ad --recipe darmanis --label-key cell_type --out dar_model

  # your own recipe (any subset of the keys of scsuperweight/recipes/demo.json)
  scsuperweight pretrain --data brain.h5ad --recipe my_recipe.json --out my_model

The output directory holds an official scGPT checkpoint (args.json, vocab.json, best_model.pt) that
`scsuperweight.load_model(DIR)` and every other command read, train_state.pt (for --resume) and
training_log.json (held-out GEP/GEPC MSE vs the gene-mean baseline, <cls> kNN accuracy, FFN-output spikes).
"""


def add_pretrain_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "pretrain", help="train a small scGPT from scratch (the demo model's recipe by default)",
        description="Pretrain a small scGPT on raw counts with the scGPT objective (masked GEP + GEPC),\n"
                    "with a held-out evaluation, periodic official-format checkpoints and exact resume.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", metavar="FILE.h5ad", help="AnnData of raw counts (gene symbols as var_names)")
    src.add_argument("--synthetic", action="store_true",
                     help="train on the seeded synthetic AD-like data the recipe's 'data' section describes")
    p.add_argument("--recipe", default="demo", metavar="demo|darmanis|PATH.json",
                   help="shipped recipe name (demo, darmanis) or a JSON file (default: demo)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the recipe's)")
    p.add_argument("--seed", type=int, default=None, help="training seed (default: the recipe's)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: cuda if available, else cpu)")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size (default: the recipe's)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt exactly")
    p.add_argument("--save-every", type=int, default=None, metavar="N",
                   help="also keep a checkpoint every N steps under DIR/steps/step_NNNNNN (for `census`)")
    p.add_argument("--label-key", default=None, metavar="KEY",
                   help="obs column for the held-out kNN accuracy (default: the recipe's, when present)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_pretrain)
    return p


def _fail(msg: str) -> int:
    print(f"scsuperweight pretrain: error: {msg}", file=sys.stderr)
    return 2


def run_pretrain(args) -> int:
    import torch

    from .errors import SSWError
    from .train import load_recipe, pretrain, recipe_adata

    try:
        recipe = load_recipe(args.recipe)
    except ValueError as exc:
        return _fail(str(exc))
    if args.batch_size is not None:
        if args.batch_size < 1:
            return _fail(f"--batch-size must be >= 1, got {args.batch_size}.")
        recipe["train"]["batch_size"] = args.batch_size
    if args.steps is not None and args.steps < 1:
        return _fail(f"--steps must be >= 1, got {args.steps}.")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    if args.synthetic:
        adata = recipe_adata(recipe)
    else:
        path = Path(args.data)
        if not path.is_file():
            return _fail(f"--data file not found: {path}.")
        import anndata as ad

        try:
            adata = ad.read_h5ad(path)
        except (OSError, ValueError, KeyError) as exc:
            return _fail(f"cannot read {path} as .h5ad ({exc}).")
    try:
        model = pretrain(adata, recipe=recipe, out_dir=args.out, steps=args.steps, seed=args.seed,
                         device=args.device, resume=args.resume, progress=not args.no_progress,
                         label_key=args.label_key, save_every=args.save_every)
    except (SSWError, ValueError, FileNotFoundError) as exc:
        return _fail(str(exc))
    last = model.training_log["eval"][-1] if model.training_log["eval"] else {}
    summary = {k: last[k] for k in ("step", "gep_mse", "gepc_mse", "baseline_mse", "knn_accuracy",
                                    "mean_cosine") if k in last}
    print(json.dumps({"out": str(args.out), **summary}))
    return 0


def main(argv=None) -> int:  # standalone entry for testing before cli.py wires it in
    parser = argparse.ArgumentParser(prog="scsuperweight")
    add_pretrain_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

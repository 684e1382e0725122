"""`scsuperweight` command line: the demo, the whole run, each step, pretraining and data manifests.

Every command takes --device, --seed and --batch-size where they apply, shows progress bars on long work, and
checks all of its inputs (files, obs keys, condition levels, gene sets, device, output paths, numeric options)
before loading a model or tokenising a cell. Bad input exits 2 with one line naming the problem, the value and the
fix; only a bug exits 1, with a hint to rerun with --debug for the traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

from . import _keys as K
from . import checks as C
from . import results as R
from ._io import atomic_write_h5ad
from ._log import logger
from .errors import DataError, OptionError, SmallDataWarning, SSWError

EXAMPLES = {
    "demo": """examples:
  scsuperweight demo --out demo_out            # shipped demo model on seeded AD-like data, ~5 min on 2 cores
  scsuperweight demo --out demo_out --retrain  # pretrain the demo model afresh first (long)""",
    "run": """examples:
  scsuperweight run --model scGPT_brain/ --data cells.h5ad --label-key cell_type --out run_out --dry-run
  scsuperweight run --model scGPT_brain/ --data cells.h5ad --label-key cell_type --out run_out --budget 15m
  scsuperweight run --model scGPT_brain/ --data seaad_donor.h5ad --label-key Subclass \\
      --condition-key condition --donor-key "Donor ID" --layer UMIs --gene-sets bundled h.all.v7.0.symbols.gmt \\
      --out run_out
  scsuperweight run --model demo --data cells.h5ad --label-key cell_type --condition-key diagnosis \\
      --case disease --control healthy --empty drop --out run_out   # levels named; cells without vocab genes out
  scsuperweight run ... --out run_out          # after a crash: the same command resumes the unfinished run""",
    "embed": """examples:
  scsuperweight embed --model demo --data cells.h5ad --out cells_embedded.h5ad
  scsuperweight embed --model scGPT_brain/ --data cells.h5ad --gene-key feature_name --out embedded.h5ad
  scsuperweight embed --model demo --data panel.h5ad --empty keep --out e.h5ad   # NaN rows + obs mask
  scsuperweight embed --model scGPT_brain/ --data 'donors/*.h5ad' --layer UMIs --out atlas_store  # resumable
  torchrun --nproc-per-node 2 -m scsuperweight embed --model demo --data donors/ --out atlas_store""",
    "scan": """examples:
  scsuperweight scan --model demo --data cells.h5ad --label-key cell_type --out run_out
  scsuperweight scan --model scGPT_brain/ --data cells.h5ad --screen activation weight_only gradient --out run_out
  scsuperweight scan --model scGPT_brain/ --data cells.h5ad --max-seq-len 600 --max-tokens 16384 --out run_out
  scsuperweight scan --model scGPT_brain/ --data-free --out run_out     # one synthetic cell, no data
  scsuperweight scan --model demo --data cells.h5ad --null-k 50 --null-method gaussian --out run_out
  torchrun --nproc-per-node 2 -m scsuperweight scan --model demo --data 'donors/*.h5ad' --out run_out""",
    "prune": """examples:
  scsuperweight prune --model scGPT_brain/ --out run_out --label-key cell_type --dry-run   # the plan only
  scsuperweight prune --model scGPT_brain/ --out run_out --label-key cell_type --budget 15m
  scsuperweight prune --model scGPT_brain/ --out run_out --label-key cell_type --device cuda --dtype bf16 --yes
  scsuperweight prune --model demo --out run_out --label-key cell_type --condition-key condition --donor-key donor
  scsuperweight prune --model demo --out run_out --label-key cell_type --condition-key dx --case AD --control NCI
  (reads run_out/results.h5ad written by `scan`, or --data FILE.h5ad that holds uns['ssw'] from a scan)
  scsuperweight prune --model demo --out run_out --label-key cell_type --granularities scalar neuron \\
      --no-mean-ablation --n-matched 0          # zeroing and neurons only, no |w|-matched draws
  scsuperweight prune --model demo --data donors/ --out run_out --label-key cell_type --max-cells-per-donor 50
  torchrun --nproc-per-node 2 -m scsuperweight prune --model demo --out run_out --label-key cell_type
  (--data may also be a folder/glob of per-donor files: sampled from obs, the candidates from run_out; a
  killed prune resumes: finished conditions are kept in run_out/.conditions)""",
    "genes": """examples:
  scsuperweight genes --model demo --out run_out --label-key cell_type""",
    "enrich": """examples:
  scsuperweight enrich --out run_out --gene-sets bundled ../shared/genesets/h.all.v7.0.symbols.gmt""",
    "report": """examples:
  scsuperweight report --run run_out                  # writes run_out/report.html
  scsuperweight report --run run_out --out page.html""",
}


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the command's --help has the rest), exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see `{self.prog} --help`)\n")
        sys.exit(2)


def _common(p: argparse.ArgumentParser, *, model: bool = True, batch: bool = True) -> None:
    if model:
        p.add_argument("--model", default="demo", help="'demo', an official scGPT directory, or a transformers dir")
        p.add_argument("--device", default=None, help="torch device (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsampling, masks, draws (default 0)")
    if batch:
        p.add_argument("--batch-size", type=int, default=32, help="cells per forward pass (default 32)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _data_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--data", required=required,
                   help="raw counts: an .h5ad, a folder or a glob ('donors/*.h5ad') of per-donor .h5ad files "
                        "(sampled from obs, only sampled cells read; also a single .h5ad over 2 GiB) "
                        "(default for steps: OUT/results.h5ad)")
    p.add_argument("--layer", default=None, help="layer holding raw counts (default: X), e.g. counts or UMIs")
    p.add_argument("--gene-key", default=None, help="var column with gene symbols (default: var_names)")


def _gf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Geneformer / BERT-family models")
    g.add_argument("--token-dictionary", default=None, help="gene token dictionary (Ensembl ID -> token id)")
    g.add_argument("--gene-medians", default=None, help="gene median dictionary (Ensembl ID -> non-zero median)")
    g.add_argument("--symbol-key", default=None, help="var column of symbols when var_names are Ensembl IDs")


def _gf(args) -> dict:
    return {k: getattr(args, k) for k in ("token_dictionary", "gene_medians", "symbol_key")
            if getattr(args, k, None) is not None}


def _keys_args(p: argparse.ArgumentParser, label_required: bool) -> None:
    p.add_argument("--label-key", required=label_required, help="obs column with cell types")
    p.add_argument("--condition-key", default=None, help="obs column with the condition (AD vs control)")
    p.add_argument("--donor-key", default=None, help="obs column with donors (bootstrap unit)")
    p.add_argument("--case", default=None, help="condition level contrasted as the case (default: recognised "
                   "spellings of AD; other levels must be named)")
    p.add_argument("--control", default=None, help="condition level contrasted as the control (default: "
                   "recognised spellings of control)")


def _empty_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--empty", choices=("error", "drop", "keep"), default="error",
                   help="cells with no counts in any vocab gene: refuse them (error, default), leave them out "
                   "(drop), or keep them with NaN embeddings (keep); flagged in obs['ssw_no_vocab_counts']")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="scsuperweight", formatter_class=_formatter,
        description="Find, prune and interpret super-weight-like parameters in scGPT on single-cell data.",
        epilog="run `scsuperweight COMMAND --help` for each command's options and examples.")
    parser.add_argument("--version", action="version", version=f"scsuperweight {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="the whole pipeline on the shipped demo model and seeded AD-like data",
                       epilog=EXAMPLES["demo"], formatter_class=_formatter)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--retrain", action="store_true", help="pretrain the demo model afresh (recipe 'demo')")
    p.add_argument("--n-cells", type=int, default=1500, help="synthetic cells to generate (default 1500)")
    p.add_argument("--device", default=None, help="torch device (default: cpu)")
    _overwrite_arg(p)
    _common(p, model=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="the whole pipeline on your model and data", epilog=EXAMPLES["run"],
                       formatter_class=_formatter)
    _common(p)
    _data_args(p, required=True)
    _keys_args(p, label_required=True)
    p.add_argument("--gene-sets", nargs="+", default=["bundled"], help="'bundled' and/or .gmt files")
    p.add_argument("--out", required=True, help="output directory")
    _overwrite_arg(p)
    p.add_argument("--resume", action="store_true",
                   help="resume the unfinished run in --out (automatic when its data, model and parameters are "
                        "these; with --resume a run that cannot be resumed is an error)")
    p.add_argument("--quantize", action="store_true",
                   help="after the run, INT8/INT4 quantisation with and without the candidates held out, with "
                        "`scsuperweight quantize`'s defaults (quantize.tsv, quantize.png, a report section)")
    _pipeline_knobs(p)
    _empty_arg(p)
    _cost_args(p)
    _gf_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("embed", help="scGPT cell embeddings into obsm['X_scGPT']", epilog=EXAMPLES["embed"],
                       formatter_class=_formatter)
    _common(p)
    _data_args(p, required=True)
    p.add_argument("--out", required=True,
                   help="a store folder (resumable blocks, run.json, embeddings.h5ad at the end), or an output "
                        ".h5ad (its store is scratch space, removed when done); a killed run resumes")
    from ._cli_atlas import add_embed_args

    add_embed_args(p)
    _empty_arg(p)
    _gf_args(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("scan", help="find super-weight-like candidates (superweights.tsv, activations.tsv)",
                       epilog=EXAMPLES["scan"], formatter_class=_formatter)
    _common(p)
    _data_args(p)
    p.add_argument("--label-key", default=None, help="obs column with cell types (stratifies, per-type stability)")
    p.add_argument("--data-free", action="store_true", help="scan one synthetic cell instead of data")
    p.add_argument("--min-ratio", type=float, default=20.0, help="spike / typical magnitude threshold (default 20)")
    p.add_argument("--min-abs", type=float, default=0.0, help="absolute spike threshold (default 0)")
    p.add_argument("--max-rounds", type=int, default=10, help="iterative rounds (default 10)")
    p.add_argument("--max-cells", type=int, default=1000, help="cells scanned (default 1000)")
    p.add_argument("--null-k", type=int, default=20,
                   help="detection-null copies: perm_p, perm_q per candidate (default 20: p down to 1/21; 0: none)")
    p.add_argument("--null-method", default="both", choices=["gaussian", "permute", "both"],
                   help="gaussian (no outlier: calls a lone super weight), permute (shuffled: tests the arrangement) "
                        "or both (default both; permute into *_permute columns)")
    p.add_argument("--screen", nargs="+", default=["activation", "weight_only"],
                   choices=["activation", "weight_only", "gradient"],
                   help="screens, in the table's order (default: activation weight_only); gradient: the scalars "
                        "one backward pass predicts to move the primary metric most (first-order null)")
    _fidelity_args(p)
    p.add_argument("--out", required=True, help="output directory")
    _overwrite_arg(p)
    _empty_arg(p)
    _gf_args(p)
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("prune", help="prune candidates against controls (collapse.tsv)", epilog=EXAMPLES["prune"],
                       formatter_class=_formatter)
    _common(p)
    _data_args(p)
    _keys_args(p, label_required=True)
    p.add_argument("--out", required=True, help="output directory (holds results.h5ad from scan)")
    _pipeline_knobs(p)
    _empty_arg(p)
    _cost_args(p)
    _gf_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("genes", help="genes riding on each candidate's channel (genes.tsv)", epilog=EXAMPLES["genes"],
                       formatter_class=_formatter)
    _common(p)
    _data_args(p)
    p.add_argument("--label-key", default=None, help="obs column with cell types (per-type evidence)")
    p.add_argument("--max-cells-per-label", type=int, default=200)
    p.add_argument("--out", required=True, help="output directory (holds results.h5ad from scan)")
    _empty_arg(p)
    _gf_args(p)
    p.set_defaults(func=cmd_genes)

    p = sub.add_parser("enrich", help="pathway enrichment of the gene scores (enrichment.tsv), offline",
                       epilog=EXAMPLES["enrich"], formatter_class=_formatter)
    p.add_argument("--data", default=None, help="results .h5ad holding gene scores (default OUT/results.h5ad)")
    p.add_argument("--gene-sets", nargs="+", default=["bundled"], help="'bundled' and/or local .gmt files")
    p.add_argument("--permutations", type=int, default=1000)
    p.add_argument("--top-n", type=int, default=50, help="top genes for over-representation (default 50)")
    p.add_argument("--out", required=True, help="output directory")
    _common(p, model=False, batch=False)
    p.set_defaults(func=cmd_enrich)

    p = sub.add_parser("report", help="write the self-contained HTML report of a run directory",
                       epilog=EXAMPLES["report"], formatter_class=_formatter)
    p.add_argument("--run", required=True, help="run directory (with the .tsv files and run.json)")
    p.add_argument("--out", default=None, help="HTML path (default RUN/report.html)")
    p.set_defaults(func=cmd_report)

    from ._cli_science import add_science_parsers

    add_science_parsers(sub, sys.modules[__name__])
    from ._cli_pretrain import add_pretrain_parser

    add_pretrain_parser(sub)
    from ._cli_data import add_data_parser

    add_data_parser(sub)
    return parser


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its tables, results.h5ad, report.html, run.json)")


def _seq_len_arg(text: str) -> int | str:
    """--max-seq-len: a number of tokens, or 'full' (the model's own length)."""
    if text.strip().lower() == "full":
        return "full"
    try:
        return int(text)
    except ValueError:
        msg = f"{text!r} is not a number of tokens; pass e.g. 512, 1200 or 'full' (the model's length)"
        raise argparse.ArgumentTypeError(msg) from None


def _fidelity_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-seq-len", type=_seq_len_arg, default=None,
                   help="tokens per cell at most, a seeded random subset of the genes as scGPT samples them "
                        "(default 512 for scGPT: fidelity, not validity; 'full' or e.g. 1200: the model's length)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="build batches to at most this many padded tokens (cells x longest) instead of "
                        "--batch-size cells")


def _cost_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cost: plan, budget, sequential nulls, precision")
    g.add_argument("--dry-run", action="store_true", help="print the plan (conditions, FLOPs, estimated time) "
                                                          "and stop")
    g.add_argument("--budget", default=None, metavar="DURATION",
                   help="fit the run to a time (15m, 2h, 1h30m): cells per label, tokens per cell, random draws, "
                        "bootstrap resamples and scan cells are chosen, validity floors first")
    g.add_argument("--yes", action="store_true", help="run a plan estimated above one hour as planned")
    g.add_argument("--fixed-draws", action="store_true",
                   help="every draw of every control pool (uniform, neuron, channel, matched, joint; default: "
                        "sequential nulls that stop a pool once its decisions are settled, Besag & Clifford 1991)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="forward precision (autocast; metrics stay float32): bf16 on a recent GPU (default fp32)")
    _fidelity_args(g)


def _plan_gate(args):
    """The CLI's answer to a plan: print it; stop with exit 2 above one hour without --budget or --yes, and over a
    budget that even the smallest run exceeds without --yes."""
    from .plan import format_plan, is_long, long_run_message

    def on_plan(plan) -> None:
        _say(format_plan(plan))
        if is_long(plan) and not (args.budget or args.yes or args.dry_run):
            raise OptionError(long_run_message(plan))
        if plan.over_budget and not (args.yes or args.dry_run):
            raise OptionError(plan.over_budget)

    return on_plan


def _cost_kwargs(args) -> dict:
    return dict(sequential=not args.fixed_draws, budget=args.budget, yes=args.yes, dry_run=args.dry_run,
                dtype=args.dtype, max_tokens=args.max_tokens, on_plan=_plan_gate(args))


def _pipeline_knobs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-cells-per-label", type=int, default=200, help="cells per label evaluated (default 200)")
    p.add_argument("--n-random", type=int, default=40,
                   help="random-scalar draws per parameter (default 40: the smallest empirical p is 1/41)")
    p.add_argument("--max-candidates", type=int, default=6, help="candidates pruned (default 6)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples (default 200)")
    p.add_argument("--granularities", nargs="+", choices=("scalar", "neuron", "channel"),
                   default=["scalar", "neuron", "channel"],
                   help="what to ablate besides the scalar: its FFN neuron, its residual channel in the block, each "
                        "against random ones of the same block (default: all three)")
    p.add_argument("--no-mean-ablation", action="store_true",
                   help="skip mean:<cand> / mean_activation:<cand> (the contribution or spike set to its mean)")
    p.add_argument("--no-joint", action="store_true",
                   help="skip the joint ablation of the candidates that pass (a second phase after the verdicts)")
    p.add_argument("--n-unit-random", type=int, default=20,
                   help="random neurons / channels per block, the null of neuron: and channel: (default 20)")
    p.add_argument("--n-matched", type=int, default=20,
                   help="random scalars from each candidate's |w| quantile bin, for p_matched (default 20; 0: none)")
    p.add_argument("--n-joint", type=int, default=20, help="random scalar sets, the null of joint (default 20)")
    p.add_argument("--characterise", choices=("passing", "all"), default="passing",
                   help="which candidates get restore:, scale: and |w|-matched conditions: 'passing' (default) only "
                        "those whose zeroing passes the controls, in a second phase (prune's parameters name the "
                        "others under not_characterised, with the reason); 'all' every candidate, at the cost of "
                        "those conditions and their matched draws for candidates that do not matter")

    p.add_argument("--max-cells-per-donor", type=int, default=None,
                   help="cap per (label, donor) of the evaluated sample (default none)")
    p.add_argument("--max-cells-per-condition", type=int, default=None,
                   help="cap per (label, condition) of the evaluated sample (default none)")


def _ablation_opts(args) -> dict:
    """tl.prune's ablation options from the flags of `_pipeline_knobs`."""
    return dict(granularities=tuple(args.granularities), mean_ablation=not args.no_mean_ablation,
                joint=not args.no_joint, n_unit_random=args.n_unit_random, n_matched=args.n_matched,
                n_joint=args.n_joint, characterise=args.characterise)


# ------------------------------------------------------------------------------------------------------------
def _data_path(path: str | None, out: Path | None = None) -> Path:
    """--data, else OUT/results.h5ad from an earlier step; checked to be a readable .h5ad (a folder or a glob of
    per-donor files is checked when it is opened)."""
    from ._cli_atlas import streamed

    if path is None and out is not None and (out / R.RESULTS.file).is_file():
        path = str(out / R.RESULTS.file)
    if path is None:
        msg = f"no data: pass --data FILE.h5ad (or run `scan` into {out} first)."
        raise DataError(msg)
    return Path(path) if streamed(path) else C.check_data_file(path)


def _read_obs(path: Path):
    """The cells' annotations without the matrix, for the checks: of the file, or of every per-donor file."""
    from ._cli_atlas import streamed

    if streamed(path):
        import anndata as ad

        from .data.sources import open_source

        return ad.AnnData(obs=open_source(path).obs)
    return C.read_obs(path)


def _unfinished(out) -> bool:
    """Does `out` hold an unfinished run (which the same command resumes; `results.prepare_run_dir` decides)?"""
    prev = R.read_run_json(out) if Path(out).is_dir() else None
    return bool(prev and prev.get("status") not in (None, "done"))


def _load_data(path: str | None, out: Path | None = None, sample: dict | None = None):
    """(AnnData, path): the full AnnData after `_data_path`'s checks; a folder, a glob or a large .h5ad is read as
    the sample `sample` describes (keyword arguments of `scsuperweight.atlas.sample`), drawn from obs alone."""
    import anndata as ad

    from ._cli_atlas import streamed

    p = _data_path(path, out)
    if streamed(p):
        from . import atlas

        if sample is None:
            raise SSWError(f"{p} is a folder, a glob or a large file: this command reads whole files only.")
        return atlas.sample(str(p), **sample)[0], p
    try:
        return ad.read_h5ad(p), p
    except Exception as exc:  # corrupt file, wrong format
        msg = f"could not read {p} as AnnData: {type(exc).__name__}: {exc}"
        raise DataError(msg.splitlines()[0]) from None


def _needs_scan(path: Path) -> None:
    """Refuse data without a scan's candidates (uns['ssw']['superweights']) before anything loads."""
    import h5py

    with h5py.File(path, "r") as f:
        found = f"uns/{K.UNS_KEY}/{R.spec('superweights').uns_key}" in f
    if not found:
        msg = (f"{path} holds no candidates under uns[{K.UNS_KEY!r}]: run ssw.tl.scan first (`scsuperweight scan "
               "--out DIR`, then pass the same --out, or --data DIR/results.h5ad).")
        raise DataError(msg)


def _check_common(args, **options) -> str:
    """Numeric options, the device and the model path: returns the device to use."""
    C.check_options(**options)
    device = C.check_device(getattr(args, "device", None))
    if getattr(args, "model", None) is not None:
        C.check_model_path(args.model)
    return device


def _prune_sample(args, model) -> dict:
    """The stratified sample `prune` and `run` evaluate, for data read from disk (caps from the arguments; each
    file's genes matched to `model`'s vocab first)."""
    return dict(label_key=args.label_key, donor_key=args.donor_key, condition_key=args.condition_key,
                max_per_label=args.max_cells_per_label, max_per_donor=args.max_cells_per_donor,
                max_per_condition=args.max_cells_per_condition, seed=args.seed, layer=args.layer, model=model,
                gene_key=args.gene_key)


def _load_model(args):
    from .checks import check_device
    from .loading import load_model

    return load_model(args.model, device=check_device(args.device))  # --device cuda on CPU torch: one line


def _step_log(step: str, out: Path, adata, model=None):
    """The run that step `step` adds to: run.json in `out` (a new run for `scan`), after checking that `adata`
    (its stored run record, its data) and `model` belong to it; MixedRunError names both sides otherwise."""
    from .pipeline import data_hash, model_hash

    now = {} if adata is None else {"data_hash": data_hash(adata)}
    if model is not None:
        now["model_hash"] = model_hash(model)
    if step == "scan":
        return R.RunLog(out, {"status": "partial", **now})
    R.check_same_run([R.RunStamp.of(R.read_run_json(out), str(out / R.RUN.file)),
                      R.RunStamp.of(R.run_record(adata), "the results in the data"),
                      R.RunStamp.of(now, f"the {'data and model' if model is not None else 'data'} given now")],
                     step)
    rec = R.run_record(adata)
    return R.RunLog.resume(out, {"status": "partial", **{k: rec[k] for k in ("run_id", "data_hash", "model_hash")
                                                          if rec.get(k)}, **now})


def _write(adata, out: Path, step: str, log, t0: float) -> None:
    """The step's tables (stamped with the run id), the run record on `adata`, results.h5ad, run.json (with the
    step's per-file gene overlap, when it recorded one)."""
    from . import get

    R.write_run_dir(adata, out, steps=(step,), run_id=log.run_id)
    overlap = get.params(adata, step).get("gene_overlap")
    log.step(step, time.perf_counter() - t0, **({"gene_overlap": overlap} if overlap else {}))
    R.set_run_record(adata, log.info)
    atomic_write_h5ad(adata, out / R.RESULTS.file)


def cmd_demo(args) -> int:
    from .datasets import synthetic_ad
    from .pipeline import run_pipeline

    out = C.check_run_dir(args.out, overwrite=args.overwrite)
    _check_common(args, batch_size=args.batch_size, seed=args.seed)
    if args.n_cells < C.MIN_CELLS_RUN:
        msg = f"--n-cells {args.n_cells}: at least {C.MIN_CELLS_RUN} cells are needed; pass --n-cells 1500."
        raise DataError(msg)
    t0 = time.perf_counter()
    if args.retrain:
        from .train import pretrain, recipe_adata

        model = pretrain(recipe_adata("demo"), recipe="demo", out_dir=out / "demo_model", device=args.device,
                         progress=not args.no_progress, label_key="cell_type")
        model_path = str(out / "demo_model")
    else:
        from .loading import load_model

        model = load_model("demo", device=args.device)
        model_path = "demo"
    _say(f"generating {args.n_cells} AD-like cells (seed {args.seed})")
    adata = synthetic_ad(n_cells=args.n_cells, seed=args.seed)
    info = run_pipeline(adata, model, out, label_key="cell_type", condition_key="condition", donor_key="donor",
                        gene_sets=["bundled"], seed=args.seed, batch_size=args.batch_size, max_cells_scan=600,
                        max_cells_per_label=60, max_candidates=3, progress=not args.no_progress, model_path=model_path,
                        data_path=f"synthetic_ad(n_cells={args.n_cells}, seed={args.seed})", overwrite=args.overwrite)
    _summary(adata, out, time.perf_counter() - t0, info)
    return 0


def cmd_run(args) -> int:
    from .pipeline import run_pipeline

    # every check first: output, options, device, model path, then the data's obs (read without its matrix)
    out = C.check_run_dir(args.out, overwrite=args.overwrite or args.resume or _unfinished(args.out))
    knobs = dict(max_cells_per_label=args.max_cells_per_label, n_random=args.n_random,
                 max_candidates=args.max_candidates, n_boot=args.n_boot, batch_size=args.batch_size, seed=args.seed)
    _check_common(args, **knobs)
    path = _data_path(args.data)
    checked = C.validate_run_inputs(_read_obs(path), label_key=args.label_key, condition_key=args.condition_key,
                                    donor_key=args.donor_key, case=args.case, control=args.control,
                                    gene_sets=args.gene_sets, device=args.device, **knobs)
    model = _load_model(args)
    adata, path = _load_data(str(path), sample=_prune_sample(args, model))
    t0 = time.perf_counter()
    info = run_pipeline(adata, model, out, label_key=args.label_key, condition_key=args.condition_key,
                        donor_key=args.donor_key, case=checked.case, control=checked.control,
                        gene_sets=args.gene_sets, seed=args.seed,
                        batch_size=args.batch_size, max_cells_per_label=args.max_cells_per_label,
                        n_random=args.n_random, max_candidates=args.max_candidates, n_boot=args.n_boot,
                        gene_key=args.gene_key, layer=args.layer, prune_options=_ablation_opts(args), empty=args.empty,
                        max_seq_len=args.max_seq_len,
                        progress=not args.no_progress, data_path=str(path), model_path=str(args.model),
                        overwrite=args.overwrite, resume=args.resume, max_cells_per_donor=args.max_cells_per_donor,
                        max_cells_per_condition=args.max_cells_per_condition, **_cost_kwargs(args), **_gf(args))
    if args.dry_run:
        _say(f"dry run: nothing computed; the plan is in {out / R.RUN.file}")
        return 0
    if args.quantize and _is_main():
        from ._cli_science import quantize_after_run

        quantize_after_run(sys.modules[__name__], args, adata, model, out)
    if _is_main():
        _summary(adata, out, time.perf_counter() - t0, info)
    return 0


def cmd_embed(args) -> int:
    from . import get, tl
    from ._cli_atlas import streamed

    if not args.out.endswith(".h5ad") or streamed(args.data) or _world() > 1:
        # a store folder, an atlas on disk or several ranks: block by block into a resumable store
        from ._cli_atlas import cmd_embed as embed_to_store

        return embed_to_store(args, _say)

    out = C.check_out_file(args.out, suffixes=(".h5ad",))
    _check_common(args, batch_size=args.batch_size, seed=args.seed)
    _data_path(args.data)
    model = _load_model(args)
    adata, _ = _load_data(args.data)
    tl.embed(adata, model, gene_key=args.gene_key, layer=args.layer, batch_size=args.batch_size,
             seed=args.seed, progress=not args.no_progress, empty=args.empty, **_gf(args))
    atomic_write_h5ad(adata, out)
    n_empty = get.params(adata, "embed").get("n_empty", 0)
    _say(f"wrote obsm['{K.OBSM_EMB}'] ({adata.obsm[K.OBSM_EMB].shape[1]} dims) for {adata.n_obs} cells to {out}"
         + (f"; {n_empty} cells without counts in any vocab gene have NaN rows (obs['{K.OBS_EMPTY}'])"
            if n_empty else ""))
    return 0


def cmd_scan(args) -> int:
    from . import get, tl

    out = C.check_run_dir(args.out, overwrite=args.overwrite)
    _check_common(args, max_cells=args.max_cells, min_ratio=args.min_ratio, min_abs=args.min_abs,
                  max_rounds=args.max_rounds, batch_size=args.batch_size, seed=args.seed)
    if not args.data_free:
        obs = _read_obs(_data_path(args.data, out))
        if args.label_key is not None:
            C.check_obs_key(obs, args.label_key, option="--label-key")
    model = _load_model(args)
    if args.data_free:
        import anndata as ad
        import numpy as np

        adata = ad.AnnData(np.zeros((1, 1), dtype=np.float32))
        adata.var_names = [next(iter(model.vocab))] if hasattr(model, "vocab") else ["g0"]
    else:
        adata, _ = _load_data(args.data, out, sample=dict(label_key=args.label_key, max_cells=args.max_cells,
                                                          seed=args.seed, layer=args.layer, max_per_label="share",
                                                          model=model, gene_key=args.gene_key))
    _rank0(R.prepare_run_dir, out, overwrite=args.overwrite)
    t0 = time.perf_counter()
    log = _rank0(_step_log, "scan", out, None if args.data_free else adata, model)
    tl.scan(adata, model, mode="data_free" if args.data_free else "data", label_key=args.label_key,
            gene_key=args.gene_key, layer=args.layer, max_cells=args.max_cells, batch_size=args.batch_size,
            min_ratio=args.min_ratio, min_abs=args.min_abs, max_rounds=args.max_rounds, null_k=args.null_k,
            null_method=args.null_method, seed=args.seed, progress=not args.no_progress, empty=args.empty,
            screen=args.screen, max_seq_len=args.max_seq_len, max_tokens=args.max_tokens, **_gf(args))
    if not _is_main():
        return 0
    if args.data_free:  # no cells to keep: the tables and run.json (with the scan's params) only
        R.write_run_dir(adata, out, steps=("scan",), run_id=log.run_id)
        log.step("scan", time.perf_counter() - t0, scan=get.params(adata, "scan"))
    else:
        _write(adata, out, "scan", log, t0)
    sw = get.superweights(adata)
    act = sw[sw["screen"].astype(str).str.startswith("activation") & sw["above_threshold"].astype(bool)]
    _say(f"{len(act)} candidates above threshold; {get.params(adata, 'scan')['stop_reason']}")
    for r in act.head(5).itertuples():
        col = "" if r.col is None or str(r.col) in ("<NA>", "nan", "") else f", col {r.col}"
        _say(f"  {r.candidate}: {r.kind} layer {r.layer} row {r.row}{col}, spike {r.spike:.3g} "
             f"({r.spike_ratio:.1f}x typical) on {r.token}")
    _say(f"wrote {out / R.spec('superweights').file} and {out / R.spec('activations').file}")
    return 0


def cmd_prune(args) -> int:
    from . import get, tl
    from ._cli_atlas import streamed
    from .condstore import ConditionStore, persisting

    out = C.check_out_dir(args.out)
    knobs = dict(max_cells_per_label=args.max_cells_per_label, n_random=args.n_random,
                 max_candidates=args.max_candidates, n_boot=args.n_boot, batch_size=args.batch_size, seed=args.seed)
    _check_common(args, **knobs)
    path = _data_path(args.data, out)
    checked = C.validate_run_inputs(_read_obs(path), label_key=args.label_key, condition_key=args.condition_key,
                                    donor_key=args.donor_key, case=args.case, control=args.control, **knobs)
    _needs_scan(out / R.RESULTS.file if streamed(path) else path)
    model = _load_model(args)
    adata, _ = _load_data(str(path), sample=_prune_sample(args, model))
    if K.UNS_KEY not in adata.uns and (out / R.RESULTS.file).is_file():  # a sample read from disk: the scan's
        import anndata as ad  # candidates and run record come from OUT

        adata.uns[K.UNS_KEY] = ad.read_h5ad(out / R.RESULTS.file, backed="r").uns.get(K.UNS_KEY, {})
    t0 = time.perf_counter()
    log = _step_log("prune", out, adata, model)
    main = _is_main()
    # finished conditions are kept in OUT/.conditions under a hash of everything they depend on: a killed prune
    # rerun with the same run, data, model and arguments computes only the others
    inputs = R.inputs_hash(log.info.get("run_id"), log.info.get("data_hash"), log.info.get("model_hash"),
                           {k: v for k, v in vars(args).items() if k not in _NOT_INPUTS})
    store = ConditionStore(out, inputs) if main and not args.dry_run else None
    with persisting(store, writer=log.progress if main else None):
        tl.prune(adata, model, label_key=args.label_key, condition_key=args.condition_key,
                 donor_key=args.donor_key, case=checked.case, control=checked.control, empty=args.empty,
                 gene_key=args.gene_key, layer=args.layer,
                 max_cells_per_label=args.max_cells_per_label, n_random=args.n_random, n_boot=args.n_boot,
                 max_candidates=args.max_candidates, batch_size=args.batch_size, seed=args.seed,
                 max_seq_len=args.max_seq_len, progress=not args.no_progress, **_cost_kwargs(args),
                 **_ablation_opts(args), max_cells_per_donor=args.max_cells_per_donor,
                 max_cells_per_condition=args.max_cells_per_condition, **_gf(args))
    if not main:
        return 0
    done = get.params(adata, "prune")
    log.info.update({k: done[k] for k in ("plan", "budget") if done.get(k) is not None})
    if args.dry_run:  # run.json gets the plan; no table, no results.h5ad
        log.info["dry_run_of"] = "prune"
        log.write()
        _say(f"dry run: nothing computed; the plan is in {out / R.RUN.file}")
        return 0
    _write(adata, out, "prune", log, t0)
    store.clear()  # written: the kept conditions are no longer needed
    _say(f"wrote {out / R.spec('collapse').file}")
    return 0


# arguments that do not change a step's results (excluded from the hash that keys resumable work)
_NOT_INPUTS = ("func", "no_progress", "verbose", "debug", "out", "overwrite", "resume", "device", "command")


def cmd_genes(args) -> int:
    from . import tl

    out = C.check_out_dir(args.out)
    _check_common(args, max_cells_per_label=args.max_cells_per_label, batch_size=args.batch_size, seed=args.seed)
    path = _data_path(args.data, out)
    if args.label_key is not None:
        C.check_obs_key(C.read_obs(path), args.label_key, option="--label-key")
    _needs_scan(path)
    model = _load_model(args)
    adata, _ = _load_data(str(path))
    t0 = time.perf_counter()
    log = _step_log("genes", out, adata, model)
    tl.genes(adata, model, label_key=args.label_key, gene_key=args.gene_key, layer=args.layer,
             max_cells_per_label=args.max_cells_per_label, batch_size=args.batch_size, seed=args.seed,
             progress=not args.no_progress, empty=args.empty, **_gf(args))
    _write(adata, out, "genes", log, t0)
    _say(f"wrote {out / R.spec('genes').file}")
    return 0


def cmd_enrich(args) -> int:
    from . import tl

    out = C.check_out_dir(args.out)
    _check_common(args, permutations=args.permutations, top_n=args.top_n, seed=args.seed)
    C.check_gene_sets(args.gene_sets)
    adata, _ = _load_data(args.data, out)
    t0 = time.perf_counter()
    log = _step_log("enrich", out, adata)
    tl.enrich(adata, gene_sets=args.gene_sets, permutations=args.permutations, top_n=args.top_n, seed=args.seed)
    _write(adata, out, "enrich", log, t0)
    _say(f"wrote {out / R.spec('enrichment').file}")
    return 0


def cmd_report(args) -> int:
    from .report import report

    run = Path(args.run)
    if not run.is_dir():
        msg = f"run directory not found: {run}; pass the --out directory of a run."
        raise DataError(msg)
    out = C.check_out_file(args.out if args.out else run / R.REPORT.file, suffixes=(".html", ".htm"))
    path = report(run, out)
    _say(f"wrote {path}")
    return 0


def _say(msg: str) -> None:
    if not _is_main():  # under torchrun only rank 0 speaks
        return
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


# under torchrun (several processes) every rank runs the command and the work is split; rank 0 alone writes
_DIST_COMMANDS = ("embed", "scan", "prune", "run")


def _world() -> int:
    from .dist import context

    return context().world


def _is_main() -> bool:
    from .dist import context

    return context().is_main


def _rank0(fn, *args, **kwargs):
    """`fn` on rank 0 (its result; None elsewhere); a failure there ends every rank with its error."""
    from .dist import context, on_rank0

    return on_rank0(context(), fn, *args, **kwargs)


def _summary(adata, out: Path, seconds: float, info: dict) -> None:
    from . import get

    sw = get.superweights(adata)
    act = sw[sw["screen"].astype(str).str.startswith("activation")]
    above = act[act["above_threshold"].astype(bool)]
    _say("")
    _say(f"done in {seconds / 60:.1f} min. {len(above)} candidate(s) above threshold "
         f"({get.params(adata, 'scan')['stop_reason']}).")
    ver = get.verdicts(adata)
    zero = ver[ver["ablation"].astype(str).isin(["prune", ""])] if "ablation" in ver.columns else ver
    other = ver.drop(index=zero.index)
    ver = zero
    if len(ver):
        _say(f"{int(ver['passes'].sum())} of {len(ver)} pruned candidate(s) pass the controls on "
             f"{ver['metric'].iloc[0]} (p < {ver['alpha'].iloc[0]:g} vs random scalars of the same parameter, "
             "beyond the largest-other-weights control, interval excluding 0):")
    for r in ver.head(5).itertuples():
        _say(f"  {K.cond_prune(r.candidate)}: {r.status} (delta {r.delta:+.3g}, {1 - r.alpha:.0%} CI "
             f"{r.ci_low:+.3g} to {r.ci_high:+.3g}, p={r.p_value:.3g})" + ("" if r.passes else f": {r.reason}"))
    if len(other):
        _say("beside zeroing (the same rule, each against its own null; the report's 'Zero vs mean' section):")
    for r in other.head(12).itertuples():
        _say(f"  {r.condition}: {r.status} (delta {r.delta:+.3g}, p={r.p_value:.3g} vs {r.null_pool})")
    _say(f"report: {out / R.REPORT.file}")
    tables = [R.spec(n).file for n in ("superweights", "collapse", "verdicts", "genes", "enrichment")]
    _say(f"tables: {', '.join(tables)} in {out}")


def _one_line(exc: BaseException) -> str:
    """The first line of an error's message; an OS error as what failed on which path and what to check."""
    if isinstance(exc, OSError) and not isinstance(exc, SSWError) and exc.strerror:
        where = f" {exc.filename!s}" if exc.filename else ""
        return f"{exc.strerror}:{where}; check that the path exists, is the kind expected and can be written."
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version (0) or a usage error already printed in one line (2)
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_help()
        return 2
    if args.verbose:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    from .dist import RankError, context, finish

    try:
        ctx = context()
        if not ctx.is_main:  # torchrun: the other ranks share the work of these commands, and show nothing
            if args.command not in _DIST_COMMANDS:
                return 0
            args.no_progress = True
        with warnings.catch_warnings():
            # a metric adapted to a small group says so in the table's note column, not on the console
            warnings.simplefilter("ignore", SmallDataWarning)
            return int(args.func(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; files already written are kept.\n")
        return 130
    except (SSWError, ValueError, OSError, RankError) as exc:  # the user's input or environment: one line, exit 2
        if args.debug:
            raise
        sys.stderr.write(f"error: {_one_line(exc)}\n")
        return 2
    except Exception as exc:  # a bug: say so, and how to see it
        if args.debug:
            raise
        sys.stderr.write(f"error: internal error ({type(exc).__name__}: {_one_line(exc)}); this is a bug in "
                         "scsuperweight, not in your input: rerun with --debug for the traceback and report it.\n")
        return 1
    finally:
        finish()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

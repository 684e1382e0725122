"""The `scsuperweight quantize` and `scsuperweight census` subcommands: analyses run on their own, beside a run.

`quantize` measures round-to-nearest INT8/INT4 with and without the scan's candidates held out (quantize.tsv,
quantize.png and the report's quantisation section). `census` compares the spikes of several checkpoints, or of a
training run's snapshots in step order (census.tsv, census.png, census.html), data-free or (``--data``) over the
same real cells for every model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import results as R
from ._log import logger

EXAMPLES = {
    "quantize": """examples:
  scsuperweight quantize --model demo --data cells.h5ad --label-key cell_type --out q_out
  scsuperweight quantize --model scGPT_brain/ --data cells.h5ad --out run_out --bits 4 --granularity block \\
      --block-sizes 64 1024 4096 --clip none    # holds out run_out/superweights.tsv's candidates
  (candidates come from --candidates FILE, else OUT/superweights.tsv, else a scan of the data run first)""",
    "census": """examples:
  scsuperweight census --models /tmp/demo_train --out census_out     # a pretrain --save-every run, in step order
  scsuperweight census --models scGPT_human/ scGPT_brain/ scGPT_CP/ --null-k 20 --out census_out
  scsuperweight census --models /tmp/dar_train --data cells.h5ad --label-key cell_type --max-cells 100 \\
      --out census_cells    # every snapshot traced over the same real cells, not the synthetic one""",
}


def _formatter(prog):
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=34)


def add_science_parsers(sub, cli) -> None:
    """Add `quantize` and `census` to the CLI's subparsers. `cli` is the cli module, passed in (not imported: it
    sits above this one) for its shared option and loading helpers, so that these commands read like the rest."""
    from .quantize import CLIPS, GRANULARITIES

    common, data_args, overwrite_arg = cli._common, cli._data_args, cli._overwrite_arg

    p = sub.add_parser("quantize", help="INT8/INT4 round-to-nearest with and without the candidates held out "
                       "(quantize.tsv)", epilog=EXAMPLES["quantize"], formatter_class=_formatter)
    common(p)
    data_args(p, required=True)
    p.add_argument("--label-key", default=None, help="obs column with cell types (stratifies; kNN accuracy)")
    p.add_argument("--candidates", default=None, metavar="TSV",
                   help="superweights.tsv whose candidates are held out (default OUT/superweights.tsv, else a scan)")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4], help="bit widths (default 8 4)")
    p.add_argument("--granularity", nargs="+", default=list(GRANULARITIES), choices=GRANULARITIES,
                   help="scales per tensor, per row, or per block of the flattened tensor (default all)")
    p.add_argument("--block-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096],
                   help="block sizes for --granularity block (default 64 256 1024 4096)")
    p.add_argument("--clip", nargs="+", default=["none", "mse"], choices=CLIPS, metavar="CLIP",
                   help="scale clipping: none, percentile (99.9th of |w|), mse (best fraction of the max); "
                        "default: none mse")
    p.add_argument("--max-candidates", type=int, default=6, help="candidate scalars held out (default 6)")
    p.add_argument("--max-cells", type=int, default=500, help="cells measured per setting (default 500)")
    p.add_argument("--out", required=True, help="output directory (a run directory keeps its run id)")
    overwrite_arg(p)
    p.set_defaults(func=cmd_quantize, cli=cli)

    p = sub.add_parser("census", help="spikes across checkpoints or training snapshots (census.tsv, census.html)",
                       epilog=EXAMPLES["census"], formatter_class=_formatter)
    p.add_argument("--models", nargs="+", required=True, metavar="DIR",
                   help="checkpoint directories, or one training run with steps/step_NNNNNN snapshots")
    p.add_argument("--names", nargs="+", default=None, help="one label per model (default the directory names)")
    p.add_argument("--top", type=int, default=5, help="spikes kept per model (default 5)")
    p.add_argument("--min-ratio", type=float, default=20.0, help="spike / typical magnitude threshold (default 20)")
    p.add_argument("--null-k", type=int, default=0,
                   help="detection-null copies per model for each spike's perm_p (default 0: none; 20 gives 1/21)")
    p.add_argument("--null-method", default="gaussian", choices=["gaussian", "permute"],
                   help="null copies: gaussian (no outlier; calls a lone super weight) or permute (default gaussian)")
    p.add_argument("--n-tokens", type=int, default=256, help="tokens of the data-free synthetic cell (default 256)")
    data_args(p)
    p.add_argument("--label-key", default=None, help="with --data: obs column of cell types; the cells traced are "
                   "spread evenly over them")
    p.add_argument("--max-cells", type=int, default=200,
                   help="with --data: cells traced per model, the same seeded cells for each (default 200)")
    p.add_argument("--batch-size", type=int, default=32, help="with --data: cells per forward pass (default 32)")
    p.add_argument("--no-candidates", action="store_true", help="skip the per-model candidate search")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic cell and the null (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--out", required=True, help="output directory")
    overwrite_arg(p)
    p.set_defaults(func=cmd_census, cli=cli)


def _run_log(out: Path, step: str, info: dict, overwrite: bool) -> R.RunLog:
    """The run in `out` when there is one (quantize beside a scan keeps its run id; a step already there is
    replaced only with --overwrite, and nothing else of the run is touched), else a fresh run directory."""
    from .errors import RunDirError

    prev = R.read_run_json(out) if out.is_dir() else None
    if prev is None:
        R.prepare_run_dir(out, overwrite=overwrite)
        return R.RunLog(out, info)
    if step in (prev.get("steps_done") or []) and not overwrite:
        msg = (f"{out} already holds a {step} result (run {str(prev.get(R.RUN_ID, '?'))[:12]}); pass --overwrite to "
               "replace it, or choose another output directory.")
        raise RunDirError(msg)
    return R.RunLog.resume(out, info)


def cmd_quantize(args) -> int:
    from . import tl

    out = Path(args.out)
    adata, _ = args.cli._load_data(args.data)
    model = args.cli._load_model(args)
    log = _run_log(out, "quantize", {"params": {"quantize_data": args.data}, "seed": args.seed}, args.overwrite)
    cand = None
    t0 = time.perf_counter()
    if args.candidates:
        cand, _ = R.read_table(args.candidates, "superweights")
    elif (out / R.spec("superweights").file).is_file():
        cand, _ = R.read_table(out / R.spec("superweights").file, "superweights")
    else:
        logger.info("quantize: no candidates given; scanning %s first (no detection null)", args.data)
        tl.scan(adata, model, label_key=args.label_key, layer=args.layer, gene_key=args.gene_key,
                batch_size=args.batch_size, null_k=0, seed=args.seed, progress=not args.no_progress)
        R.write_run_dir(adata, out, steps=("scan",), run_id=log.run_id)
        log.step("scan", time.perf_counter() - t0, scan=R.step_params(adata)["scan"])
        t0 = time.perf_counter()
    _quantize_step(args.cli, out, adata, model, log, t0, candidates=cand, label_key=args.label_key,
                   bits=args.bits, granularities=args.granularity, block_sizes=args.block_sizes, clips=args.clip,
                   max_candidates=args.max_candidates, max_cells=args.max_cells, layer=args.layer,
                   gene_key=args.gene_key, batch_size=args.batch_size, seed=args.seed,
                   progress=not args.no_progress)
    return 0


def _quantize_step(cli, out: Path, adata, model, log: R.RunLog, t0: float, **options) -> None:
    """`tl.quantize` with `options`, then quantize.tsv, quantize.png, run.json and the report rewritten."""
    from . import pl, tl
    from .report import report

    tl.quantize(adata, model, **options)
    R.write_run_dir(adata, out, steps=("quantize",), run_id=log.run_id)
    pl.quantize(adata, save=out / "quantize.png")
    log.step("quantize", time.perf_counter() - t0, quantize=R.step_params(adata)["quantize"])
    if log.info.get("status") == "running":
        log.info["status"] = "partial"
        log.write()
    report(out, out / R.REPORT.file)
    cli._say(f"wrote {out / R.spec('quantize').file}, {out / 'quantize.png'} and {out / R.REPORT.file}")


def quantize_after_run(cli, args, adata, model, out: Path) -> None:
    """`run --quantize`: the quantisation sweep with `scsuperweight quantize`'s defaults on the run's own cells,
    holding out the run's candidates (uns superweights), into the same run directory."""
    t0 = time.perf_counter()
    log = R.RunLog.resume(out, {})
    _quantize_step(cli, out, adata, model, log, t0, label_key=args.label_key, layer=args.layer,
                   gene_key=args.gene_key, batch_size=args.batch_size, seed=args.seed,
                   progress=not args.no_progress)


def cmd_census(args) -> int:
    from . import pl
    from .census import cell_batches, census
    from .report import census_page

    out = Path(args.out)
    if args.data is None and (args.label_key is not None or args.layer is not None or args.gene_key is not None):
        from .errors import OptionError

        msg = "--label-key, --layer and --gene-key choose cells of --data; pass --data cells.h5ad with them."
        raise OptionError(msg)
    batches = None
    if args.data is not None:
        adata, _ = args.cli._load_data(args.data)
        batches = cell_batches(adata, label_key=args.label_key, max_cells=args.max_cells, layer=args.layer,
                               gene_key=args.gene_key, batch_size=args.batch_size, seed=args.seed)
    log = _run_log(out, "census", {"params": {"census_models": list(args.models), "census_data": args.data},
                                   "seed": args.seed}, args.overwrite)
    t0 = time.perf_counter()
    models = args.models[0] if len(args.models) == 1 else list(args.models)
    res = census(models, batches, names=args.names, top=args.top, min_ratio=args.min_ratio,
                 candidates=not args.no_candidates, null_k=args.null_k, null_method=args.null_method,
                 n_tokens=args.n_tokens, seed=args.seed, progress=not args.no_progress)
    R.write_table(out, "census", res.spikes, run_id=log.run_id)
    pl.census(res.spikes, min_ratio=args.min_ratio, save=out / "census.png")
    census_page(res, out / "census.html", min_ratio=args.min_ratio)
    log.step("census", time.perf_counter() - t0, census=res.params)
    log.info["status"] = "done"
    log.write()
    args.cli._say(f"wrote {out / R.spec('census').file}, {out / 'census.png'} and {out / 'census.html'}")
    return 0

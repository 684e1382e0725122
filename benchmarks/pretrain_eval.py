"""Held-out figures of a pretrained scGPT: did it learn?

Rebuilds the data and the held-out split the checkpoint was trained with (its recipe is stored in args.json), then
prints, per token view, the masked GEP / GEPC MSE against the per-gene mean-bin baseline (and a single mean bin for
every gene, "constant"), the 5-fold CV kNN accuracy
of the L2-normalised <cls> embeddings of the held-out cells, their mean pairwise cosine, and, for reference, the
kNN accuracy of PCA on log1p-normalised counts of the same cells. Also the FFN-output max/median ratio per layer.

    python benchmarks/pretrain_eval.py                      # the shipped demo model, on its synthetic split
    python benchmarks/pretrain_eval.py --darmanis           # ... and on Darmanis 2015 (466 brain cells)
    python benchmarks/pretrain_eval.py --model DIR --darmanis --skip-synthetic   # a model trained on Darmanis

A model pretrained on Darmanis itself (same recipe):
    scsuperweight pretrain --data ../shared/data/darmanis2015_GSE67835.h5ad --recipe demo --label-key cell_type \\
        --out /tmp/darmanis_model
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DARMANIS = ROOT.parent / "shared" / "data" / "darmanis2015_GSE67835.h5ad"


def pca_knn(adata, cells, labels, recipe, seed) -> float:
    """kNN accuracy of PCA (50 comps) on log1p-normalised counts of the same held-out cells: a reference."""
    import scanpy as sc

    from scsuperweight.train import knn_cv_accuracy

    sub = adata[cells].copy()
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub)
    n_comps = int(min(50, sub.n_obs - 1, sub.n_vars - 1))
    sc.pp.pca(sub, n_comps=n_comps, random_state=seed)
    ev = recipe["eval"]
    return knn_cv_accuracy(sub.obsm["X_pca"], labels, ev["knn_k"], ev["knn_folds"], seed)


def evaluate_on(model, adata, recipe, label_key, seed, name, small_k=5):
    from scsuperweight.train import evaluate, knn_cv_accuracy, prepare_data, view_cells

    t0 = time.time()
    data = prepare_data(adata, recipe, label_key=label_key, seed=seed, vocab=model.vocab)
    res = evaluate(model, data, recipe, seed=seed)
    n_match = sum(g in model.vocab for g in map(str, adata.var_names))
    k = recipe["eval"]["knn_k"]
    print(f"\n== {name}: {len(data.test_idx)} held-out cells, {n_match} of {adata.n_vars} genes in the vocab "
          f"({time.time() - t0:.0f}s)")
    print(f"{'view':10s} {'GEP':>8s} {'GEPC':>8s} {'baseline':>9s} {'constant':>9s} {'GEP/base':>9s} "
          f"{'GEPC/base':>10s} {f'kNN k={k}':>9s} {f'kNN k={small_k}':>9s} {'cosine':>7s} {'tokens':>7s}")
    for view, r in res["views"].items():
        if data.labels is not None:
            # the same embeddings as evaluate() (same seeded view), scored with a smaller k for small held-out sets
            sub = view_cells(data, recipe, view, data.test_idx, np.random.default_rng([int(seed), 5]))
            emb = _embed(model, sub, recipe["eval"]["batch_size"])
            r[f"knn_accuracy_k{small_k}"] = knn_cv_accuracy(emb, data.labels[data.test_idx], small_k,
                                                             recipe["eval"]["knn_folds"], seed)
        print(f"{view:10s} {r['gep_mse']:8.2f} {r['gepc_mse']:8.2f} {r['baseline_mse']:9.2f} {r['constant_mse']:9.2f} "
              f"{r['gep_vs_baseline']:9.3f} {r['gepc_vs_baseline']:10.3f} {r.get('knn_accuracy', float('nan')):9.3f} "
              f"{r.get(f'knn_accuracy_k{small_k}', float('nan')):9.3f} {r['mean_cosine']:7.3f} {r['mean_tokens']:7.0f}")
    if data.labels is not None:
        labels = data.labels[data.test_idx]
        ref = pca_knn(adata, data.test_idx, labels, recipe, seed)
        small = {**recipe, "eval": {**recipe["eval"], "knn_k": small_k}}
        ref_small = pca_knn(adata, data.test_idx, labels, small, seed)
        print(f"reference: PCA of log1p-normalised counts on the same cells ({label_key}): kNN {ref:.3f} (k={k}), "
              f"{ref_small:.3f} (k={small_k})")
        res["pca_knn_accuracy"] = ref
        res[f"pca_knn_accuracy_k{small_k}"] = ref_small
    print("FFN output (linear2) per layer: max|a| / median|a|  [channel, token]   <cls> max / median")
    for f in res["ffn_output"]:
        tok = f["token"] if f["token"] == "<cls>" else f"gene {f['gene']}"
        print(f"  layer {f['layer']}: {f['max_abs']:7.2f} / {f['median_abs']:.3f} = {f['ratio']:6.1f}x "
              f"[ch {f['channel']}, {tok}]   <cls> {f['cls_ratio']:6.1f}x [ch {f['cls_channel']}]")
    return res


@torch.no_grad()
def _embed(model, sub, batch_size):
    from scsuperweight.data.batches import collate

    model.eval()
    out = np.zeros((sub.n_cells, model.config.d_model), dtype=np.float32)
    for s in range(0, sub.n_cells, batch_size):
        b = collate(sub, np.arange(s, min(s + batch_size, sub.n_cells)))
        out[s:s + len(b.cells)] = model(b.src, b.values, b.padding_mask, MVC=False)["cell_emb"].numpy()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help="'demo' or an official scGPT checkpoint directory")
    p.add_argument("--darmanis", action="store_true", help="also evaluate on Darmanis 2015 (cell_type)")
    p.add_argument("--darmanis-path", default=str(DARMANIS))
    p.add_argument("--skip-synthetic", action="store_true", help="do not evaluate on the recipe's synthetic data")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest on a busy machine)")
    p.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import scsuperweight as ssw
    from scsuperweight.train import load_recipe, recipe_adata

    model = ssw.load_model(args.model)
    if "recipe" not in model.args:
        print(f"{args.model}: args.json has no 'recipe'; this benchmark needs a model made by `pretrain`.",
              file=sys.stderr)
        return 2
    recipe = load_recipe(model.args["recipe"])
    seed = int(recipe["seed"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {args.model}: {model.config.nlayers} layers x d={model.config.d_model}, {n_params:,} parameters, "
          f"trained {model.args.get('trained_steps', '?')} steps, recipe {recipe['name']!r}")
    out = {}
    if not args.skip_synthetic:
        adata = recipe_adata(recipe)
        out["synthetic"] = evaluate_on(model, adata, recipe, recipe["data"]["label_key"], seed,
                                       f"synthetic_ad({recipe['data']['args']}) split of the training run")
    if args.darmanis:
        import anndata as ad

        adata = ad.read_h5ad(args.darmanis_path)
        out["darmanis"] = evaluate_on(model, adata, recipe, "cell_type", seed, f"Darmanis 2015 ({args.darmanis_path})")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

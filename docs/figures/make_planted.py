"""Write the planted official-format stand-in of the README (a positive control, never a result).

    python docs/figures/make_planted.py CELLS.h5ad OUT_DIR

The tiny stand-in (4 blocks, d=64, random weights, the cells' genes as its vocab) with one super weight planted at
``L2.linear2.w[9,21]``, calibrated on the first 64 cells so that it writes only on ``<cls>``; saved in the official
scGPT format (args.json, vocab.json, best_model.pt), its plant recorded in args.json.
"""

import sys

import anndata as ad

from scsuperweight.models import save_scgpt
from scsuperweight.runners import get_runner
from scsuperweight.standin import plant_superweight, standin_model

adata = ad.read_h5ad(sys.argv[1])
model = standin_model("tiny", seed=0, genes=list(adata.var_names))
plain = get_runner(model).prepare(adata[:64], seed=0, batch_size=16).plain
planted = plant_superweight(model, layer=2, row=9, col=21, batches=plain)
model.args["standin_plant"] = planted.to_dict()
save_scgpt(model, sys.argv[2])
sys.stdout.write(f"{planted}\n")

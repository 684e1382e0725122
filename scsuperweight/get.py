"""Stored results back as tidy DataFrames (scanpy's `get` convention), typed by the schema in `results`.

Each table of `scsuperweight.results.TABLES` has a function of its name here (``get.superweights(adata)``,
``get.collapse``, ``get.contrasts``, ``get.conditions``, ``get.genes``, ``get.enrichment``, ``get.verdicts``).
"""

from __future__ import annotations

import pandas as pd

from . import _keys as K
from . import results as R
from .errors import DataError

__all__ = [*R.TABLES, "run", "params"]


def _getter(spec: R.TableSpec):
    def get_table(adata, key: str = K.UNS_KEY) -> pd.DataFrame:
        return R.table(adata, spec.name, key)

    get_table.__name__ = get_table.__qualname__ = spec.name
    get_table.__doc__ = f"{spec.doc} (the `{spec.file}` table, written by ssw.tl.{spec.step}.)"
    return get_table


# one function per table of the schema: get.superweights, get.collapse, get.verdicts, ...
for _spec in R.TABLES.values():
    globals()[_spec.name] = _getter(_spec)
del _spec


def run(adata, key: str = K.UNS_KEY) -> R.RunResults:
    """Every table, the run record and the parameters at once (see `scsuperweight.results.load_run`)."""
    return R.load_run(adata, key=key)


def params(adata, step: str | None = None, key: str = K.UNS_KEY) -> dict:
    """The recorded parameters of one step (or of all steps) as dicts."""
    parsed = R.step_params(adata, key)
    if step is None:
        return parsed
    if step not in parsed:
        msg = f"no parameters recorded for step {step!r}; recorded steps: {sorted(parsed)}."
        raise DataError(msg)
    return parsed[step]

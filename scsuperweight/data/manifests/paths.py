"""Where the manifests and their schema live: ``$SSW_MANIFESTS`` or the repository's ``data_manifests/``."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from scsuperweight.errors import DataError

ENV_VAR = "SSW_MANIFESTS"
# the repository's data_manifests/, next to the package (repo/scsuperweight/data/manifests/paths.py)
_REPO_MANIFESTS = Path(__file__).resolve().parents[3] / "data_manifests"
_SCHEMA_FILE = "schema.json"


def manifest_dir() -> Path:
    """The folder holding the manifests.

    ``$SSW_MANIFESTS`` when set, else the repository's ``data_manifests/`` next to the package.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            msg = (
                f"{ENV_VAR}={env!r} is not a folder; point it at a folder of <name>.json manifests "
                f"or unset it to use the bundled ones"
            )
            raise DataError(msg)
        return path
    if _REPO_MANIFESTS.is_dir():
        return _REPO_MANIFESTS
    msg = (
        f"no manifest folder found: {_REPO_MANIFESTS} does not exist (the package seems to be installed "
        f"without the repository's data_manifests/); set {ENV_VAR}=/path/to/data_manifests"
    )
    raise DataError(msg)


def _schema_path() -> Path:
    # the repository's schema wins, so a user folder cannot loosen the rules by shipping its own
    for folder in (_REPO_MANIFESTS, manifest_dir()):
        path = folder / _SCHEMA_FILE
        if path.is_file():
            return path
    msg = f"no {_SCHEMA_FILE} found in {_REPO_MANIFESTS} or {manifest_dir()}; restore data_manifests/{_SCHEMA_FILE}"
    raise DataError(msg)


@functools.lru_cache(maxsize=4)
def _load_schema(path: str) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def _manifest_names(folder: Path) -> list[str]:
    return sorted(p.stem for p in folder.glob("*.json") if p.name != _SCHEMA_FILE)

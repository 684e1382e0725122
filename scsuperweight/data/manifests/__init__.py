"""Dataset manifests: what each Alzheimer's dataset is, where it lives, and how its columns read.

One JSON file per dataset sits in ``data_manifests/`` (checked against ``data_manifests/schema.json``
by a small validator here, so no jsonschema dependency). On top of the manifests this module

- lists them (:func:`list_manifests`) and loads one by name (:func:`load_manifest`);
- downloads the open files (:func:`fetch`): streamed, resumable with an HTTP Range request,
  checked against a sha256 when the manifest knows it, renamed into place atomically, never
  written outside the destination folder; controlled-access data is never downloaded, the
  manifest's access instructions are raised instead;
- reads a local copy and copies the manifest's source columns onto the standard obs names
  ``cell_type``, ``condition`` (mapped to ``AD`` / ``control``), ``donor``, ``braak``, ``sex``,
  ``age``, checking that raw counts are where the manifest says (:func:`validate`,
  :func:`harmonize`).
"""

from .download import ControlledAccessError, fetch, fetch_all
from .harmonise import CONDITION_LABELS, STANDARD_COLUMNS, harmonize, read_source, validate
from .paths import ENV_VAR, manifest_dir
from .registry import list_manifests, load_manifest
from .schema import validate_manifest

__all__ = [
    "CONDITION_LABELS",
    "ENV_VAR",
    "STANDARD_COLUMNS",
    "ControlledAccessError",
    "fetch",
    "fetch_all",
    "harmonize",
    "list_manifests",
    "load_manifest",
    "manifest_dir",
    "read_source",
    "validate",
    "validate_manifest",
]

"""Download the open files of a dataset: streamed, resumable, checked, renamed into place atomically.

Controlled-access data is never downloaded; the manifest's access instructions are raised instead.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from scsuperweight._log import logger
from scsuperweight.errors import DataError

from .registry import _as_manifest, _find_entry, _match_entry
from .schema import _unsafe_name

_CHUNK = 1 << 20  # 1 MiB per read while streaming


class ControlledAccessError(DataError):
    """The dataset needs an account and a data-use agreement, so :func:`fetch` does not download it.

    ``instructions`` holds the manifest's ``access_instructions``.
    """

    def __init__(self, message: str, instructions: str):
        super().__init__(message)
        self.instructions = instructions


def _safe_target(dest_dir: str | os.PathLike, filename: str) -> Path:
    dest = Path(dest_dir).expanduser().resolve()
    why = _unsafe_name(filename)
    target = dest / filename if why is None else None
    if target is not None and target.resolve().parent != dest:
        why = "it resolves outside the destination (a link?)"
    if why is not None:
        msg = f"refusing to write {filename!r}: {why}; files are only written as bare names inside {dest}"
        raise DataError(msg)
    return target


def _url_filename(url: str) -> str:
    # the last segment is taken before unquoting, so '..%2Fx' stays one (refused) name instead of 'x'
    path = urllib.parse.urlsplit(url).path
    segment = path.rsplit("/", 1)[-1]
    if not segment:
        msg = f"cannot tell a file name from {url!r} (it names a folder); pass the file's own URL"
        raise DataError(msg)
    return urllib.parse.unquote(segment)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def _no_url_message(manifest: dict, entry: dict | None) -> str:
    where = manifest.get("homepage") or manifest["accession"]
    what = f"file {entry['name']!r} of {manifest['name']}" if entry else manifest["name"]
    extra = f" (files sit under {entry['remote_pattern']})" if entry and entry.get("remote_pattern") else ""
    return (
        f"no download URL is recorded for {what}{extra}; find the file at {where}, then run "
        f"`scsuperweight data fetch {manifest['name']} --url URL`"
    )


def fetch(
    name: str | os.PathLike | Mapping,
    dest_dir: str | os.PathLike = ".",
    *,
    file: str | None = None,
    url: str | None = None,
    progress: bool = True,
    timeout: float = 30,
    overwrite: bool = False,
) -> Path:
    """Download one file of an open dataset into ``dest_dir``.

    The file streams to ``<target>.part``; an existing ``.part`` is resumed with an HTTP Range request
    (and restarted when the server answers 200, i.e. ignores Range). When the manifest records a
    sha256 the result must match it, else the download is deleted. The finished file is renamed into
    place atomically, so ``<target>`` is either absent or complete.

    Parameters
    ----------
    name
        Manifest name, path to a manifest ``.json``, or a manifest dict.
    dest_dir
        Folder to write into (created if needed). Nothing is written outside it.
    file
        Which file entry (its ``name``); needed when the manifest lists several downloadable files.
    url
        Download from this URL instead (for entries whose URL the manifest does not know, e.g. one
        SEA-AD donor file). The local name is ``file``'s name, or the URL's last path segment.
    progress
        Show a tqdm progress bar.
    timeout
        Seconds to wait for the server to answer or send data.
    overwrite
        Download again even if the target exists.

    Returns
    -------
    Path of the downloaded file.

    Raises
    ------
    ControlledAccessError
        For a controlled-access dataset, with its access instructions; no network is touched.
    DataError
        Unknown file, no URL known, unsafe file name, server unreachable, HTTP error, interrupted
        transfer (the ``.part`` is kept: run again to resume) or checksum mismatch.

    Examples
    --------
    >>> fetch("grubman2019", "data/", file="GSE138852_covariates.csv.gz")  # doctest: +SKIP
    PosixPath('data/GSE138852_covariates.csv.gz')
    """
    manifest = _as_manifest(name)
    if manifest["access"] == "controlled":
        instructions = _one_line(manifest["access_instructions"])
        msg = (
            f"{manifest['name']} is controlled-access ({manifest['accession']}); `scsuperweight data fetch` "
            f"does not download it. {instructions}"
        )
        raise ControlledAccessError(msg, manifest["access_instructions"])
    entry = _find_entry(manifest, file) if file is not None else None
    if url is not None:
        if urllib.parse.urlsplit(url).scheme not in ("http", "https", "ftp"):
            msg = f"unsupported URL {url!r}: use an http://, https:// or ftp:// address"
            raise DataError(msg)
        filename = entry["name"] if entry is not None and not entry.get("pattern") else _url_filename(url)
        if entry is None:
            entry = _match_entry(manifest, filename, renamed=False)
    else:
        if entry is None:
            downloadable = [e for e in manifest["files"] if e.get("url")]
            if not downloadable:
                raise DataError(_no_url_message(manifest, None))
            if len(downloadable) > 1:
                names = ", ".join(e["name"] for e in downloadable)
                msg = (
                    f"{manifest['name']} has {len(downloadable)} downloadable files ({names}); choose one with "
                    f"file=... (CLI: --file NAME), or use fetch_all"
                )
                raise DataError(msg)
            entry = downloadable[0]
        if not entry.get("url"):
            raise DataError(_no_url_message(manifest, entry))
        url, filename = entry["url"], entry["name"]
    target = _safe_target(dest_dir, filename)
    known = entry if entry is not None and not entry.get("pattern") else {}
    return _download(
        url, target, sha256=known.get("sha256"), size=known.get("size"), dataset=manifest["name"],
        progress=progress, timeout=timeout, overwrite=overwrite,
    )


def fetch_all(name: str | os.PathLike | Mapping, dest_dir: str | os.PathLike = ".", **kwargs) -> list[Path]:
    """Download every file that has a URL in the manifest; keyword arguments go to :func:`fetch`."""
    manifest = _as_manifest(name)
    entries = [e for e in manifest["files"] if e.get("url")]
    if manifest["access"] == "controlled" or not entries:
        return [fetch(manifest, dest_dir, **kwargs)]  # raises the access or no-URL message
    return [fetch(manifest, dest_dir, file=e["name"], **kwargs) for e in entries]


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"^\s*bytes\s+(\d+)-", value or "")
    return int(match.group(1)) if match else None


def _download(
    url: str, target: Path, *, sha256: str | None, size: int | None, dataset: str,
    progress: bool, timeout: float, overwrite: bool, _retried: bool = False,
) -> Path:
    from tqdm.auto import tqdm

    host = urllib.parse.urlsplit(url).hostname or url
    by_hand = f"download it by hand to {target} and run `scsuperweight data validate {dataset} {target}`"
    if target.exists() and not overwrite:
        if sha256 is None:
            logger.info("%s exists and no checksum is known; not downloading again (overwrite=True to)", target)
            return target
        if _sha256_file(target) == sha256:
            logger.info("%s exists and matches its sha256", target)
            return target
        logger.warning("%s exists but its sha256 differs from the manifest; downloading again", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:
        part.unlink()
        offset = 0
    headers = {"User-Agent": "scsuperweight", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset and not _retried:
            # nothing left to send: the .part may already be whole, else start over once
            if sha256 is not None and _sha256_file(part) == sha256:
                os.replace(part, target)
                return target
            part.unlink()
            return _download(url, target, sha256=sha256, size=size, dataset=dataset, progress=progress,
                             timeout=timeout, overwrite=overwrite, _retried=True)
        msg = f"{host} answered HTTP {err.code} ({_one_line(err.reason)}) for {url}; check the URL, or {by_hand}"
        raise DataError(msg) from err
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", err)
        msg = f"could not reach {host}: {_one_line(reason)}; {by_hand}"
        raise DataError(msg) from err

    with response:
        status = getattr(response, "status", 200)
        if offset and status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                if _retried:
                    msg = f"{host} answered a resume request with the wrong byte range; {by_hand}"
                    raise DataError(msg)
                part.unlink()
                return _download(url, target, sha256=sha256, size=size, dataset=dataset, progress=progress,
                                 timeout=timeout, overwrite=overwrite, _retried=True)
            mode = "ab"
            logger.info("resuming %s at byte %d", target.name, offset)
        else:
            if offset:
                logger.info("%s ignored the Range request; downloading %s from the start", host, target.name)
            offset, mode = 0, "wb"
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else size
        digest = hashlib.sha256()
        if offset:
            with open(part, "rb") as fh:
                while chunk := fh.read(_CHUNK):
                    digest.update(chunk)
        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=target.name, disable=not progress)
        try:
            with open(part, mode) as fh:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        except (OSError, http.client.HTTPException) as err:
            msg = (
                f"download of {url} stopped after {received} bytes ({_one_line(err)}); run the same command "
                f"again to resume from {part}"
            )
            raise DataError(msg) from err
        finally:
            bar.close()

    if total is not None and received < total:
        msg = (
            f"download of {url} stopped after {received} of {total} bytes; run the same command again to resume "
            f"from {part}"
        )
        raise DataError(msg)
    got = digest.hexdigest()
    if (sha256 is not None and got != sha256) or (size is not None and received != size):
        part.unlink()
        expected = f"sha256 {sha256}" if sha256 is not None else f"{size} bytes"
        msg = (
            f"checksum mismatch for {target.name}: expected {expected}, got sha256 {got} ({received} bytes); "
            f"the download was deleted. The file at {host} may have changed: check it, then update the manifest"
        )
        raise DataError(msg)
    os.replace(part, target)
    logger.info("downloaded %s (%d bytes, sha256 %s)", target, received, got)
    return target

"""Checksummed download of the processed LA and ACDC files from their upstream repositories.

Every file is named in agcl/data/manifests/*.sha256 with its sha256; a file is written to
dest/<relpath> only after its hash matched, so a dataset folder never holds an unverified file
that this module wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pooch
import requests
from tqdm import tqdm

from agcl.data.specs import SPECS

DEFAULT_BASE_URL = "https://raw.githubusercontent.com"
LOGGER = logging.getLogger("agcl.download")

# The downloadable datasets: those whose DatasetSpec names manifests.
_MANIFESTS = {name: spec.manifests for name, spec in SPECS.items() if spec.manifests}
_LA_PREFIX = "yulequan/UA-MT/master/data"
_ACDC_LISTS_PREFIX = "HiLab-git/SSL4MIS/master/data/ACDC"
_ACDC_VOLUMES_PREFIX = "HiLab-git/WSL4MIS/main/data/ACDC"
_ACDC_LISTS = frozenset({"train.list", "val.list", "test.list", "train_slices.list"})
_HTTP_TIMEOUT_S = 60
_CHUNK_BYTES = 1 << 20


_POOCH_TEMPORARY = re.compile(r"tmp[a-z0-9_]{8}")


def _la_case_names(relpath: str) -> tuple[str, ...]:
    return (relpath.split("/")[1],)  # 2018LA_Seg_Training Set/<ID>/mri_norm2.h5


def _acdc_case_names(relpath: str) -> tuple[str, ...]:
    stem = Path(relpath).stem  # patient099_frame09
    return (stem, stem.split("_")[0])


@dataclass(frozen=True)
class _Upstream:
    """Where the files of one upstream format (DatasetSpec.source_format) lie, and how a case id
    selects them."""

    prefix: str  # folder of the files under the raw-file host
    case_names: Callable[[str], tuple[str, ...]]  # the case ids that select a file in a folder
    example: str  # what a case id looks like (named when an unknown one is asked for)
    list_prefix: str = ""  # where the top-level list files in list_files are instead of prefix
    list_files: frozenset[str] = frozenset()


_UPSTREAMS = {
    "ua_mt_la": _Upstream(_LA_PREFIX, _la_case_names, "an LA ID like 06SR5RBREL16DQ6M8LWS"),
    "ssl4mis_acdc": _Upstream(_ACDC_VOLUMES_PREFIX, _acdc_case_names,
                              "a patient id like patient099 or a volume like patient099_frame09",
                              list_prefix=_ACDC_LISTS_PREFIX, list_files=_ACDC_LISTS),
}


def _upstream(key: str) -> _Upstream:
    return _UPSTREAMS[SPECS[key].source_format]


class DownloadError(RuntimeError):
    """A file could not be fetched or verified. `failures` maps relpath -> reason."""

    def __init__(self, message: str, failures: dict[str, str] | None = None):
        super().__init__(message)
        self.failures = dict(failures or {})


def _dataset_key(dataset: str) -> str:
    key = dataset.lower()
    if key not in _MANIFESTS:
        raise DownloadError(f"unknown dataset {dataset!r}; expected one of {sorted(_MANIFESTS)}")
    return key


def _parse_manifest(text: str, name: str) -> dict[str, str]:
    """Parse sha256sum output ("<hash>  <relpath>" or "<hash> *<relpath>"); relpaths may hold spaces."""
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        digest, sep, relpath = line[:64], line[64:66], line[66:]
        if sep not in ("  ", " *") or not relpath or len(digest) != 64 or not all(
            c in "0123456789abcdef" for c in digest.lower()
        ):
            raise DownloadError(
                f"manifest {name} line {lineno}: expected '<64 hex sha256>  <relpath>', "
                f"got {line!r}"
            )
        if relpath in entries:
            raise DownloadError(f"manifest {name} line {lineno}: duplicate path {relpath!r}")
        entries[relpath] = digest.lower()
    return entries


def load_manifest(dataset: str) -> dict[str, str]:
    """relpath -> sha256 for every upstream file of `dataset` ("la" or "acdc")."""
    manifest_dir = resources.files("agcl.data").joinpath("manifests")
    entries: dict[str, str] = {}
    for name in _MANIFESTS[_dataset_key(dataset)]:
        entries.update(_parse_manifest(manifest_dir.joinpath(name).read_text("utf-8"), name))
    return entries


def _normalise_base(base_url: str) -> str:
    # A bare folder path is accepted as shorthand for its file:// URL.
    if "://" not in base_url:
        base_url = Path(base_url).resolve().as_uri()
    return base_url.rstrip("/")


def remote_url(dataset: str, relpath: str, base_url: str = DEFAULT_BASE_URL) -> str:
    """URL of `relpath` (a manifest path) under `base_url`, each path segment percent-encoded."""
    upstream = _upstream(_dataset_key(dataset))
    prefix = upstream.list_prefix if relpath in upstream.list_files else upstream.prefix
    quoted = "/".join(urllib.parse.quote(part, safe="") for part in relpath.split("/"))
    return f"{_normalise_base(base_url)}/{prefix}/{quoted}"


def _case_names(dataset_key: str, relpath: str) -> tuple[str, ...]:
    """The case ids that select `relpath` (empty for top-level list files)."""
    if "/" not in relpath:
        return ()
    return _upstream(dataset_key).case_names(relpath)


def select_files(dataset: str, cases: list[str] | None) -> dict[str, str]:
    """Manifest subset: all list files plus the files of `cases` (every file when None)."""
    key = _dataset_key(dataset)
    manifest = load_manifest(key)
    if cases is None:
        return manifest
    wanted = set(cases)
    seen: set[str] = set()
    selected = {}
    for relpath, digest in manifest.items():
        names = _case_names(key, relpath)
        if not names or wanted.intersection(names):
            selected[relpath] = digest
            seen.update(wanted.intersection(names))
    unknown = sorted(wanted - seen)
    if unknown:
        raise DownloadError(
            f"unknown {dataset} case(s) {', '.join(unknown)}: not in the {key} manifest "
            f"(expected {_upstream(key).example})"
        )
    return selected


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


class _PermanentHTTPError(OSError):
    """A 4xx answer: retrying will not help, and pooch only retries ValueError/RequestException."""


def _file_downloader(url: str, output_file: Any, pup: Any, check_only: bool = False) -> Any:
    """pooch downloader for file:// URLs (pooch's own downloaders speak http/ftp/doi only)."""
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise OSError(f"file URL with a remote host is not supported: {url}")
    source = Path(urllib.request.url2pathname(parts.path))
    if check_only:
        return source.is_file()
    if hasattr(output_file, "write"):
        with open(source, "rb") as handle:
            shutil.copyfileobj(handle, output_file, _CHUNK_BYTES)
    else:
        shutil.copyfile(source, output_file)
    return None


def _http_downloader() -> Callable[..., Any]:
    inner = pooch.HTTPDownloader(progressbar=False, chunk_size=_CHUNK_BYTES,
                                 timeout=_HTTP_TIMEOUT_S)

    def fetch_http(url: str, output_file: Any, pup: Any, check_only: bool = False) -> Any:
        try:
            return inner(url, output_file, pup, check_only=check_only)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status is not None and 400 <= status < 500 and status not in (408, 429):
                raise _PermanentHTTPError(f"HTTP {status}") from error
            raise

    return fetch_http


class _HashMismatch(ValueError):
    # A ValueError so that pooch's retry loop treats it like its own hash check.
    def __init__(self, expected: str, actual: str):
        super().__init__(f"sha256 mismatch: expected {expected}, got {actual}")
        self.expected = expected
        self.actual = actual


class _VerifyingDownloader:
    """Checks the hash of the temp file before pooch does: pooch deletes the temp file on a
    mismatch and only reports the actual hash inside its message text."""

    def __init__(self, inner: Callable[..., Any], expected: str):
        self.inner = inner
        self.expected = expected

    def __call__(self, url: str, output_file: Any, pup: Any, check_only: bool = False) -> Any:
        if check_only:
            return self.inner(url, output_file, pup, check_only=True)
        self.inner(url, output_file, pup)
        actual = _sha256(Path(output_file))
        if actual != self.expected:
            raise _HashMismatch(self.expected, actual)
        return None


def _describe_failure(error: BaseException) -> str:
    if isinstance(error, _HashMismatch):
        return str(error)
    if isinstance(error, FileNotFoundError):
        return "source file not found"
    if isinstance(error, _PermanentHTTPError):
        return f"{error} (not retried)"
    return f"{type(error).__name__}: {error}"


def _run_parallel(
    fetch_one: Callable[[str], bool], relpaths: list[str], workers: int, progress: bool,
    label: str,
) -> tuple[int, int, dict[str, str]]:
    """Run fetch_one over relpaths in threads; count fetched/present and collect every failure."""
    fetched = present = 0
    failures: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, tqdm(
        total=len(relpaths), unit="file", desc=label, disable=not progress
    ) as bar:
        futures = {pool.submit(fetch_one, relpath): relpath for relpath in relpaths}
        for future in as_completed(futures):
            try:
                if future.result():
                    fetched += 1
                else:
                    present += 1
            except Exception as error:  # noqa: BLE001 - every failure is reported together
                failures[futures[future]] = _describe_failure(error)
            bar.update(1)
    return fetched, present, failures


def download(
    dataset: str,
    dest: str | os.PathLike,
    base_url: str = DEFAULT_BASE_URL,
    cases: list[str] | None = None,
    workers: int = 4,
    retries: int = 3,
    progress: bool = True,
) -> list[Path]:
    """Fetch the selected manifest files of `dataset` into dest/<relpath>, verifying each sha256.

    Files already present with the right hash are kept as they are. All failures are collected
    and raised together as one DownloadError after the other files finished.
    """
    key = _dataset_key(dataset)
    selected = select_files(key, cases)
    dest = Path(dest).resolve()
    base = _normalise_base(base_url)
    scheme = urllib.parse.urlsplit(base).scheme.lower()
    if scheme == "file":
        inner = _file_downloader
    elif scheme in ("http", "https"):
        inner = _http_downloader()
    else:
        raise DownloadError(f"unsupported base URL {base_url!r}: expected http(s):// or file://")

    urls = {relpath: remote_url(key, relpath, base) for relpath in selected}
    pup = pooch.create(path=dest, base_url=base, registry=dict(selected), urls=urls,
                       retry_if_failed=retries)

    # Parent folders are made up front: pooch creates them per file, which races across threads.
    created_dirs = []
    for folder in sorted({(dest / relpath).parent for relpath in selected}):
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            created_dirs.append(path)

    # A killed download leaves pooch's temporary (tempfile's "tmp" + 8 characters) beside the
    # file it was writing; the next run removes those, and only those, in the folders it fills.
    for folder in sorted({(dest / relpath).parent for relpath in selected}):
        for stale in folder.glob("tmp????????"):
            if stale.is_file() and _POOCH_TEMPORARY.fullmatch(stale.name):
                stale.unlink()
                LOGGER.info("removed %s, left by an interrupted download", stale)

    def fetch_one(relpath: str) -> bool:
        local = dest / relpath
        if local.is_file() and _sha256(local) == selected[relpath]:
            return False
        pup.fetch(relpath, downloader=_VerifyingDownloader(inner, selected[relpath]))
        return True

    # pooch prints one INFO line per file to stderr; the progress bar replaces those lines.
    pooch_logger = pooch.get_logger()
    pooch_level = pooch_logger.level
    if progress:
        pooch_logger.setLevel(logging.WARNING)
    try:
        fetched, present, failures = _run_parallel(fetch_one, list(selected), workers,
                                                   progress, f"{key} download")
    finally:
        pooch_logger.setLevel(pooch_level)

    LOGGER.info("%s: %d fetched, %d already present, %d failed (in %s)",
                key, fetched, present, len(failures), dest)
    if failures:
        for path in reversed(created_dirs):  # drop folders that only failed files needed
            try:
                path.rmdir()
            except OSError:
                pass
        lines = []
        for relpath in sorted(failures):
            kept = " (a previous local copy with another hash was kept)" if (
                dest / relpath).exists() else ""
            lines.append(f"  {relpath} from {urls[relpath]}: {failures[relpath]}{kept}")
        raise DownloadError(
            f"{len(failures)} of {len(selected)} {key} file(s) failed to download into {dest}:\n"
            + "\n".join(lines),
            failures,
        )
    return [dest / relpath for relpath in selected]

"""Checksummed downloads against the byte-exact mirror of the upstream files (file:// and http)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import logging
import shutil
import threading
from pathlib import Path

import pytest

from agcl.data import download as dl

LA_FOLDER = "2018LA_Seg_Training Set"
MIRROR_LA = Path("yulequan/UA-MT/master/data")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def all_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def mirrored_la_cases(la_mirror_dir: Path) -> list[str]:
    return sorted(p.name for p in (la_mirror_dir / LA_FOLDER).iterdir() if p.is_dir())


def la_h5(case: str) -> str:
    return f"{LA_FOLDER}/{case}/mri_norm2.h5"


def copy_la_subset(la_mirror_dir: Path, root: Path, cases: list[str]) -> Path:
    """A mirror-shaped copy (<root>/yulequan/UA-MT/master/data/...) of the lists and `cases`."""
    data = root / MIRROR_LA
    (data / LA_FOLDER).mkdir(parents=True)
    for name in ("train.list", "test.list"):
        shutil.copyfile(la_mirror_dir / name, data / name)
    for case in cases:
        (data / LA_FOLDER / case).mkdir()
        shutil.copyfile(la_mirror_dir / la_h5(case), data / la_h5(case))
    return data


def test_load_manifest_counts_and_space_in_path():
    la = dl.load_manifest("la")
    acdc = dl.load_manifest("ACDC")
    assert len(la) == 102 and len(acdc) == 204
    assert la["train.list"] == "e88c3f0bae70edcca4bc16eca890673eee2bf3f7b74418249cb01b8cde2f924e"
    assert la[la_h5("06SR5RBREL16DQ6M8LWS")].startswith("ae44895d7b90")
    assert "ACDC_training_volumes/patient001_frame12.h5" in acdc


def test_parse_manifest_rejects_malformed_line():
    good = "a" * 64 + "  x y.h5\n"
    assert dl._parse_manifest(good, "m") == {"x y.h5": "a" * 64}
    with pytest.raises(dl.DownloadError, match=r"manifest m line 2: expected"):
        dl._parse_manifest(good + "abc x.h5\n", "m")


def test_remote_url_percent_encodes_segments():
    relpath = la_h5("06SR5RBREL16DQ6M8LWS")
    assert dl.remote_url("la", relpath, dl.DEFAULT_BASE_URL) == (
        "https://raw.githubusercontent.com/yulequan/UA-MT/master/data/"
        "2018LA_Seg_Training%20Set/06SR5RBREL16DQ6M8LWS/mri_norm2.h5"
    )
    assert dl.remote_url("acdc", "train_slices.list", "http://h:8/x/") == (
        "http://h:8/x/HiLab-git/SSL4MIS/master/data/ACDC/train_slices.list"
    )
    assert dl.remote_url("acdc", "ACDC_training_volumes/patient099_frame09.h5", "file:///m") == (
        "file:///m/HiLab-git/WSL4MIS/main/data/ACDC/ACDC_training_volumes/patient099_frame09.h5"
    )
    assert dl.remote_url("la", "a#b/c?d%e.h5", "https://x") == (
        "https://x/yulequan/UA-MT/master/data/a%23b/c%3Fd%25e.h5"
    )


def test_select_files_by_patient_and_by_volume():
    by_patient = dl.select_files("acdc", ["patient099"])
    assert sorted(by_patient) == [
        "ACDC_training_volumes/patient099_frame01.h5",
        "ACDC_training_volumes/patient099_frame09.h5",
        "test.list", "train.list", "train_slices.list", "val.list",
    ]
    by_volume = dl.select_files("acdc", ["patient099_frame09"])
    assert "ACDC_training_volumes/patient099_frame01.h5" not in by_volume
    assert len(by_volume) == 5
    assert len(dl.select_files("la", None)) == 102


def test_unknown_case_and_dataset_error():
    with pytest.raises(dl.DownloadError, match=r"unknown la case\(s\) NOPE.*la manifest"):
        dl.select_files("la", ["06SR5RBREL16DQ6M8LWS", "NOPE"])
    with pytest.raises(dl.DownloadError, match=r"unknown acdc case\(s\) patient999"):
        dl.select_files("acdc", ["patient999"])
    with pytest.raises(dl.DownloadError, match="unknown dataset 'crag'"):
        dl.select_files("crag", None)


def test_la_from_mirror_then_nothing_refetched(shared_mirror, la_mirror_dir, tmp_path, caplog):
    cases = mirrored_la_cases(la_mirror_dir)[:2]
    dest = tmp_path / "LA"
    base = "file://" + str(shared_mirror)
    with caplog.at_level(logging.INFO, logger="agcl.download"):
        paths = dl.download("la", dest, base_url=base, cases=cases, progress=False)
    expected = {"train.list", "test.list", la_h5(cases[0]), la_h5(cases[1])}
    assert all_files(dest) == expected
    assert {p.relative_to(dest).as_posix() for p in paths} == expected
    manifest = dl.load_manifest("la")
    for relpath in expected:
        assert sha256(dest / relpath) == manifest[relpath]
    assert "la: 4 fetched, 0 already present, 0 failed" in caplog.text

    mtimes = {rel: (dest / rel).stat().st_mtime_ns for rel in expected}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agcl.download"):
        again = dl.download("la", dest, base_url=base, cases=cases, progress=False)
    assert sorted(again) == sorted(paths)
    assert "la: 0 fetched, 4 already present, 0 failed" in caplog.text
    assert {rel: (dest / rel).stat().st_mtime_ns for rel in expected} == mtimes


def test_hash_mismatch_names_file_and_leaves_nothing(la_mirror_dir, tmp_path):
    case = mirrored_la_cases(la_mirror_dir)[0]
    data = copy_la_subset(la_mirror_dir, tmp_path / "src", [case])
    corrupt = data / la_h5(case)
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    actual = hashlib.sha256(raw).hexdigest()
    expected = dl.load_manifest("la")[la_h5(case)]

    dest = tmp_path / "LA"
    with pytest.raises(dl.DownloadError) as caught:
        dl.download("la", dest, base_url="file://" + str(tmp_path / "src"), cases=[case],
                    retries=0, progress=False)
    message = str(caught.value)
    assert message.startswith("1 of 3 la file(s) failed")
    assert la_h5(case) in message
    assert "2018LA_Seg_Training%20Set/" + case in message  # the URL
    assert f"expected {expected}, got {actual}" in message
    assert list(caught.value.failures) == [la_h5(case)]
    # the lists still arrived; no h5, no pooch temp file, no empty case folder
    assert {p.relative_to(dest).as_posix() for p in dest.rglob("*")} == {"train.list",
                                                                         "test.list"}


def test_missing_remote_file_is_named(shared_mirror, la_mirror_dir, tmp_path):
    mirrored = set(mirrored_la_cases(la_mirror_dir))
    absent = next(rel.split("/")[1] for rel in dl.load_manifest("la")
                  if "/" in rel and rel.split("/")[1] not in mirrored)
    present = min(mirrored)
    dest = tmp_path / "LA"
    with pytest.raises(dl.DownloadError) as caught:
        dl.download("la", dest, base_url="file://" + str(shared_mirror),
                    cases=[present, absent], progress=False)
    message = str(caught.value)
    assert message.startswith("1 of 4 la file(s) failed")
    assert f"{la_h5(absent)} from file://" in message and "source file not found" in message
    assert (dest / la_h5(present)).is_file()
    assert not (dest / LA_FOLDER / absent).exists()


def test_acdc_patient_gives_two_volumes_and_four_lists(shared_mirror, tmp_path):
    dest = tmp_path / "ACDC"
    dl.download("acdc", dest, base_url="file://" + str(shared_mirror), cases=["patient099"],
                progress=False)
    files = all_files(dest)
    assert files == {"train.list", "val.list", "test.list", "train_slices.list",
                     "ACDC_training_volumes/patient099_frame01.h5",
                     "ACDC_training_volumes/patient099_frame09.h5"}
    manifest = dl.load_manifest("acdc")
    assert all(sha256(dest / rel) == manifest[rel] for rel in files)


@pytest.fixture
def http_mirror(la_mirror_dir, tmp_path, monkeypatch):
    """Serve a small mirror-shaped copy (lists + 1 LA case) over loopback HTTP.

    Yields (base_url, served case, request paths seen, set of path fragments to answer 503 once).
    """
    case = mirrored_la_cases(la_mirror_dir)[0]
    root = tmp_path / "served"
    copy_la_subset(la_mirror_dir, root, [case])
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    requested: list[str] = []
    fail_once: set[str] = set()

    class RecordingHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requested.append(self.path)
            flaky = [fragment for fragment in fail_once if fragment in self.path]
            if flaky:
                fail_once.difference_update(flaky)
                self.send_error(503)
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RecordingHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", case, requested, fail_once
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_http_download_with_encoded_space(http_mirror, tmp_path):
    base, case, requested, _ = http_mirror
    dest = tmp_path / "LA"
    dl.download("la", dest, base_url=base, cases=[case], workers=2, progress=False)
    assert all_files(dest) == {"train.list", "test.list", la_h5(case)}
    assert sha256(dest / la_h5(case)) == dl.load_manifest("la")[la_h5(case)]
    assert f"/yulequan/UA-MT/master/data/2018LA_Seg_Training%20Set/{case}/mri_norm2.h5" in (
        requested)


def test_http_404_is_reported_without_retrying(http_mirror, la_mirror_dir, tmp_path):
    base, _, requested, _ = http_mirror
    other = mirrored_la_cases(la_mirror_dir)[1]  # not served
    with pytest.raises(dl.DownloadError, match=rf"{other}/mri_norm2.h5 from http://.*HTTP 404"):
        dl.download("la", tmp_path / "LA", base_url=base, cases=[other], retries=3,
                    progress=False)
    assert sum(other in path for path in requested) == 1  # a 404 is not retried


def test_http_transient_error_is_retried(http_mirror, tmp_path):
    base, case, requested, fail_once = http_mirror
    fail_once.add(case)
    dest = tmp_path / "LA"
    dl.download("la", dest, base_url=base, cases=[case], retries=1, progress=False)
    assert sum(case in path for path in requested) == 2  # 503 first, then the file
    assert sha256(dest / la_h5(case)) == dl.load_manifest("la")[la_h5(case)]


def test_local_file_with_wrong_hash_is_replaced(shared_mirror, tmp_path, caplog):
    dest = tmp_path / "LA"
    dest.mkdir()
    (dest / "train.list").write_text("stale\n")
    with caplog.at_level(logging.INFO, logger="agcl.download"):
        dl.download("la", dest, base_url=str(shared_mirror), cases=[], progress=False)
    assert sha256(dest / "train.list") == dl.load_manifest("la")["train.list"]
    assert "la: 2 fetched, 0 already present" in caplog.text


def test_a_killed_downloads_temporary_is_removed_on_the_next_run(shared_mirror, tmp_path):
    """pooch writes to tmpXXXXXXXX beside the file; a kill leaves it there. The next download
    removes such leftovers in the folders it fills, and nothing else."""
    dest = tmp_path / "LA"
    dest.mkdir()
    leftover = dest / "tmpk3_9zq0a"
    leftover.write_bytes(b"half a file")
    mine = dest / "tmp_notes.txt"
    mine.write_text("the user's")
    dl.download("la", dest, base_url=str(shared_mirror), cases=[], progress=False)
    assert not leftover.exists() and mine.read_text() == "the user's"
    assert sha256(dest / "train.list") == dl.load_manifest("la")["train.list"]

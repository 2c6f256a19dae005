"""The reference codebases' own modules, imported for equality tests (never copied into ours).

A baseline that says it follows a reference is checked by running the reference's network, loss
and step functions on the same tensors as ours. Their code stays theirs: the tests read it from
bare git mirrors of the repositories, at the commits pinned below, and skip when a mirror is
absent (as CI on a fresh machine, which has no copy). Point ``AGCL_REFERENCE_REPOS`` at a folder
holding ``<owner>+<name>/repo`` (a bare repository or a clone), e.g.::

    git clone --bare https://github.com/HiLab-git/DTC $AGCL_REFERENCE_REPOS/HiLab-git+DTC/repo

Usage::

    vnet_sdf, losses = reference_modules("HiLab-git/DTC", "networks.vnet_sdf", "utils.losses")

Each call imports the modules afresh from an extracted copy of the repository's ``code/`` tree
and removes them from ``sys.modules`` afterwards, so two repositories' ``networks`` packages
never meet. Imports the tests never exercise (tensorboardX, ...) can be stubbed.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_REPOS = Path(os.environ.get("AGCL_REFERENCE_REPOS", REPO_ROOT.parent / ".mirror"))

# The commits every equality test was run against (the newest at the time of writing).
PINNED = {
    "ycwu1997/SS-Net": "c0a8bf6e535ad1166ff8f3f871dc5cb9273e4573",
    "HiLab-git/DTC": "2525b9ccba84d7872fe22328b8b3298e7eafdc12",
    "HiLab-git/SSL4MIS": "06df6047a59aba9988ced8331998b5957ecb356b",
    "kleinzcy/SASSnet": "1761aa8af08f42e5a36a737c88beb4dc798af35c",
    "DeepMed-Lab-ECNU/BCP": "7879f988872f561231f73eecd5b4e232e54fa2bd",
}

_EXTRACTED: dict[str, Path] = {}
_CACHE = Path(tempfile.gettempdir()) / "agcl-reference-code"


def git_dir(repo: str) -> Path:
    """The mirror's git directory for ``owner/name``; skips the test when it is absent."""
    folder = REFERENCE_REPOS / repo.replace("/", "+") / "repo"
    for candidate in (folder / ".git", folder):
        if (candidate / "HEAD").is_file():
            return candidate
    pytest.skip(f"reference code of {repo} not available (no git mirror at {folder}; "
                "set AGCL_REFERENCE_REPOS)")


def code_tree(repo: str) -> Path:
    """The pinned commit's ``code/*.py`` files, extracted once per session."""
    if repo in _EXTRACTED:
        return _EXTRACTED[repo]
    commit = PINNED[repo]
    gdir = git_dir(repo)
    known = subprocess.run(["git", "--git-dir", str(gdir), "cat-file", "-e",
                            f"{commit}^{{commit}}"], check=False, capture_output=True)
    if known.returncode:
        pytest.skip(f"the mirror of {repo} lacks the pinned commit {commit}")
    target = _CACHE / repo.replace("/", "+") / commit
    if not (target / ".complete").is_file():
        archive = subprocess.run(["git", "--git-dir", str(gdir), "archive", "--format=tar", commit,
                                  "code"], capture_output=True, check=True).stdout
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".py")]
            tar.extractall(target, members=members, filter="data")
        (target / ".complete").touch()
    _EXTRACTED[repo] = target / "code"
    return _EXTRACTED[repo]


def _stub(name: str) -> types.ModuleType:
    module = types.ModuleType(name)

    def attribute(attr: str):  # any public attribute reads as a stub; dunders stay absent
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _stub(f"{name}.{attr}")

    module.__getattr__ = attribute
    return module


@contextlib.contextmanager
def _isolated_imports(root: Path, stubs: tuple[str, ...]):
    before = set(sys.modules)
    sys.path.insert(0, str(root))
    installed = []
    for name in stubs:
        if name not in sys.modules:
            sys.modules[name] = _stub(name)
            installed.append(name)
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            origin = getattr(module, "__file__", None) or ""
            if name in installed or origin.startswith(str(root)) or (
                    not origin and name.split(".")[0] in {p.name for p in root.iterdir()}):
                del sys.modules[name]


def reference_modules(repo: str, *names: str, stubs: tuple[str, ...] = ("tensorboardX",)):
    """Import ``names`` (dotted, relative to the repository's ``code/``) from the pinned commit."""
    root = code_tree(repo)
    import torch  # noqa: F401  (loaded before any stub is installed)

    with _isolated_imports(root, stubs):
        modules = tuple(importlib.import_module(name) for name in names)
    return modules[0] if len(modules) == 1 else modules


def reference_source(repo: str, path: str) -> str:
    """The text of ``code/<path>`` at the pinned commit (for tests that check a line's value)."""
    return (code_tree(repo) / path).read_text()

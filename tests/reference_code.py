"""The reference codebases' own modules, imported for equality tests (never copied into ours).

A baseline that says it follows a reference is checked by running the reference's network, loss
and step functions on the same tensors as ours. Their code stays theirs: the tests read it, at
the commits pinned below, from the first of

1. a snapshot ``<owner>+<name>/<commit>.tar.gz`` (the repository's text files at that commit, as
   ``git archive`` lays them out) under ``AGCL_REFERENCE_SNAPSHOTS``, by default
   ``../shared/references`` beside the checkout (present in CI, so the equality tests run there);
2. a bare git mirror ``<owner>+<name>/repo`` under ``AGCL_REFERENCE_REPOS`` (default
   ``../.mirror``), e.g.::

    git clone --bare https://github.com/HiLab-git/DTC $AGCL_REFERENCE_REPOS/HiLab-git+DTC/repo

and skip only when neither is there. ``.ci/run`` fails when a reference test skips although the
snapshots exist (tests/conftest.py records the skips).

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
REFERENCE_SNAPSHOTS = Path(os.environ.get("AGCL_REFERENCE_SNAPSHOTS",
                                          REPO_ROOT.parent / "shared" / "references"))

# The commits every equality test was run against (the newest at the time of writing).
PINNED = {
    "ycwu1997/SS-Net": "c0a8bf6e535ad1166ff8f3f871dc5cb9273e4573",
    "HiLab-git/DTC": "2525b9ccba84d7872fe22328b8b3298e7eafdc12",
    "HiLab-git/SSL4MIS": "06df6047a59aba9988ced8331998b5957ecb356b",
    "kleinzcy/SASSnet": "1761aa8af08f42e5a36a737c88beb4dc798af35c",
    "DeepMed-Lab-ECNU/BCP": "7879f988872f561231f73eecd5b4e232e54fa2bd",
    "yulequan/UA-MT": "88ed29ad794f877122e542a7fa9505a76fa83515",
    "ycwu1997/MC-Net": "fee453ca299a5d2c845cc2f3de4e416fd667d9c2",
    "ZhenZHAO/AD-MT": "03ef84c79ae4db884133293cba647c571dbce25b",
    "chy-upc/ABD": "4efd525e052c6e3601c29c1abaa4648de81cf206",
    "LiheYoung/UniMatch": "0324f3dd4a22128105a5eb135d2586c0bb3cc647",
}

_EXTRACTED: dict[str, Path] = {}
_CACHE = Path(tempfile.gettempdir()) / "agcl-reference-code"


def git_dir(repo: str) -> Path:
    """The mirror's git directory for ``owner/name``; skips the test when it is absent."""
    folder = REFERENCE_REPOS / repo.replace("/", "+") / "repo"
    for candidate in (folder / ".git", folder):
        if (candidate / "HEAD").is_file():
            return candidate
    pytest.skip(f"reference code of {repo} not available (no snapshot under "
                f"{REFERENCE_SNAPSHOTS}, no git mirror at {folder}; set "
                "AGCL_REFERENCE_SNAPSHOTS or AGCL_REFERENCE_REPOS)")


def snapshot(repo: str) -> Path | None:
    """The pinned commit's snapshot archive of ``owner/name``, or None."""
    path = REFERENCE_SNAPSHOTS / repo.replace("/", "+") / f"{PINNED[repo]}.tar.gz"
    return path if path.is_file() else None


def _extract_python(tar: tarfile.TarFile, target: Path, prefix: str = "code/") -> None:
    members = [m for m in tar.getmembers()
               if m.isfile() and m.name.startswith(prefix) and m.name.endswith(".py")]
    tar.extractall(target, members=members, filter="data")


def code_tree(repo: str, prefix: str = "code") -> Path:
    """The pinned commit's ``<prefix>/**.py`` files (``code`` in most references), extracted
    once per session from the snapshot, else from the mirror; skips when neither exists."""
    key = f"{repo}:{prefix}"
    if key in _EXTRACTED:
        return _EXTRACTED[key]
    commit = PINNED[repo]
    target = _CACHE / repo.replace("/", "+") / commit
    done = target / f".complete-{prefix.replace('/', '+')}"
    if not done.is_file():
        archive = snapshot(repo)
        target.mkdir(parents=True, exist_ok=True)
        if archive is not None:
            with tarfile.open(archive, "r:gz") as tar:
                _extract_python(tar, target, f"{prefix}/")
        else:
            gdir = git_dir(repo)
            known = subprocess.run(["git", "--git-dir", str(gdir), "cat-file", "-e",
                                    f"{commit}^{{commit}}"], check=False, capture_output=True)
            if known.returncode:
                pytest.skip(f"the mirror of {repo} lacks the pinned commit {commit}")
            data = subprocess.run(["git", "--git-dir", str(gdir), "archive", "--format=tar",
                                   commit, prefix], capture_output=True, check=True).stdout
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                _extract_python(tar, target, f"{prefix}/")
        done.touch()
    _EXTRACTED[key] = target / prefix
    return _EXTRACTED[key]


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


def reference_modules(repo: str, *names: str, stubs: tuple[str, ...] = ("tensorboardX",),
                      prefix: str = "code"):
    """Import ``names`` (dotted, relative to the repository's ``<prefix>/``, ``code/`` in most
    references) from the pinned commit."""
    root = code_tree(repo, prefix)
    import torch  # noqa: F401  (loaded before any stub is installed)

    with _isolated_imports(root, stubs):
        modules = tuple(importlib.import_module(name) for name in names)
    return modules[0] if len(modules) == 1 else modules


def reference_source(repo: str, path: str, prefix: str = "code") -> str:
    """The text of ``<prefix>/<path>`` (a .py file) at the pinned commit (for tests that check a
    line's value)."""
    return (code_tree(repo, prefix) / path).read_text()


def reference_text(repo: str, path: str) -> str:
    """Any text file of the pinned commit by its path in the repository (a config .yml, a split
    list): from the snapshot, else the mirror; skips when neither exists."""
    commit = PINNED[repo]
    archive = snapshot(repo)
    if archive is not None:
        with tarfile.open(archive, "r:gz") as tar:
            member = tar.extractfile(path)
            if member is None:
                raise FileNotFoundError(f"{archive}: {path} is not a file")
            return member.read().decode()
    gdir = git_dir(repo)
    return subprocess.run(["git", "--git-dir", str(gdir), "show", f"{commit}:{path}"],
                          capture_output=True, check=True, text=True).stdout


def import_script(monkeypatch, repo: str, script: str, *modules: str,
                  stubs: tuple[str, ...] = ("tensorboardX",), prefix: str = "code"):
    """A reference training script imported as a module (argparse at its defaults, so its own
    `args` and helper functions), with the other modules it needs, and `.cuda()` made the
    identity on this CPU machine. Returns the script module, then `modules` in order."""
    import torch

    monkeypatch.setattr(sys, "argv", [f"{script}.py"])
    loaded = reference_modules(repo, script, *modules, stubs=stubs, prefix=prefix)
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self, raising=False)
    return loaded


SSL4MIS_2D_STUBS = ("tensorboardX", "torchvision", "torchvision.transforms", "torchvision.utils",
                    "cv2")


def import_ssl4mis_2d_script(monkeypatch, script: str):
    """(script module, networks.unet) of one of SSL4MIS's 2D training scripts: torchvision,
    tensorboardX and cv2 stubbed, networks.net_factory a stand-in (its optional backbones need
    packages the loops never use; the test hands the loop its nets)."""
    factory = types.ModuleType("networks.net_factory")
    factory.net_factory = None
    monkeypatch.setitem(sys.modules, "networks.net_factory", factory)
    return import_script(monkeypatch, "HiLab-git/SSL4MIS", script, "networks.unet",
                         stubs=SSL4MIS_2D_STUBS)


def script_lines(repo: str, script: str, first: str, last: str, after: str | None = None,
                 prefix: str = "code") -> str:
    """The script's lines from the one starting with `first` to the end of the one holding
    `last` (searched after `after` where given: e.g. inside one function), dedented to run with
    exec() on the same tensors as ours."""
    import textwrap

    text = reference_source(repo, f"{script}.py", prefix)
    offset = text.index(after) if after else 0
    start = text.index(first, offset)
    start = text.rindex("\n", 0, start) + 1  # from the beginning of that line
    end = text.index(last, start) + len(last)
    return textwrap.dedent(text[start:end])


def assert_close_by_name(ours: dict, theirs: dict, what: str, relative: float = 1e-5,
                         floor: float = 1e-6) -> None:
    """Every tensor of `ours` equal to `theirs` of the same name, to `relative` of the tensor's
    own largest value (float32 sums in another order), with an absolute `floor` for tensors
    whose true value is 0 (a bias before BatchNorm: rounding noise only)."""
    import torch

    for name, value in ours.items():
        expected = theirs[name]
        scale = float(expected.abs().max()) if expected.is_floating_point() else 0.0
        torch.testing.assert_close(value, expected, rtol=relative,
                                   atol=max(relative * scale, floor) if scale else floor,
                                   msg=lambda m, name=name: f"{what} {name}: {m}")


def assert_same_update(method, loss, rename, student_ref, teacher_ref=None, *, lr: float,
                       step: int) -> None:
    """After the reference's own loop ran its SGD step (momentum 0.9, weight decay 1e-4, as
    every script here builds it), ours runs the same update from `loss`: every student gradient,
    then the student's weights and BatchNorm statistics, and after our EMA hook the teacher's,
    equal to the reference nets' (`rename`: their state names -> ours)."""
    import torch

    optimizer = torch.optim.SGD(method.trainable_parameters(), lr=lr, momentum=0.9,
                                weight_decay=0.0001)
    optimizer.zero_grad()
    loss.backward()
    assert_close_by_name(
        {name: p.grad for name, p in method.student.named_parameters()},
        rename({name: p.grad for name, p in student_ref.named_parameters()
                if p.grad is not None}), "grad")
    optimizer.step()
    method.after_optimizer_step(step)
    pairs = [(method.student, student_ref, "student")]
    if teacher_ref is not None:
        pairs.append((method.teacher, teacher_ref, "teacher"))
    for ours, theirs, what in pairs:
        assert_close_by_name(ours.state_dict(), rename(theirs.state_dict()), what)


class SameNormals:
    """The same standard normals, in call order, for the reference script's torch.randn_like
    (`randn_like`, its "theirs" side) and our side's torch.randn (`randn`) or a tensor-shaped
    draw (`next("ours", shape, dtype)`): each side gets the k-th draw of one generator, and
    `served` counts the draws each side took (a test asserts they are alike)."""

    def __init__(self, seed: int):
        import torch

        self._randn = torch.randn  # before a test patches torch.randn
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: list = []
        self.served = {"theirs": 0, "ours": 0}

    def next(self, who: str, shape, dtype):
        import torch

        index = self.served[who]
        self.served[who] += 1
        if index == len(self.drawn):
            self.drawn.append(self._randn(tuple(shape), generator=self.generator, dtype=dtype))
        assert self.drawn[index].shape == torch.Size(shape), (who, index)
        return self.drawn[index].clone()

    def randn_like(self, x, *_args, **kwargs):
        return self.next("theirs", x.shape, kwargs.get("dtype") or x.dtype)

    def randn(self, *size, **kwargs):
        import torch

        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return self.next("ours", shape, kwargs.get("dtype") or torch.get_default_dtype())


def teacher_in_pieces(teacher, student, out_conv, scale: float = 30.0) -> None:
    """Make a reference EMA teacher whose argmax holds every class in many pieces (so that
    pseudo-labels and their largest-component step matter): the student's weights plus a little
    noise (torch's global generator), the output convolution's weight scaled, and every
    parameter detached as the scripts build their EMA nets."""
    import torch

    with torch.no_grad():
        for p, q in zip(teacher.parameters(), student.parameters()):
            p.copy_(q + 0.05 * torch.randn_like(q))
        out_conv.weight.mul_(scale)
    for param in teacher.parameters():
        param.detach_()

"""Reading method and net declarations where torch is not installed (a login node planning the
DAG): `snakemake -n` and `agcl plan` resolve every recipe (hyperparameters, stages, the checks of
check_recipe, net options) from plain Python, while the files that declare them import torch at
the top to train.

`declarations_only()` (the Snakemake process, `agcl plan`) puts a stand-in package named `torch`
in its place for this process, whether torch is installed or not, so planning never pays torch's
import either: every attribute is a stand-in, a stand-in used as a base
class gives an empty class and used as a decorator returns the function, so method and net files
import and their declarations are read as written. Anything that computes with torch raises
TorchMissing naming what was asked for. Jobs that train or evaluate run where torch is
installed, and never see the stand-in.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import traceback
import types

_STAND_IN_ATTR = "__agcl_stand_in__"


class TorchMissing(ImportError):
    """Something computed with torch in a process that only reads declarations."""


class _StandIn:
    """Any torch object, while declarations are read without torch."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]):
            return args[0]  # a decorator (@torch.no_grad() is a call, then this)
        if args or kwargs:  # computing: torch.zeros(3), nn.Conv2d(1, 2, 3), ...
            raise self._missing()
        return _StandIn(f"{self._name}()")  # a decorator factory, @torch.no_grad()

    def _missing(self) -> TorchMissing:
        return TorchMissing(
            f"{self._name} was used while planning: `snakemake -n`, the Snakefile and `agcl "
            "plan` read method and net files with a stand-in for torch (agcl/config/torch_stand_in.py), "
            "installed or not, so nothing may compute with torch when a file is imported; "
            f"{_caller()} does. Move that computation inside a function or method")

    def __mro_entries__(self, bases):
        return (_base_class(self._name),)

    def __getitem__(self, item):
        return self

    def __or__(self, other):
        return self

    __ror__ = __or__

    def __bool__(self):
        raise self._missing()

    def __repr__(self) -> str:
        return f"<stand-in for {self._name}: torch is not installed>"


def _caller() -> str:
    """'file:line' of the code that used the stand-in (the deepest frame outside this file and
    the import machinery)."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != __file__ and not frame.filename.startswith("<frozen"):
            return f"{frame.filename}:{frame.lineno}"
    return "a file being imported"


_BASES: dict[str, type] = {}


def _base_class(name: str) -> type:
    """One empty class per stand-in base (nn.Module, torch.autograd.Function, ...)."""
    if name not in _BASES:
        _BASES[name] = type(name.rsplit(".", 1)[-1], (), {_STAND_IN_ATTR: True,
                                                          "__module__": "torch (stand-in)"})
    return _BASES[name]


class _StandInModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _StandIn(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torch" or fullname.startswith("torch."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StandInModule(spec.name)
        module.__path__ = []
        setattr(module, _STAND_IN_ATTR, True)
        return module

    def exec_module(self, module):
        pass


def torch_is_stand_in() -> bool:
    return getattr(sys.modules.get("torch"), _STAND_IN_ATTR, False)


def declarations_only() -> bool:
    """Make this process read declarations without torch: the stand-in takes torch's place
    unless the real torch is already loaded. True if the stand-in is in use."""
    if torch_is_stand_in():
        return True
    if "torch" in sys.modules:
        return False
    sys.meta_path.insert(0, _Finder())
    return True

"""Errors raised inside a method's code, re-raised with where they happened: the method, the
stage, the step, and the file and line of the method's code that raised (the user's plugin, not
torch's internals), pointing to `--debug` for the whole traceback."""

from __future__ import annotations

import contextlib
import sys
import traceback
from pathlib import Path


class MethodError(RuntimeError):
    """An exception from a method's train_step / after_optimizer_step / auxiliary_step /
    start_stage, with its origin; the original is its __cause__."""


def origin(exc: BaseException, method) -> str:
    # `method`: the instance, or its class (an error while building it)
    """'file:line in function' of the deepest frame of the method's own code (its class's module,
    or any module of its class hierarchy outside agcl.engine), else of the deepest frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = set()
    for cls in (method if isinstance(method, type) else type(method)).__mro__:
        module = sys.modules.get(cls.__module__)
        path = getattr(module, "__file__", None)
        if path and not cls.__module__.startswith(("torch", "agcl.engine", "builtins")):
            own.add(str(Path(path).resolve()))
    chosen = next((f for f in reversed(frames) if str(Path(f.filename).resolve()) in own),
                  frames[-1] if frames else None)
    if chosen is None:
        return "unknown location"
    return f"{chosen.filename}:{chosen.lineno} in {chosen.name}"


@contextlib.contextmanager
def method_code(method, where: str, hook: str):
    """Run a method hook; an exception from it becomes a MethodError naming `where` (run, stage
    and step), the hook, the exception and its origin in the method's code."""
    try:
        yield
    except MethodError:
        raise
    except Exception as exc:
        name = getattr(method, "name", type(method).__name__)
        raise MethodError(
            f"{where}: method {name!r} raised in {hook}: {type(exc).__name__}: {exc} "
            f"(at {origin(exc, method)}; run with --debug for the whole traceback)") from exc

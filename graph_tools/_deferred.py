"""sympy is imported on first use, not when onnx-ir is imported.

onnx-ir imports sympy at module level (``onnx_ir/_core.py``; ``onnx_ir/_symbolic_shapes.py``
builds a table of sympy functions at import) but needs it only for arithmetic on symbolic
dimensions (``SymbolicDim + 1``, ``.simplify()``, ``.evaluate()``), which graph_tools never does.
Importing sympy takes ~0.3 s, a fifth of a whole ``lora-onnx extract`` process, and tearing its
~500 modules down at exit more.

:func:`defer` (run by ``graph_tools/__init__`` before anything imports onnx-ir) puts a stand-in
module for ``sympy`` and for ``onnx_ir._symbolic_shapes`` into ``sys.modules``. Each is the very
module object the real import would make (same spec, ``__file__``); on the first lookup of a name
it does not hold yet (any sympy name, or ``__path__``, which importing a submodule reads), it runs
the real module code into itself and from then on is an ordinary module. Nothing is deferred when sympy or onnx-ir is already
imported, or when onnx-ir's layout is not the one this was written for (``_symbolic_shapes``).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import threading
import types

__all__ = ["defer", "DEFERRED"]

#: the modules :func:`defer` defers, in the order they are set up
DEFERRED = ("sympy", "onnx_ir._symbolic_shapes")

_LOCK = threading.RLock()  # held for the whole load: other threads wait, then see the real module
_LOADING: dict[str, int] = {}  # module name -> the thread running its code


class _Deferred(types.ModuleType):
    """A module whose code runs on the first lookup of a name it does not hold yet. It stays a
    ``_Deferred`` until that code has finished, so a lookup from another thread meanwhile waits
    for the load (as the import lock makes it wait for an eager import) instead of seeing a
    half-filled module."""

    def __getattr__(self, name: str):  # only called when ordinary lookup fails
        _load(self, name)
        return getattr(self, name)

    def __dir__(self):
        _load(self)
        return list(self.__dict__)


def _load(module: types.ModuleType, name: str | None = None) -> None:
    spec = module.__spec__
    with _LOCK:
        if type(module) is not _Deferred:  # loaded meanwhile (by another thread)
            return
        if _LOADING.get(spec.name) == threading.get_ident():  # the module's own code, mid-load
            raise AttributeError(f"partially initialized module {spec.name!r} has no attribute {name!r}")
        _LOADING[spec.name] = threading.get_ident()
        try:
            if spec.submodule_search_locations is not None:
                module.__path__ = spec.submodule_search_locations
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)  # as a failed eager import leaves it
            raise
        finally:
            del _LOADING[spec.name]
        module.__class__ = types.ModuleType
        parent, _, child = spec.name.rpartition(".")
        if parent in sys.modules:  # what the import system does for a submodule it loads
            setattr(sys.modules[parent], child, module)


def _stand_in(spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    module = importlib.util.module_from_spec(spec)  # __spec__, __path__, __file__, __loader__ ...
    # without __path__ until loaded: importing a submodule (``import sympy.polys``) reads the
    # parent's __path__, so the package's own code runs first, as with an eager import
    module.__dict__.pop("__path__", None)
    module.__class__ = _Deferred
    return module


def defer() -> bool:
    """Set up the stand-ins (see the module doc); True when they were set up."""
    with _LOCK:
        if any(name in sys.modules for name in ("sympy", "onnx_ir")):
            return False
        try:
            sympy = importlib.util.find_spec("sympy")
            onnx_ir = importlib.util.find_spec("onnx_ir")
            shapes = (importlib.machinery.PathFinder.find_spec("onnx_ir._symbolic_shapes", onnx_ir.submodule_search_locations)
                      if onnx_ir is not None and onnx_ir.submodule_search_locations else None)
        except (ImportError, ValueError):
            return False
        if sympy is None or shapes is None or sympy.loader is None or shapes.loader is None:
            return False
        sys.modules["sympy"] = _stand_in(sympy)
        sys.modules["onnx_ir._symbolic_shapes"] = _stand_in(shapes)
        return True

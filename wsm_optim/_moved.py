"""Module paths of 0.2 that moved in 0.3: ``import wsm_optim.optimizer`` still works, with a ``DeprecationWarning``.

0.3 groups the package into ``core/`` (the online engine), ``offline/``,
``cli/``, ``common/`` and ``integrations/``. A finder on ``sys.meta_path``
answers the old dotted names with the new modules themselves (the same objects,
so ``isinstance`` and monkeypatching see one class). The aliases go in 1.0.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

#: 0.2 module -> its 0.3 home (modules that were new in 0.3 have no alias).
MOVED = {
    "wsm_optim.optimizer": "wsm_optim.core.optimizer",
    "wsm_optim.merge": ("wsm_optim.core.merge", "wsm_optim.core.spec"),  # 0.2's merge held MergeSpec
    "wsm_optim.nonfinite": "wsm_optim.core.nonfinite",
    "wsm_optim.persistence": "wsm_optim.core.persistence",
    "wsm_optim.readout": "wsm_optim.core.readout",
    "wsm_optim.registry": "wsm_optim.core.registry",
    "wsm_optim.runtime": "wsm_optim.core.runtime",
    "wsm_optim.distributed": "wsm_optim.core.distributed",
    "wsm_optim.backends": "wsm_optim.core.backends",
    "wsm_optim.backends.foreach": "wsm_optim.core.backends.foreach",
    "wsm_optim.backends.triton": "wsm_optim.core.backends.triton",
    "wsm_optim.precision": "wsm_optim.common.precision",
    "wsm_optim.progress": "wsm_optim.common.progress",
    "wsm_optim.warn": "wsm_optim.common.warn",
    "wsm_optim.weights_cli": "wsm_optim.cli.weights",
    "wsm_optim.io": ("wsm_optim.common.atomic", "wsm_optim.offline.files"),  # split: writing, reading
}


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new} in wsm_optim 0.3; the old path goes in 1.0", DeprecationWarning,
                  stacklevel=3)


def _joined(name: str, homes: tuple[str, ...]) -> types.ModuleType:
    """One module object answering every name of ``homes`` (the first that has it)."""
    modules = [importlib.import_module(h) for h in homes]
    joined = types.ModuleType(name, f"0.2 path of {' and '.join(homes)}")

    def __getattr__(attr: str) -> Any:
        for m in modules:
            if hasattr(m, attr):
                return getattr(m, attr)
        raise AttributeError(f"module {name!r} has no attribute {attr!r}")

    joined.__getattr__ = __getattr__  # type: ignore[method-assign]
    return joined


class _Alias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED and not fullname.startswith("wsm_optim.backends."):
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=fullname == "wsm_optim.backends")

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        home = MOVED.get(spec.name) or "wsm_optim.core.backends." + spec.name.rsplit(".", 1)[1]
        _warn(spec.name, home if isinstance(home, str) else " and ".join(home))
        if isinstance(home, tuple):
            return _joined(spec.name, home)
        module = importlib.import_module(home)
        spec.loader_state = module.__spec__  # the import system sets __spec__ to the alias's next
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        own = module.__spec__.loader_state
        if own is not None:  # the new module keeps its own spec (its relative imports resolve from it)
            module.__spec__ = own


def install() -> None:
    # first: a finder further down (an editable install of an older checkout) could find the 0.2 files
    if not any(isinstance(f, _Alias) for f in sys.meta_path):
        sys.meta_path.insert(0, _Alias())

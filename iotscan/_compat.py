"""The module paths of iotscan 0.1's flat layout, kept importable for one release (see CHANGELOG.md).

``import iotscan.scoring`` or ``from iotscan.source import SidePass`` still works: a finder on
``sys.meta_path`` answers the old name with a module that forwards every attribute to the modules
the code moved to, and warns once (DeprecationWarning). Model files pickled by 0.1 name
``iotscan.trees`` classes, which load the same way. Remove in 0.3.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from typing import Any

# old module -> the modules that now hold its names, searched in order
MOVED: dict[str, tuple[str, ...]] = {
    "iotscan.inputs": ("iotscan.capture.inputs",),
    "iotscan.source": ("iotscan.capture.source", "iotscan.capture.side_pass"),
    "iotscan.packets": ("iotscan.capture.packets",),
    "iotscan.features": ("iotscan.detect.features", "iotscan.detect.context"),
    "iotscan.request_pass": ("iotscan.detect.request_pass", "iotscan.detect.request_findings",
                             "iotscan.detect.request_signatures"),
    "iotscan.scoring": ("iotscan.detect.scoring",),
    "iotscan.trees": ("iotscan.detect.trees",),
    "iotscan.modelstore": ("iotscan.detect.modelstore",),
    "iotscan.records": ("iotscan.output.records",),
    "iotscan.sinks": ("iotscan.output.sinks", "iotscan.output.table"),
    "iotscan.console": ("iotscan.output.console",),
    "iotscan.devices.train": ("iotscan.training.devices",),
}


class _Forwarder(types.ModuleType):
    """An old module name whose attributes are looked up in the new modules."""

    def __init__(self, name: str, targets: tuple[str, ...]) -> None:
        super().__init__(name, f"Moved to {', '.join(targets)} (deprecated alias, see iotscan._compat).")
        self._targets = targets

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for target in self._targets:
            module = importlib.import_module(target)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (moved to {', '.join(self._targets)}) "
                             f"has no attribute {attr!r}")


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        targets = MOVED[spec.name]
        warnings.warn(f"{spec.name} moved to {targets[0]}; the old name goes away in iotscan 0.3",
                      DeprecationWarning, stacklevel=3)
        return _Forwarder(spec.name, targets)

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())

"""The architecture, checked: which package of iotscan may import which (read from the code with ast), module
sizes, and the old flat module names that still import for one release."""

from __future__ import annotations

import ast
import importlib
import sys
import warnings
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "iotscan"
MAX_MODULE_LINES = 700

# What each part of iotscan may import besides itself (the package docstrings say the same). A rule names a
# package ("capture") or one module ("output.records"); the root package ("iotscan": __version__) is open to all.
EVERYTHING = {"capture", "detect", "devices", "output", "inspect", "stage", "pipeline", "live", "errors",
              "training", "lab", "cli", "_compat", "cluster"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "_compat": set(),
    "capture": {"errors"},
    "output": {"errors"},
    "stage": {"capture", "errors"},
    "detect": {"capture", "output.records", "stage", "errors"},
    "devices": {"capture", "output.records", "stage", "errors", "detect.trees", "detect.modelstore"},
    "inspect": {"capture", "output", "stage", "errors"},
    "pipeline": {"capture", "output", "stage", "errors"},
    "live": {"pipeline", "capture", "output", "stage", "errors"},
    "cluster": {"pipeline", "capture", "output", "stage", "errors"},
    "training": {"detect", "devices", "capture", "output", "stage", "pipeline", "errors"},
    "lab": {"capture", "errors"},
    "cli": EVERYTHING - {"cli"},
    "__main__": {"cli"},
    "__init__": {"_compat"},
    "data": set(),
}


def part_of(module: str) -> str:
    """The part a module belongs to: ``iotscan.detect.scoring`` -> ``detect``, ``iotscan.live`` -> ``live``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imported_modules(path: Path, module: str) -> list[tuple[int, str]]:
    """Every iotscan module the file imports, anywhere in it (deferred imports in functions included)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.startswith("iotscan")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("iotscan"):
                # `from iotscan.detect import trees` imports the module iotscan.detect.trees
                found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def violations(path: Path, module: str) -> list[str]:
    own = part_of(module)
    allowed = ALLOWED[own]
    bad = []
    for line, target in imported_modules(path, module):
        parts = target.split(".")[1:]
        if not parts or parts[0] == "__version__":
            continue  # the root package
        if parts[0] == own and own not in ("__init__", "__main__"):
            continue
        if parts[0] in allowed or ".".join(parts[:2]) in allowed:
            continue
        bad.append(f"{path.relative_to(REPO)}:{line}: {own} imports {target}")
    return bad


def modules() -> list[tuple[Path, str]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out.append((path, ".".join(parts)))
    return out


def test_every_module_belongs_to_a_part_with_rules() -> None:
    unknown = {part_of(m) for _, m in modules()} - set(ALLOWED)
    assert not unknown, f"parts without import rules: {unknown}: add them to ALLOWED and to the package docstrings"


def test_packages_import_only_what_the_architecture_allows() -> None:
    bad = [v for path, module in modules() for v in violations(path, module)]
    assert not bad, "imports against the layout (see iotscan/__init__.py):\n" + "\n".join(bad)


def test_the_check_catches_a_forbidden_import(tmp_path: Path) -> None:
    """The rule check itself: capture importing the scoring stage, or a deferred import of the CLI, is caught."""
    fake = tmp_path / "iotscan" / "capture" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from iotscan.errors import InputError\n"
                    "def f():\n    from iotscan.detect import scoring\n    import iotscan.cli\n")
    module = "iotscan.capture.fake"
    found = imported_modules(fake, module)
    assert [t for _, t in found] == ["iotscan.errors.InputError", "iotscan.detect.scoring", "iotscan.cli"]
    own, allowed = part_of(module), ALLOWED["capture"]
    forbidden = [t for _, t in found if t.split(".")[1] not in allowed | {own}]
    assert forbidden == ["iotscan.detect.scoring", "iotscan.cli"]


def test_no_module_is_over_700_lines() -> None:
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines()) for p, _ in modules()}
    long = {name: n for name, n in sizes.items() if n > MAX_MODULE_LINES}
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them by job): {long}"


@pytest.mark.parametrize(("old", "new", "name"), [
    ("iotscan.scoring", "iotscan.detect.scoring", "ScoringStage"),
    ("iotscan.source", "iotscan.capture.source", "FlowSource"),
    ("iotscan.source", "iotscan.capture.side_pass", "SidePass"),
    ("iotscan.features", "iotscan.detect.context", "ContextTracker"),
    ("iotscan.records", "iotscan.output.records", "flow_record"),
    ("iotscan.trees", "iotscan.detect.trees", "Forest"),
    ("iotscan.devices.train", "iotscan.training.devices", "train"),
])
def test_old_module_names_still_import_for_one_release(old: str, new: str, name: str) -> None:
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
    assert any(issubclass(w.category, DeprecationWarning) and new.split(".")[1] in str(w.message) for w in caught)
    with pytest.raises(AttributeError, match="moved to"):
        module.no_such_name  # noqa: B018

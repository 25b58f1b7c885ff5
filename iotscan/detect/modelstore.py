"""Model files: finding the bundled ones, verifying them, loading them, and writing them with a card.

A joblib file is a pickle, and loading a pickle runs code. So a bundled model is loaded only after
its SHA-256 matches the one recorded in its card, and a user's own model only with --trust-model.
"""

from __future__ import annotations

import hashlib
import json
import threading
import warnings
from importlib import resources
from pathlib import Path
from typing import Any

from iotscan.errors import ModelError

CARD_SUFFIX = ".card.json"
CARD_MD_SUFFIX = ".card.md"


def models_dir() -> Path:
    """The bundled models: package iotscan.models when installed, ./models in a source checkout."""
    try:
        return Path(str(resources.files("iotscan.models")))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "models"


def bundled_model(name: str) -> Path:
    return models_dir() / f"{name}.joblib"


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name.removesuffix(".joblib") + CARD_SUFFIX)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(model_path: Path) -> dict[str, Any]:
    path = card_path(model_path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelError(f"{path}: model card not found") from exc
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path}: unreadable model card: {exc}") from exc


# Unpickling imports the modules of the pickled classes (scikit-learn's, for a model made before iotscan kept
# its trees as arrays); two threads importing them at once (the device model loads in a thread while the flow
# model loads in the main one) can see them half initialised.
_LOAD_LOCK = threading.Lock()


def verified_card(model_path: Path) -> dict[str, Any]:
    """The card of a model file whose SHA-256 matches it, without unpickling anything."""
    if not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    card = read_card(model_path)
    expected = card.get("sha256")
    actual = sha256_file(model_path)
    if not expected or expected != actual:
        raise ModelError(f"{model_path}: SHA-256 {actual[:16]}... does not match its card "
                         f"({str(expected)[:16]}...): refusing to load a tampered or unverified model")
    return card


def load_model(model_path: Path, *, trusted: bool = False, schema_version: int | None = None) -> tuple[Any, dict]:
    """Load a joblib model and its card after checking it may be loaded at all.

    A model is loaded only if the SHA-256 in its card matches the file, or if the user vouched for
    it with ``trusted`` (--trust-model). The stored ``feature_schema_version`` must match
    ``schema_version`` when given: features of another layout would give silent garbage.
    """
    import joblib  # deferred: only commands that score pay for the import

    card: dict[str, Any] = {}
    if not trusted:
        card = verified_card(model_path)
    elif not model_path.is_file():
        raise ModelError(f"{model_path}: model file not found")
    else:
        try:
            card = read_card(model_path)
        except ModelError:
            card = {}
    try:
        with _LOAD_LOCK, warnings.catch_warnings():
            # models pickled by iotscan 0.1 (the bundled ones among them, until retrained) name classes by their
            # old module paths (iotscan.trees): iotscan._compat answers them; a user cannot act on that warning
            warnings.simplefilter("ignore", DeprecationWarning)
            model = joblib.load(model_path)
    except Exception as exc:  # a corrupt or foreign pickle
        raise ModelError(f"{model_path}: cannot load model: {type(exc).__name__}: {exc}") from exc
    if schema_version is not None:
        found = model.get("feature_schema_version") if isinstance(model, dict) else None
        if found != schema_version:
            how = card.get("training_command") or card.get("command") or "see its model card"
            raise ModelError(f"{model_path}: model was built for feature schema {found}, this iotscan computes "
                             f"schema {schema_version}: retrain it ({how}) or use a matching iotscan")
    return model, card


def save_model(model: Any, model_path: Path, card: dict[str, Any], card_markdown: str) -> str:
    """Write the model, then its card (JSON and Markdown) with the model file's SHA-256; return it."""
    import joblib

    model_path.parent.mkdir(parents=True, exist_ok=True)
    joblib.dump(model, model_path, compress=3)
    digest = sha256_file(model_path)
    card = {**card, "sha256": digest, "model_file": model_path.name}
    card_path(model_path).write_text(json.dumps(card, indent=2, sort_keys=False) + "\n")
    md_path = model_path.with_name(model_path.name.removesuffix(".joblib") + CARD_MD_SUFFIX)
    md_path.write_text(card_markdown.rstrip() + f"\n\nModel file `{model_path.name}`, SHA-256 `{digest}`.\n")
    return digest

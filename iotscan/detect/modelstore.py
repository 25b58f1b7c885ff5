"""Model files: finding the bundled ones, verifying them, loading them, and writing them with a card.

A joblib file is a pickle, and loading a pickle runs code. So a bundled model is loaded only after
its SHA-256 matches the one recorded in its card, and a user's own model only with --trust-model.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import threading
import warnings
from dataclasses import dataclass
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


@dataclass(frozen=True)
class ModelContent:
    """A model file of the user's (--model) carried by content to the processes that score, on this machine or
    others (iotscan.cluster's workers), with its card when it has one; verified there against the SHA-256 taken
    here, then loaded as a single process loads it (see load_model)."""

    name: str
    data: bytes
    sha256: str
    card: bytes | None = None

    @classmethod
    def read(cls, path: Path) -> ModelContent:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelError(f"{path}: cannot read model file: {exc.strerror or exc}") from exc
        card = card_path(path)
        return cls(name=path.name, data=data, sha256=hashlib.sha256(data).hexdigest(),
                   card=card.read_bytes() if card.is_file() else None)

    def materialize(self) -> Path:
        """The model as a file here (a directory named by its hash, in the temporary directory), after checking
        that its bytes are the ones read by the client."""
        actual = hashlib.sha256(self.data).hexdigest()
        if actual != self.sha256:
            raise ModelError(f"{self.name}: the model received has SHA-256 {actual[:16]}..., not the "
                             f"{self.sha256[:16]}... sent: refusing to load it")
        folder = Path(tempfile.gettempdir()) / f"iotscan-model-{os.getuid()}-{self.sha256[:32]}"
        folder.mkdir(mode=0o700, exist_ok=True)
        found = folder.lstat()  # loading runs the pickle: nobody else may write there
        if not stat.S_ISDIR(found.st_mode) or found.st_uid != os.getuid() or found.st_mode & 0o077:
            raise ModelError(f"{folder}: not a directory of this user's alone: refusing to load a model from it")
        path = folder / self.name
        for target, data in ((path, self.data), (card_path(path), self.card)):
            if data is not None and not (target.is_file() and target.read_bytes() == data):
                partial = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
                partial.write_bytes(data)
                os.replace(partial, target)  # whole or not at all, whichever task of the worker writes it
        return path

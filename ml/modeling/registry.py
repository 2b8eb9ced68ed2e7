"""The model registry: versioned artifacts on disk, their status in `model_registry`.

A new model only replaces the champion when it is better on the SAME rows,
because metrics measured on different months are not comparable (churn rates
move), and better by more than `promotion.margin`: a tie keeps the champion,
and the decision text says which rule decided. The champion's side of the
comparison is judged on its OWN feature definitions:

- when the mart still computes the champion's features as it was trained
  (`ml.modeling.definitions`), the champion is re-scored on the challenger's
  out-of-time rows;
- when they were redefined, re-scoring would judge the champion on features it
  never learned, so its stored out-of-time predictions (made at training, with
  its definitions) are compared with the challenger's on the (key, as_of) rows
  both were held out on; with no such rows, its recorded out-of-time metric is
  used and the decision says the rows differ.

Each model folder also stores its calibrated out-of-fold predictions
(`stored_predictions`), on which the operating threshold is re-chosen without
retraining (`ml.modeling.operating_point`). `promote` and `rollback` change the
champion by hand; each is recorded with who and why in `model_registry_events`.

Loading a model must never run code an attacker chose. The registry row is not
trusted for that: BI users receive `published.duckdb`, and the API reads the
registry from it, so anyone who can edit that copy could point `artifact_dir`
anywhere and rewrite the hashes beside it. So:

- `artifact_dir` must be a plain relative folder inside `warehouse.models_dir`
  (no absolute path, no `..`, no symlink out); anything else is refused.
- Each model folder carries `manifest.json`: its version and every file's
  sha256, signed with HMAC-SHA256. The key is `CHURN_MODEL_KEY` from the
  environment when set (deployments that keep secrets out of the file system,
  or share one key between a build host and API hosts), else a random key file
  `models_dir/.signing-key` created once with 0600 permissions. Either way the
  key is outside every warehouse file BI receives, so editing the published
  registry cannot forge a signature. The signature, the manifest's version and
  every file's hash are checked BEFORE anything is deserialized; a registry row
  whose hashes disagree with the signed manifest is refused as tampered.
- The scikit-learn parts are stored with `skops` (loaded with an explicit
  allow-list of types, never arbitrary pickles) and XGBoost's booster as its own
  JSON; neither executes code on load.

Migration rule for models registered before signing (no manifest, a
`model.joblib` pickle): they load only when the registry row comes from the
build database (the trusted side, never shipped to BI) and every file matches
that row's hashes, checked before unpickling. Such a load then signs the model
(writes its manifest), so the next `churn serve` reading the published copy
accepts it; until a nightly or `churn score` has done that, the API refuses an
unsigned model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import os
import platform
import secrets
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
import skops
import skops.io
from joblib.numpy_pickle import NumpyUnpickler
from sklearn.pipeline import Pipeline

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract
from ml.features.mart import load_evaluation_rows, mart_reader
from ml.logs import get_logger
from ml.modeling.definitions import check_definitions, model_definitions_sha256
from ml.modeling.evaluate import classification_metrics
from ml.modeling.model import ChurnModel, ModelMetadata
from ml.warehouse import Reader, Session, connect, declare, float_or_none, is_missing, quote, to_json

log = get_logger("registry")

METADATA_FILE = "metadata.json"
PIPELINE_FILE = "model.skops"
LEGACY_PIPELINE_FILE = "model.joblib"  # models registered before signing
BOOSTER_FILE = "xgboost_model.json"
MANIFEST_FILE = "manifest.json"
PREDICTIONS_FILE = "stored_predictions.parquet"  # out-of-fold + out-of-time predictions with labels
SPLIT_OUT_OF_FOLD = "out_of_fold"
SPLIT_OUT_OF_TIME = "out_of_time"
KEY_FILE = ".signing-key"
KEY_ENV_VAR = "CHURN_MODEL_KEY"

# Types outside skops' own trusted set that a registered model may contain; any
# other type in a model file is refused before it is constructed.
TRUSTED_TYPES = frozenset({
    "ml.modeling.model.ScoreCalibrator",
    "numpy.dtype",
    "sklearn.tree._tree.Tree",
})

STATUS_CHAMPION = "champion"
STATUS_CHALLENGER = "challenger"
STATUS_RETIRED = "retired"

REGISTRY = declare(
    name="model_registry",
    owner=__name__,
    grain="one row per registered model version",
    description="Every registered model: its status (champion / challenger / retired), how the "
                "champion comparison decided, and where its hash-checked artifact lives.",
    columns=[
        ("model_version", "VARCHAR NOT NULL"),
        ("dataset", "VARCHAR NOT NULL"),
        ("feature_mart", "VARCHAR NOT NULL"),
        ("run_id", "VARCHAR"),
        ("algorithm", "VARCHAR NOT NULL"),
        ("status", "VARCHAR NOT NULL"),
        ("registered_at", "TIMESTAMP NOT NULL"),
        ("status_changed_at", "TIMESTAMP NOT NULL"),
        ("threshold", "DOUBLE"),
        ("selection_metric", "VARCHAR"),
        ("oot_metric", "DOUBLE"),
        ("compared_with", "VARCHAR"),
        ("champion_metric_same_rows", "DOUBLE"),
        ("challenger_metric_same_rows", "DOUBLE"),
        ("comparison_rows", "BIGINT"),
        ("decision", "VARCHAR"),
        ("artifact_dir", "VARCHAR NOT NULL"),
        ("artifact_sha256", "VARCHAR NOT NULL"),
        ("definitions_sha256", "VARCHAR"),
        ("comparison_metrics", "VARCHAR"),
        # the dataset's success criterion on the model's own hold-out: a champion that misses it is marked
        ("success_metric", "VARCHAR"),
        ("success_target", "DOUBLE"),
        ("meets_success_target", "BOOLEAN"),
    ],
    primary_key=("model_version",),
)
REGISTRY_TABLE = REGISTRY.name

EVENTS = declare(
    name="model_registry_events",
    owner=__name__,
    grain="one row per champion change made by hand (churn promote / churn rollback)",
    description="Who changed the champion by hand, when, from which model to which, and why.",
    columns=[
        ("dataset", "VARCHAR NOT NULL"),
        ("event", "VARCHAR NOT NULL"),
        ("model_version", "VARCHAR NOT NULL"),
        ("previous_champion", "VARCHAR"),
        ("reason", "VARCHAR NOT NULL"),
        ("actor", "VARCHAR NOT NULL"),
        ("changed_at", "TIMESTAMP NOT NULL"),
    ],
)
EVENT_PROMOTE = "promote"
EVENT_ROLLBACK = "rollback"

# metadata.json keys the registry writes itself; the rest is the model's ModelMetadata.
MODEL_KEYS = ("version", "algorithm", "params", "threshold", "calibration", "contract")


class RegistryError(RuntimeError):
    """A model is missing from the registry, or its artifact is missing or changed."""


@dataclass(frozen=True)
class Comparison:
    """The champion/challenger decision for one new model (before anything is written)."""

    promoted: bool
    decision: str
    compared_with: str | None = None
    champion_metric: float | None = None
    challenger_metric: float | None = None
    comparison_rows: int | None = None
    # Every classification metric of both models on those rows, each at its own threshold:
    # {"challenger": {...}, "champion": {...}}; the model report charts them side by side.
    metrics: dict[str, dict[str, float]] | None = None

    @property
    def status(self) -> str:
        return STATUS_CHAMPION if self.promoted else STATUS_CHALLENGER


@dataclass(frozen=True)
class Registration:
    """What `register` did: the new version, its status and why."""

    version: str
    promoted: bool
    status: str
    compared_with: str | None
    champion_metric: float | None
    challenger_metric: float | None
    comparison_rows: int | None
    decision: str
    model: ChurnModel  # the registered copy of the caller's model, with its `version` set

    @classmethod
    def of(cls, registered: ChurnModel, comparison: Comparison) -> Registration:
        return cls(
            version=registered.version,
            promoted=comparison.promoted,
            status=comparison.status,
            compared_with=comparison.compared_with,
            champion_metric=comparison.champion_metric,
            challenger_metric=comparison.challenger_metric,
            comparison_rows=comparison.comparison_rows,
            decision=comparison.decision,
            model=registered,
        )


def library_versions() -> dict[str, str]:
    """Versions that must match for a pickled pipeline to behave the same at load."""
    import xgboost

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "skops": skops.__version__,
    }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def new_version_id(algorithm: str) -> str:
    """Sortable by time, unique across parallel runs."""
    stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
    return f"m{stamp}-{algorithm}-{uuid.uuid4().hex[:6]}"


# ---------------------------------------------------------------- artifacts

def save_artifacts(model: ChurnModel, folder: Path, key: bytes,
                   predictions: pd.DataFrame | None = None) -> dict[str, str]:
    """Write the model's files into `folder`, then its signed manifest; return file name -> sha256.

    `predictions` (split, key, as_of, label, probability) is stored as Parquet,
    signed with the rest: the threshold is later chosen on it.

    XGBoost's booster goes to its own JSON format (stable across library versions);
    preprocessing, any non-XGBoost estimator and the calibrator go to skops.
    """
    folder.mkdir(parents=True, exist_ok=True)
    estimator = model.pipeline.named_steps["model"]
    hashes: dict[str, str] = {}
    stored_estimator = estimator
    if model.algorithm == "xgboost":
        estimator.save_model(str(folder / BOOSTER_FILE))
        hashes[BOOSTER_FILE] = sha256_file(folder / BOOSTER_FILE)
        stored_estimator = None
    skops.io.dump(
        {
            "preprocess": model.pipeline.named_steps["preprocess"],
            "estimator": stored_estimator,
            "calibrator": model.calibrator,
        },
        folder / PIPELINE_FILE,
    )
    hashes[PIPELINE_FILE] = sha256_file(folder / PIPELINE_FILE)
    if predictions is not None:
        predictions.to_parquet(folder / PREDICTIONS_FILE, index=False)
        hashes[PREDICTIONS_FILE] = sha256_file(folder / PREDICTIONS_FILE)
    (folder / METADATA_FILE).write_text(to_json(metadata_document(model, hashes), indent=2))
    hashes[METADATA_FILE] = sha256_file(folder / METADATA_FILE)
    write_manifest(folder, str(model.version), hashes, key)
    return hashes


def metadata_document(model: ChurnModel, hashes: dict[str, str]) -> dict[str, Any]:
    """metadata.json: the model's own facts, then the libraries and hashes of this save, then its ModelMetadata."""
    stamped = dataclasses.replace(model.metadata, library_versions=library_versions(), artifact_sha256=dict(hashes))
    return {
        "version": model.version,
        "algorithm": model.algorithm,
        "params": model.params,
        "threshold": model.threshold,
        "calibration": model.calibrator.method,
        "contract": model.contract.to_dict(),
        **stamped.to_dict(),
    }


def _registry_row(config: ChurnConfig, version: str, registry_db: Path | None = None) -> dict[str, Any]:
    db = registry_db or config.warehouse.build_db
    if not db.exists():
        raise RegistryError(f"no model registry: database {db} does not exist")
    # Another database (the published copy) is only ever read: servers must not lock it.
    with connect(db, read_only=registry_db is not None, settings=config.warehouse.engine) as session:
        if not session.exists(REGISTRY):
            raise RegistryError(f"no model registry: table {REGISTRY.name!r} not found in {db}")
        frame = session.frame(f"select * from {quote(REGISTRY.name)} where model_version = ?", [version])
    if frame.empty:
        raise RegistryError(f"model version {version!r} is not in {REGISTRY.name} ({db})")
    return frame.iloc[0].to_dict()


def artifact_folder(config: ChurnConfig, artifact_dir: str) -> Path:
    """The model folder a registry row names, confined to `models_dir`.

    Recorded relative to models_dir, so a copied warehouse (tests, backfills)
    loads its own files. An absolute path, a `..` or a symlink leading out of
    the folder is refused: the row may come from a copy someone else can edit.
    """
    relative = Path(str(artifact_dir))
    root = config.warehouse.models_dir.resolve()
    if not str(artifact_dir).strip() or relative.is_absolute() or ".." in relative.parts:
        raise RegistryError(
            f"registry artifact_dir {artifact_dir!r} is not a plain folder name inside {root} "
            "(absolute paths and '..' are refused); refusing to load it"
        )
    folder = (root / relative).resolve()
    if folder == root or not folder.is_relative_to(root):
        raise RegistryError(f"registry artifact_dir {artifact_dir!r} resolves to {folder}, outside {root}; "
                            "refusing to load it")
    return folder


# ---------------------------------------------------------------- signing

def signing_key(config: ChurnConfig) -> bytes:
    """$CHURN_MODEL_KEY, else the models folder's key file (created once, mode 0600)."""
    from_env = os.environ.get(KEY_ENV_VAR)
    if from_env:
        return from_env.encode()
    path = config.warehouse.models_dir / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise RegistryError(f"model signing key file {path} is empty") from None
        return key.encode()
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path.read_text().strip().encode()


def _signature(key: bytes, version: str, hashes: dict[str, str]) -> str:
    payload = json.dumps({"version": version, "files": hashes}, sort_keys=True).encode()
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def write_manifest(folder: Path, version: str, hashes: dict[str, str], key: bytes) -> None:
    """manifest.json: the version and every file's sha256, with their HMAC."""
    document = {"version": version, "files": dict(sorted(hashes.items())),
                "signature": _signature(key, version, hashes)}
    (folder / MANIFEST_FILE).write_text(json.dumps(document, indent=2))


def _signed_hashes(version: str, folder: Path, key: bytes) -> dict[str, str]:
    """The manifest's file hashes, after checking its signature and that it is this version's."""
    path = folder / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text())
        files, signature = dict(manifest["files"]), str(manifest["signature"])
        signed_version = str(manifest["version"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RegistryError(f"model {version}: manifest {path} is unreadable ({exc}); refusing to load it") from exc
    if not hmac.compare_digest(signature, _signature(key, signed_version, files)):
        raise RegistryError(f"model {version}: manifest {path} fails its signature check "
                            "(changed, or signed with another key); refusing to load it")
    if signed_version != version:
        raise RegistryError(f"model {version}: folder {folder} holds the signed manifest of model "
                            f"{signed_version}; the registry row points at another model's files")
    return files


def _check_artifacts(version: str, folder: Path, expected: dict[str, str]) -> None:
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            raise RegistryError(f"model {version}: artifact file {path} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise RegistryError(
                f"model {version}: artifact file {path} was changed after registration "
                f"(sha256 {actual[:12]}..., registered {digest[:12]}...); refusing to load it"
            )


# Modules that pickled model parts may name from before the package layout of
# ml/ (models registered then store e.g. `ml.model.ScoreCalibrator`).
RENAMED_MODULES = {
    "ml.model": "ml.modeling.model",
    "ml.explain": "ml.modeling.explain",
    "ml.evaluate": "ml.modeling.evaluate",
    "ml.reference": "ml.modeling.reference",
    "ml.contract": "ml.features.contract",
}


class _RenamingUnpickler(NumpyUnpickler):
    """joblib's unpickler, reading classes of moved modules from where they live now."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(RENAMED_MODULES.get(module, module), name)


def load_pickled_parts(path: Path) -> dict[str, Any]:
    """The joblib file of a model's preprocessing, estimator and calibrator (hash-checked before)."""
    with open(path, "rb") as handle:
        return _RenamingUnpickler(str(path), handle, ensure_native_byte_order=True).load()
def _is_trusted_registry(config: ChurnConfig, registry_db: Path | None) -> bool:
    """Only the build database is trusted for unsigned models: it is never shipped to BI."""
    return registry_db is None or registry_db.resolve() == config.warehouse.build_db.resolve()


def verified_hashes(config: ChurnConfig, version: str, row: dict[str, Any], folder: Path,
                    registry_db: Path | None) -> dict[str, str]:
    """Every artifact file's hash, checked against the signed manifest (or, for an unsigned model
    read from the build database, against its row), before any file is deserialized."""
    recorded = json.loads(row["artifact_sha256"])
    key = signing_key(config)
    if (folder / MANIFEST_FILE).exists():
        signed = _signed_hashes(version, folder, key)
        if recorded != signed:
            raise RegistryError(
                f"model {version}: the {REGISTRY.name} row's artifact_sha256 disagrees with the signed "
                f"manifest in {folder} (files {sorted(set(recorded) ^ set(signed)) or sorted(recorded)}); "
                "the registry row was tampered with; refusing to load it"
            )
        _check_artifacts(version, folder, signed)
        return signed
    if not _is_trusted_registry(config, registry_db):
        raise RegistryError(
            f"model {version}: folder {folder} has no signed manifest and the registry row comes from "
            f"{registry_db}, which is not trusted for unsigned models; run `churn score` (or a nightly) "
            "once to sign it from the build database"
        )
    _check_artifacts(version, folder, recorded)
    write_manifest(folder, version, recorded, key)
    log.warning("model %s had no signed manifest; its files match the build registry, manifest written", version)
    return recorded


def _load_parts(version: str, folder: Path, hashes: dict[str, str]) -> dict[str, Any]:
    """The pickled/skops parts, only ever called on files whose hashes were verified."""
    if PIPELINE_FILE in hashes:
        path = folder / PIPELINE_FILE
        untrusted = set(skops.io.get_untrusted_types(file=path))
        refused = sorted(untrusted - TRUSTED_TYPES)
        if refused:
            raise RegistryError(f"model {version}: {path} contains types outside the allow-list: "
                                f"{', '.join(refused)}; refusing to load it")
        return skops.io.load(path, trusted=sorted(untrusted))
    if LEGACY_PIPELINE_FILE in hashes:
        return joblib.load(folder / LEGACY_PIPELINE_FILE)
    raise RegistryError(f"model {version}: no model file ({PIPELINE_FILE} or {LEGACY_PIPELINE_FILE}) "
                        f"among its recorded artifacts {sorted(hashes)}")


def load_model(config: ChurnConfig, version: str, registry_db: Path | None = None) -> ChurnModel:
    """Load a registered model after confining its folder and verifying every file (see module doc).

    `registry_db` reads the registry row from another database, e.g. the published
    copy, so a long-running server never contends for the build database's lock.
    """
    row = _registry_row(config, version, registry_db)
    folder = artifact_folder(config, row["artifact_dir"])
    hashes = verified_hashes(config, version, row, folder, registry_db)
    if METADATA_FILE not in hashes:
        raise RegistryError(f"model {version}: {METADATA_FILE} is not among its recorded artifacts")
    document = json.loads((folder / METADATA_FILE).read_text())
    if document["algorithm"] == "xgboost" and BOOSTER_FILE not in hashes:
        raise RegistryError(f"model {version}: {BOOSTER_FILE} is not among its recorded artifacts")
    parts = _load_parts(version, folder, hashes)
    estimator = parts["estimator"]
    if document["algorithm"] == "xgboost":
        from xgboost import XGBClassifier

        estimator = XGBClassifier()
        estimator.load_model(str(folder / BOOSTER_FILE))
    pipeline = Pipeline([("preprocess", parts["preprocess"]), ("model", estimator)])
    # The operating threshold in force is the registry's (re-chosen without retraining);
    # metadata.json keeps the one chosen at training.
    operating = float_or_none(row.get("threshold"))
    return ChurnModel(
        pipeline=pipeline,
        calibrator=parts["calibrator"],
        contract=FeatureContract.from_dict(document["contract"]),
        algorithm=document["algorithm"],
        params=document["params"],
        threshold=float(document["threshold"]) if operating is None else operating,
        metadata=ModelMetadata.from_dict(document),
        version=version,
    )


def stored_predictions(config: ChurnConfig, version: str, registry_db: Path | None = None) -> pd.DataFrame | None:
    """The model's stored out-of-fold and out-of-time predictions (hash-checked), or None for older models."""
    row = _registry_row(config, version, registry_db)
    folder = artifact_folder(config, row["artifact_dir"])
    hashes = verified_hashes(config, version, row, folder, registry_db)
    if PREDICTIONS_FILE not in hashes:
        return None
    return pd.read_parquet(folder / PREDICTIONS_FILE)


# ---------------------------------------------------------------- the champion

def champion_version(config: ChurnConfig) -> str | None:
    """The current champion of the active dataset, or None before the first model."""
    db = config.warehouse.build_db
    if not db.exists():
        return None
    with connect(db, settings=config.warehouse.engine) as session:
        return champion_in(session, config.dataset.name)


def load_champion(config: ChurnConfig) -> ChurnModel | None:
    """The active dataset's champion model (hash-checked), or None if there is none."""
    version = champion_version(config)
    return load_model(config, version) if version else None


def registry_frame(config: ChurnConfig) -> pd.DataFrame:
    """All registered models of the active dataset, newest first."""
    db = config.warehouse.build_db
    if not db.exists():
        return pd.DataFrame()
    with connect(db, settings=config.warehouse.engine) as session:
        if not session.exists(REGISTRY):
            return pd.DataFrame()
        return session.frame(
            f"select * from {quote(REGISTRY.name)} where dataset = ? order by registered_at desc",
            [config.dataset.name],
        )


def _evaluation_rows(config: ChurnConfig, model: ChurnModel, data: Reader | None = None) -> pd.DataFrame:
    """The challenger's out-of-time (or hold-out) rows, re-read from the feature mart (on `data`, or the
    build database)."""
    with mart_reader(config, data) as mart:
        return load_evaluation_rows(mart, config, model.contract, model.metadata.validation)


@dataclass(frozen=True)
class SameRows:
    """Both models' selection metric on the same rows, and how those rows were obtained."""

    challenger: float
    champion: float | None
    rows: int
    basis: str
    # Every classification metric of both on those rows ({"challenger": ..., "champion": ...}), when computed.
    metrics: dict[str, dict[str, float]] | None = None


def _metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    return {name: float(value) for name, value in classification_metrics(y, p, threshold).items()}


def _rescored(config: ChurnConfig, challenger: ChurnModel, champion: ChurnModel, rows: pd.DataFrame) -> SameRows:
    """The champion re-scored on the challenger's rows (its features mean what they meant)."""
    metric = config.problem.selection_metric
    y = rows[challenger.contract.label].to_numpy(dtype=int)
    mine = _metrics(y, challenger.predict_proba(rows), challenger.threshold)
    try:
        theirs_p = champion.predict_proba(rows)
    except ContractError as exc:
        return SameRows(mine[metric], None, len(rows),
                        f"champion {champion.version} cannot score the current mart ({exc})", {"challenger": mine})
    theirs = _metrics(y, theirs_p, champion.threshold)
    return SameRows(mine[metric], theirs[metric], len(rows),
                    f"{metric} on {len(rows)} shared evaluation rows (champion re-scored)",
                    {"challenger": mine, "champion": theirs})


def _from_stored(config: ChurnConfig, challenger: ChurnModel, champion: ChurnModel, rows: pd.DataFrame,
                 why: str) -> SameRows:
    """The champion's stored held-out predictions (its own definitions) against the challenger's, same rows."""
    metric = config.problem.selection_metric
    c = challenger.contract
    y = rows[c.label].to_numpy(dtype=int)
    mine_p = challenger.predict_proba(rows)
    stored = stored_predictions(config, str(champion.version))
    recorded = ((champion.metadata.metrics or {}).get("out_of_time") or {}).get(metric)
    if stored is not None:
        held = stored[stored["split"] == SPLIT_OUT_OF_TIME]
        keyed = pd.DataFrame({"key": rows[c.key].to_numpy(), "as_of": pd.to_datetime(rows[c.as_of]).dt.date.astype(str),
                              "y": y, "p": mine_p})
        same = keyed.merge(held, on=["key", "as_of"])
        if len(same) and 0 < same["y"].sum() < len(same):
            mine = _metrics(same["y"].to_numpy(), same["p"].to_numpy(), challenger.threshold)
            theirs = _metrics(same["y"].to_numpy(), same["probability"].to_numpy(), champion.threshold)
            return SameRows(
                mine[metric], theirs[metric], len(same),
                f"{metric} on {len(same)} (key, as_of) rows both were held out on, the champion's side from its "
                f"stored predictions ({why})",
                {"challenger": mine, "champion": theirs},
            )
    mine = _metrics(y, mine_p, challenger.threshold)[metric]
    if recorded is None:
        return SameRows(mine, None, len(rows), f"{why}; the champion has no stored predictions to compare with")
    return SameRows(mine, float(recorded), len(rows),
                    f"{metric} of the challenger on its {len(rows)} held-out rows vs the champion's recorded "
                    f"out-of-time {metric} on ITS held-out rows (no shared rows; {why})")


def promotion_rule(config: ChurnConfig, same: SameRows) -> tuple[bool, str]:
    """Promote only a challenger better than the champion by more than promotion.margin; say which rule decided."""
    margin = config.promotion.margin
    if same.champion is None:
        return True, f"{same.basis}: promoted (nothing to compare with)"
    promoted = same.challenger > same.champion + margin
    if promoted:
        verdict = "promoted"
    elif abs(same.challenger - same.champion) <= 1e-12:
        verdict = "tie: champion kept"
    else:
        verdict = "champion kept"
    return promoted, (f"{same.basis}: challenger {same.challenger:.4f} vs champion {same.champion:.4f}; "
                      f"rule: promote only when higher by more than promotion.margin {margin:g} -> {verdict}")


def compare_with_champion(
    config: ChurnConfig, challenger: ChurnModel, evaluation_frame: pd.DataFrame | None = None,
    data: Reader | None = None,
) -> Comparison:
    """Promote the first model of a dataset; later ones by `promotion_rule` on the same rows (module doc).

    The rows are the challenger's own evaluation rows (`evaluation_frame`, or
    re-read from the mart through its metadata's `validation`). The mart (also
    for the champion's feature-definitions check) is read on `data` when given
    (Spark's warehouse), else in the build database.
    """
    current = champion_version(config)
    if current is None:
        return Comparison(promoted=True, decision="first model for this dataset")
    champion = load_model(config, current)
    rows = evaluation_frame if evaluation_frame is not None else _evaluation_rows(config, challenger, data)
    with mart_reader(config, data) as mart:
        check = check_definitions(mart, config, champion)
    if check.affects_model:
        same = _from_stored(config, challenger, champion, rows, check.describe())
    else:
        same = _rescored(config, challenger, champion, rows)
    promoted, decision = promotion_rule(config, same)
    return Comparison(
        promoted=promoted,
        decision=decision,
        compared_with=current,
        champion_metric=same.champion,
        challenger_metric=same.challenger,
        comparison_rows=same.rows,
        metrics=same.metrics,
    )


# ---------------------------------------------------------------- registering

def _new_registry_row(
    config: ChurnConfig, model: ChurnModel, run_id: str, oot_metrics: dict[str, Any],
    comparison: Comparison, hashes: dict[str, str], now: dt.datetime,
) -> pd.DataFrame:
    """The new version's model_registry row, as a one-row frame for `Session.append`."""
    metric = config.problem.selection_metric
    row = {
        "model_version": model.version,
        "dataset": config.dataset.name,
        "feature_mart": config.dataset.feature_mart,
        "run_id": run_id,
        "algorithm": model.algorithm,
        "status": comparison.status,
        "registered_at": now,
        "status_changed_at": now,
        "threshold": float(model.threshold),
        "selection_metric": metric,
        "oot_metric": float_or_none(oot_metrics.get(metric)),
        "compared_with": comparison.compared_with,
        "champion_metric_same_rows": comparison.champion_metric,
        "challenger_metric_same_rows": comparison.challenger_metric,
        "comparison_rows": comparison.comparison_rows,
        "decision": comparison.decision,
        "artifact_dir": model.version,  # relative to warehouse.models_dir
        "artifact_sha256": to_json(hashes, sort_keys=True),
        "definitions_sha256": model_definitions_sha256(model),
        "comparison_metrics": None if comparison.metrics is None else to_json(comparison.metrics, sort_keys=True),
        **success_columns(config, oot_metrics),
    }
    # object columns: the declared table types the values, a NULL stays NULL whatever the column.
    return pd.DataFrame({name: pd.Series([value], dtype=object) for name, value in row.items()})


def success_columns(config: ChurnConfig, oot_metrics: dict[str, Any]) -> dict[str, Any]:
    """The success criterion and whether the held-out metric meets it (None when not measured)."""
    metric, target = config.problem.success_metric, config.problem.success_target
    value = float_or_none(oot_metrics.get(metric))
    return {"success_metric": metric, "success_target": float(target),
            "meets_success_target": None if value is None else bool(value >= target)}


def _write_registry_row(
    session: Session, config: ChurnConfig, row: pd.DataFrame, promoted: bool, now: dt.datetime
) -> None:
    """Retire the old champion (when promoting) and add the new row, atomically."""
    with session.transaction():
        session.create(REGISTRY)
        session.add_missing_columns(REGISTRY, REGISTRY.column_types)  # registries from before a column existed
        if promoted:
            session.execute(
                f"update {quote(REGISTRY.name)} set status = ?, status_changed_at = ? "
                "where dataset = ? and status = ?",
                [STATUS_RETIRED, now, config.dataset.name, STATUS_CHAMPION],
            )
        session.append(REGISTRY, row)


def register(
    config: ChurnConfig,
    model: ChurnModel,
    run_id: str,
    oot_metrics: dict[str, Any],
    evaluation_frame: pd.DataFrame | None = None,
    predictions: pd.DataFrame | None = None,
    data: Reader | None = None,
) -> Registration:
    """Store `model` as a new version and decide champion vs challenger.

    The first model of a dataset becomes champion. Later ones are promoted only if
    their selection metric beats the champion's on the challenger's own evaluation
    rows (`evaluation_frame`, or re-read from the mart via model.metadata.validation);
    the old champion is then retired. Artifacts are written to a temporary folder and
    renamed into place, and removed again if the registry row cannot be written.
    The caller's `model` is left as it was; the result carries the registered copy.
    `data` is where the mart is read for the comparison (None: the build database);
    the artifacts and the registry row always go to the models folder and the build database.
    """
    registered = dataclasses.replace(model, version=new_version_id(model.algorithm))
    version = registered.version
    comparison = compare_with_champion(config, registered, evaluation_frame, data)
    log.info("model %s: %s -> %s", version, comparison.decision, comparison.status)

    final_dir = config.warehouse.models_dir / version
    staging_dir = config.warehouse.models_dir / f".{version}.partial"
    try:
        hashes = save_artifacts(registered, staging_dir, signing_key(config), predictions)
        staging_dir.rename(final_dir)
        now = dt.datetime.now()
        row = _new_registry_row(config, registered, run_id, oot_metrics, comparison, hashes, now)
        with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
            _write_registry_row(session, config, row, comparison.promoted, now)
    except Exception:
        shutil.rmtree(staging_dir, ignore_errors=True)
        shutil.rmtree(final_dir, ignore_errors=True)
        raise
    return Registration.of(registered, comparison)


# ---------------------------------------------------------------- reads for other stages


@dataclass(frozen=True)
class ModelRecord:
    """What other stages need to know of one registered model."""

    model_version: str
    dataset: str
    algorithm: str
    status: str
    threshold: float | None
    run_id: str | None
    decision: str | None = None  # why it became champion or challenger (the registry's comparison)
    compared_with: str | None = None  # the champion it was judged against (None: first model)
    selection_metric: str | None = None
    comparison_rows: int | None = None
    # Both models' metrics on those rows ({"challenger": ..., "champion": ...}); None before it was recorded.
    comparison_metrics: dict[str, dict[str, float]] | None = None
    success_metric: str | None = None
    success_target: float | None = None
    meets_success_target: bool | None = None  # None: not measured, or registered before it was recorded

    @property
    def misses_success_target(self) -> bool:
        return self.meets_success_target is False

    def success_warning(self) -> str:
        return (f"champion {self.model_version} ({self.dataset}) misses the success target on its hold-out: "
                f"{self.success_metric} >= {self.success_target} not met; it is marked so in model_registry "
                "(meets_success_target = false)")


def champion_in(session: Session, dataset: str) -> str | None:
    """The champion version of `dataset` in the registry this session sees (build or published)."""
    if not session.exists(REGISTRY):
        return None
    return session.scalar(
        f"select model_version from {quote(REGISTRY.name)} where dataset = ? and status = ? "
        "order by status_changed_at desc limit 1",
        [dataset, STATUS_CHAMPION],
    )


def model_record(session: Session, version: str) -> ModelRecord | None:
    """One model's registry facts, or None when the registry or the version is absent."""
    if not session.exists(REGISTRY):
        return None
    # select *: a registry written before a column existed lacks it, and reads it as NULL.
    frame = session.frame(f"select * from {quote(REGISTRY.name)} where model_version = ?", [version])
    if frame.empty:
        return None
    row = frame.iloc[0].to_dict()

    def value(column: str) -> Any:
        found = row.get(column)
        return None if is_missing(found) else found

    metrics, rows, meets = value("comparison_metrics"), value("comparison_rows"), value("meets_success_target")
    return ModelRecord(
        row["model_version"], row["dataset"], row["algorithm"], row["status"], float_or_none(row["threshold"]),
        value("run_id"), value("decision"),
        compared_with=value("compared_with"),
        selection_metric=value("selection_metric"),
        comparison_rows=None if rows is None else int(rows),
        comparison_metrics=None if metrics is None else json.loads(metrics),
        success_metric=value("success_metric"),
        success_target=float_or_none(value("success_target")),
        meets_success_target=None if meets is None else bool(meets),
    )


def champion_record(config: ChurnConfig) -> ModelRecord | None:
    """The active dataset's champion's registry facts (None before the first model)."""
    db = config.warehouse.build_db
    if not db.exists():
        return None
    with connect(db, read_only=True, settings=config.warehouse.engine) as session:
        version = champion_in(session, config.dataset.name)
        return None if version is None else model_record(session, version)


def model_thresholds(session: Session) -> dict[str, float]:
    """Decision threshold of every registered model, by version."""
    if not session.exists(REGISTRY):
        return {}
    rows = session.rows(f"select model_version, threshold from {quote(REGISTRY.name)}")
    return {version: float(threshold) for version, threshold in rows if threshold is not None}


def version_on_definitions(session: Session, dataset: str, definitions_sha256: str) -> ModelRecord | None:
    """The newest model of `dataset` trained on these feature definitions (any status), or None."""
    if not session.exists(REGISTRY) or "definitions_sha256" not in session.columns(REGISTRY):
        return None
    row = session.one(
        f"select model_version from {quote(REGISTRY.name)} where dataset = ? and definitions_sha256 = ? "
        "order by registered_at desc limit 1",
        [dataset, definitions_sha256],
    )
    return model_record(session, row[0]) if row else None


# ---------------------------------------------------------------- changes by hand


class PromotionError(RegistryError):
    """A model cannot be promoted or rolled back to (unknown, other dataset, already champion, none before)."""


@dataclass(frozen=True)
class ChampionChange:
    """What `promote` / `rollback` did."""

    event: str
    version: str
    previous_champion: str | None
    reason: str
    actor: str


def set_threshold(session: Session, version: str, threshold: float) -> None:
    """The operating threshold in force for `version` (written by ml.modeling.operating_point)."""
    session.execute(f"update {quote(REGISTRY.name)} set threshold = ? where model_version = ?",
                    [float(threshold), version])


def previous_champion(session: Session, dataset: str) -> str | None:
    """The champion before the current one: the model of `dataset` retired most recently."""
    if not session.exists(REGISTRY):
        return None
    return session.scalar(
        f"select model_version from {quote(REGISTRY.name)} where dataset = ? and status = ? "
        "order by status_changed_at desc limit 1",
        [dataset, STATUS_RETIRED],
    )


def promote(config: ChurnConfig, version: str, reason: str, actor: str,
            event: str = EVENT_PROMOTE) -> ChampionChange:
    """Make `version` the champion by hand, retiring the current one; recorded with who and why.

    The model is loaded (every file hash-checked) before anything changes, so a
    damaged artifact is never promoted. Scores follow at the next `churn score`
    or nightly, with its own operating point.
    """
    if not reason.strip():
        raise PromotionError("a reason is required (--reason): it is recorded in model_registry_events")
    row = _registry_row(config, version)
    if row["dataset"] != config.dataset.name:
        raise PromotionError(f"model {version} belongs to dataset {row['dataset']!r}, not {config.dataset.name!r}")
    if row["status"] == STATUS_CHAMPION:
        raise PromotionError(f"model {version} is already the champion of dataset {config.dataset.name!r}")
    load_model(config, version)  # refuses a changed or unsigned artifact
    now = dt.datetime.now()
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session, session.transaction():
        current = champion_in(session, config.dataset.name)
        session.execute(
            f"update {quote(REGISTRY.name)} set status = ?, status_changed_at = ? where dataset = ? and status = ?",
            [STATUS_RETIRED, now, config.dataset.name, STATUS_CHAMPION],
        )
        note = (f"{event} by {actor} at {now:%Y-%m-%d %H:%M}: {reason} "
                f"(was {row['status']}; registered: {row['decision']})")
        session.execute(
            f"update {quote(REGISTRY.name)} set status = ?, status_changed_at = ?, decision = ? "
            "where model_version = ?",
            [STATUS_CHAMPION, now, note, version],
        )
        session.append(EVENTS, pd.DataFrame([{
            "dataset": config.dataset.name, "event": event, "model_version": version, "previous_champion": current,
            "reason": reason, "actor": actor, "changed_at": now,
        }]))
    log.info("%s: %s is champion of %s (was %s): %s", event, version, config.dataset.name, current, reason)
    return ChampionChange(event, version, current, reason, actor)


def rollback(config: ChurnConfig, reason: str, actor: str) -> ChampionChange:
    """Bring back the previous champion (the model retired most recently); recorded like `promote`."""
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        target = previous_champion(session, config.dataset.name)
    if target is None:
        raise PromotionError(f"dataset {config.dataset.name!r} has no earlier champion to roll back to")
    return promote(config, target, reason, actor, event=EVENT_ROLLBACK)


def champion_events(session: Session, dataset: str) -> pd.DataFrame:
    """Every champion change made by hand for `dataset`, newest first."""
    if not session.exists(EVENTS):
        return pd.DataFrame(columns=EVENTS.column_names)
    return session.frame(f"select * from {quote(EVENTS.name)} where dataset = ? order by changed_at desc", [dataset])

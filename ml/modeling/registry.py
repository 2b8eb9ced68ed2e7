"""The model registry: versioned artifacts on disk, their status in `model_registry`.

A new model only replaces the champion when it is better on the SAME rows: the
champion is re-scored on the challenger's out-of-time rows, because metrics
measured on different months are not comparable (churn rates move). Each
artifact's sha256 is recorded at registration and checked at load, so a model
file changed after it was judged is refused rather than silently used to score.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import platform
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.pipeline import Pipeline

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract
from ml.modeling.evaluate import classification_metrics
from ml.logs import get_logger
from ml.modeling.model import ChurnModel
from ml.warehouse import Session, connect, float_or_none, quote, table_exists

log = get_logger("registry")

REGISTRY_TABLE = "model_registry"
METADATA_FILE = "metadata.json"
PIPELINE_FILE = "model.joblib"
BOOSTER_FILE = "xgboost_model.json"

STATUS_CHAMPION = "champion"
STATUS_CHALLENGER = "challenger"
STATUS_RETIRED = "retired"

REGISTRY_DDL = f"""
create table if not exists {REGISTRY_TABLE} (
    model_version varchar primary key,
    dataset varchar not null,
    feature_mart varchar not null,
    run_id varchar,
    algorithm varchar not null,
    status varchar not null,
    registered_at timestamp not null,
    status_changed_at timestamp not null,
    threshold double,
    selection_metric varchar,
    oot_metric double,
    compared_with varchar,
    champion_metric_same_rows double,
    challenger_metric_same_rows double,
    comparison_rows bigint,
    decision varchar,
    artifact_dir varchar not null,
    artifact_sha256 varchar not null
)
"""


class RegistryError(RuntimeError):
    """A model is missing from the registry, or its artifact is missing or changed."""


def library_versions() -> dict[str, str]:
    """Versions that must match for a pickled pipeline to behave the same at load."""
    import xgboost

    return {
        "python": platform.python_version(),
        "scikit-learn": sklearn.__version__,
        "xgboost": xgboost.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "joblib": joblib.__version__,
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


def _ensure_table(con) -> None:
    con.execute(REGISTRY_DDL)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (dt.date, dt.datetime, pd.Timestamp)):
        return value.isoformat()
    return str(value)


def save_artifacts(model: ChurnModel, folder: Path) -> dict[str, str]:
    """Write the model's files into `folder`; return file name -> sha256.

    XGBoost's booster goes to its own JSON format (stable across library versions);
    preprocessing, any non-XGBoost estimator and the calibrator go to joblib.
    """
    folder.mkdir(parents=True, exist_ok=True)
    estimator = model.pipeline.named_steps["model"]
    hashes: dict[str, str] = {}
    stored_estimator = estimator
    if model.algorithm == "xgboost":
        estimator.save_model(str(folder / BOOSTER_FILE))
        hashes[BOOSTER_FILE] = sha256_file(folder / BOOSTER_FILE)
        stored_estimator = None
    joblib.dump(
        {
            "preprocess": model.pipeline.named_steps["preprocess"],
            "estimator": stored_estimator,
            "calibrator": model.calibrator,
        },
        folder / PIPELINE_FILE,
    )
    hashes[PIPELINE_FILE] = sha256_file(folder / PIPELINE_FILE)
    metadata = {
        "version": model.version,
        "algorithm": model.algorithm,
        "params": model.params,
        "threshold": model.threshold,
        "calibration": model.calibrator.method,
        "contract": model.contract.to_dict(),
        "library_versions": library_versions(),
        "artifact_sha256": dict(hashes),
        **{k: v for k, v in model.metadata.items() if k not in ("library_versions", "artifact_sha256")},
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, default=_json_default))
    hashes[METADATA_FILE] = sha256_file(folder / METADATA_FILE)
    return hashes


def _registry_row(config: ChurnConfig, version: str, registry_db: Path | None = None) -> dict[str, Any]:
    db = registry_db or config.warehouse.build_db
    if not db.exists():
        raise RegistryError(f"no model registry: database {db} does not exist")
    # Another database (the published copy) is only ever read: servers must not lock it.
    with connect(db, read_only=registry_db is not None) as con:
        if not table_exists(con, REGISTRY_TABLE):
            raise RegistryError(f"no model registry: table {REGISTRY_TABLE!r} not found in {db}")
        frame = con.execute(
            f"select * from {REGISTRY_TABLE} where model_version = ?", [version]
        ).df()
    if frame.empty:
        raise RegistryError(f"model version {version!r} is not in {REGISTRY_TABLE} ({db})")
    return frame.iloc[0].to_dict()


def artifact_folder(config: ChurnConfig, artifact_dir: str) -> Path:
    """Artifact folders are recorded relative to models_dir, so a copied warehouse
    (tests, backfills) loads its own files, not the original's."""
    folder = Path(artifact_dir)
    return folder if folder.is_absolute() else config.warehouse.models_dir / folder


def load_model(config: ChurnConfig, version: str, registry_db: Path | None = None) -> ChurnModel:
    """Load a registered model after checking every artifact file's sha256.

    `registry_db` reads the registry row from another database, e.g. the published
    copy, so a long-running server never contends for the build database's lock.
    """
    row = _registry_row(config, version, registry_db)
    folder = artifact_folder(config, row["artifact_dir"])
    expected: dict[str, str] = json.loads(row["artifact_sha256"])
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
    metadata = json.loads((folder / METADATA_FILE).read_text())
    parts = joblib.load(folder / PIPELINE_FILE)
    estimator = parts["estimator"]
    if metadata["algorithm"] == "xgboost":
        from xgboost import XGBClassifier

        estimator = XGBClassifier()
        estimator.load_model(str(folder / BOOSTER_FILE))
    pipeline = Pipeline([("preprocess", parts["preprocess"]), ("model", estimator)])
    reserved = {"version", "algorithm", "params", "threshold", "calibration", "contract"}
    return ChurnModel(
        pipeline=pipeline,
        calibrator=parts["calibrator"],
        contract=FeatureContract.from_dict(metadata["contract"]),
        algorithm=metadata["algorithm"],
        params=metadata["params"],
        threshold=float(metadata["threshold"]),
        metadata={k: v for k, v in metadata.items() if k not in reserved},
        version=version,
    )


def champion_version(config: ChurnConfig) -> str | None:
    """The current champion of the active dataset, or None before the first model."""
    db = config.warehouse.build_db
    if not db.exists():
        return None
    with connect(db) as con:
        if not table_exists(con, REGISTRY_TABLE):
            return None
        row = con.execute(
            f"select model_version from {REGISTRY_TABLE} where dataset = ? and status = ? "
            "order by status_changed_at desc limit 1",
            [config.dataset.name, STATUS_CHAMPION],
        ).fetchone()
    return row[0] if row else None


def load_champion(config: ChurnConfig) -> ChurnModel | None:
    """The active dataset's champion model (hash-checked), or None if there is none."""
    version = champion_version(config)
    return load_model(config, version) if version else None


def registry_frame(config: ChurnConfig) -> pd.DataFrame:
    """All registered models of the active dataset, newest first."""
    db = config.warehouse.build_db
    if not db.exists():
        return pd.DataFrame()
    with connect(db) as con:
        if not table_exists(con, REGISTRY_TABLE):
            return pd.DataFrame()
        return con.execute(
            f"select * from {REGISTRY_TABLE} where dataset = ? order by registered_at desc",
            [config.dataset.name],
        ).df()


def _evaluation_rows(config: ChurnConfig, model: ChurnModel) -> pd.DataFrame:
    """The challenger's out-of-time (or hold-out) rows, re-read from the feature mart."""
    from ml.modeling.train import load_evaluation_rows

    return load_evaluation_rows(config, model.contract, model.metadata["validation"])


def _compare(
    config: ChurnConfig, challenger: ChurnModel, champion: ChurnModel, rows: pd.DataFrame
) -> tuple[float, float | None, str]:
    """(challenger metric, champion metric or None, reason) on the same rows."""
    metric = config.problem.selection_metric
    y = rows[challenger.contract.label].to_numpy(dtype=int)
    mine = classification_metrics(y, challenger.predict_proba(rows), challenger.threshold)[metric]
    try:
        theirs_p = champion.predict_proba(rows)
    except ContractError as exc:
        return mine, None, f"champion {champion.version} cannot score the current mart ({exc})"
    theirs = classification_metrics(y, theirs_p, champion.threshold)[metric]
    return mine, theirs, f"{metric} on {len(rows)} shared evaluation rows: challenger {mine:.4f} vs champion {theirs:.4f}"


def register(
    config: ChurnConfig,
    model: ChurnModel,
    run_id: str,
    oot_metrics: dict[str, Any],
    evaluation_frame: pd.DataFrame | None = None,
) -> str:
    """Store `model` as a new version and decide champion vs challenger.

    The first model of a dataset becomes champion. Later ones are promoted only if
    their selection metric beats the champion's on the challenger's own evaluation
    rows (`evaluation_frame`, or re-read from the mart via model.metadata['validation']);
    the old champion is then retired. Artifacts are written to a temporary folder and
    renamed into place, and removed again if the registry row cannot be written.
    """
    version = new_version_id(model.algorithm)
    model.version = version
    models_dir = config.warehouse.models_dir
    final_dir = models_dir / version
    staging_dir = models_dir / f".{version}.partial"
    metric = config.problem.selection_metric

    current = champion_version(config)
    compared_with = None
    champion_metric = None
    challenger_metric = None
    comparison_rows = None
    if current is None:
        promote, decision = True, "first model for this dataset"
    else:
        champion = load_model(config, current)
        rows = evaluation_frame if evaluation_frame is not None else _evaluation_rows(config, model)
        challenger_metric, champion_metric, decision = _compare(config, model, champion, rows)
        compared_with, comparison_rows = current, len(rows)
        promote = champion_metric is None or challenger_metric > champion_metric
    log.info("model %s: %s -> %s", version, decision, STATUS_CHAMPION if promote else STATUS_CHALLENGER)

    try:
        hashes = save_artifacts(model, staging_dir)
        staging_dir.rename(final_dir)
        now = dt.datetime.now()
        row = {
            "model_version": version,
            "dataset": config.dataset.name,
            "feature_mart": config.dataset.feature_mart,
            "run_id": run_id,
            "algorithm": model.algorithm,
            "status": STATUS_CHAMPION if promote else STATUS_CHALLENGER,
            "registered_at": now,
            "status_changed_at": now,
            "threshold": float(model.threshold),
            "selection_metric": metric,
            "oot_metric": _float_or_none(oot_metrics.get(metric)),
            "compared_with": compared_with,
            "champion_metric_same_rows": champion_metric,
            "challenger_metric_same_rows": challenger_metric,
            "comparison_rows": comparison_rows,
            "decision": decision,
            "artifact_dir": version,  # relative to warehouse.models_dir
            "artifact_sha256": json.dumps(hashes, sort_keys=True),
        }
        with connect(config.warehouse.build_db) as con:
            _ensure_table(con)
            con.execute("begin transaction")
            try:
                if promote:
                    con.execute(
                        f"update {REGISTRY_TABLE} set status = ?, status_changed_at = ? "
                        "where dataset = ? and status = ?",
                        [STATUS_RETIRED, now, config.dataset.name, STATUS_CHAMPION],
                    )
                columns = ", ".join(row)
                placeholders = ", ".join("?" for _ in row)
                con.execute(
                    f"insert into {REGISTRY_TABLE} ({columns}) values ({placeholders})",
                    list(row.values()),
                )
                con.execute("commit")
            except Exception:
                con.execute("rollback")
                raise
    except Exception:
        shutil.rmtree(staging_dir, ignore_errors=True)
        shutil.rmtree(final_dir, ignore_errors=True)
        model.version = None
        raise
    return version


def _float_or_none(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if np.isnan(value) else value


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


def champion_in(session: Session, dataset: str) -> str | None:
    """The champion version of `dataset` in the registry this session sees (build or published)."""
    if not session.exists(REGISTRY_TABLE):
        return None
    return session.scalar(
        f"select model_version from {quote(REGISTRY_TABLE)} where dataset = ? and status = ? "
        "order by status_changed_at desc limit 1",
        [dataset, STATUS_CHAMPION],
    )


def model_record(session: Session, version: str) -> ModelRecord | None:
    """One model's registry facts, or None when the registry or the version is absent."""
    if not session.exists(REGISTRY_TABLE):
        return None
    row = session.one(
        f"select model_version, dataset, algorithm, status, threshold, run_id from {quote(REGISTRY_TABLE)} "
        "where model_version = ?",
        [version],
    )
    if row is None:
        return None
    return ModelRecord(row[0], row[1], row[2], row[3], float_or_none(row[4]), row[5])


def model_thresholds(session: Session) -> dict[str, float]:
    """Decision threshold of every registered model, by version."""
    if not session.exists(REGISTRY_TABLE):
        return {}
    rows = session.rows(f"select model_version, threshold from {quote(REGISTRY_TABLE)}")
    return {version: float(threshold) for version, threshold in rows if threshold is not None}

"""The one typed configuration object every stage reads.

`churn.yml` states the problem (target, horizon, success metric) and where
everything lives. Loading it once into frozen dataclasses means a typo fails at
start-up with the key's name instead of deep inside a stage, and no stage keeps
its own copy of a value.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_ENV_VAR = "CHURN_CONFIG"
DEFAULT_CONFIG_NAME = "churn.yml"


class ConfigError(ValueError):
    """The configuration file is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ProblemConfig:
    entity: str
    entity_key: str
    as_of_column: str
    target: str
    horizon_days: int
    success_metric: str
    success_target: float
    selection_metric: str
    baseline: str
    snapshot_cadence: str
    run_cadence: str


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    description: str
    landing_dir: Path
    landing_format: str
    feature_mart: str
    generate_if_empty: bool


@dataclass(frozen=True)
class WarehouseConfig:
    dir: Path
    build_db: Path
    published_db: Path
    models_dir: Path
    reports_dir: Path
    dbt_project_dir: Path
    expectations_dir: Path


@dataclass(frozen=True)
class GeneratorConfig:
    customers: int
    start_date: dt.date
    months: int
    seed: int
    oracle_dir: Path
    drift_from: dt.date | None


@dataclass(frozen=True)
class TrainingConfig:
    cv_folds: int
    out_of_time_snapshots: int
    search_iterations: int
    calibration: str
    random_state: int
    max_training_rows: int
    cost_missed_churner: float | None
    cost_wasted_offer: float | None


# The risk bands, highest first. They are derived from the model's decision so a
# band can never contradict `will_churn`: high and medium are flagged, low is not.
RISK_BANDS = ("high", "medium", "low")


@dataclass(frozen=True)
class ScoringConfig:
    # A flagged customer is "high" when the calibrated probability also reaches
    # this (so the band's expected precision is at least this share); else "medium".
    high_risk_probability: float
    top_reasons: int

    @property
    def risk_band_names(self) -> tuple[str, ...]:
        return RISK_BANDS


@dataclass(frozen=True)
class MonitoringConfig:
    psi_bins: int
    psi_threshold: float
    distance_threshold: float
    max_p_value: float
    dataset_drift_share: float
    top_features: int
    retrain_every_days: int
    recall_margin: float
    reference_quantiles: int
    null_share_jump: float
    new_category_share: float
    backfill_months: int
    backfill_every: str


@dataclass(frozen=True)
class QualityConfig:
    label_share_band: tuple[float, float]
    row_count_tolerance: float
    chunk_rows: int


@dataclass(frozen=True)
class ChurnConfig:
    """Everything the pipeline knows about the problem and its environment."""

    root: Path
    source_file: Path
    problem: ProblemConfig
    dataset: DatasetConfig
    datasets: dict[str, DatasetConfig]
    warehouse: WarehouseConfig
    generator: GeneratorConfig
    training: TrainingConfig
    scoring: ScoringConfig
    monitoring: MonitoringConfig
    quality: QualityConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    def with_dataset(self, name: str) -> ChurnConfig:
        """The same configuration pointed at another dataset profile."""
        if name not in self.datasets:
            raise ConfigError(
                f"{self.source_file}: unknown dataset {name!r}; "
                f"known: {', '.join(sorted(self.datasets))}"
            )
        return dataclasses.replace(self, dataset=self.datasets[name])

    def replace_paths(self, **warehouse_paths: Path) -> ChurnConfig:
        """A copy with some warehouse paths moved (tests, benchmarks, backfills)."""
        return dataclasses.replace(
            self, warehouse=dataclasses.replace(self.warehouse, **warehouse_paths)
        )

    def fingerprint(self) -> str:
        """Stable hash of the settings, recorded with every model run."""
        payload = json.dumps(self.raw, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def find_config_file(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config file: an explicit path, $CHURN_CONFIG, or churn.yml in cwd or above."""
    if explicit:
        path = Path(explicit)
    elif os.environ.get(CONFIG_ENV_VAR):
        path = Path(os.environ[CONFIG_ENV_VAR])
    else:
        here = Path.cwd().resolve()
        for folder in (here, *here.parents):
            if (folder / DEFAULT_CONFIG_NAME).is_file():
                return folder / DEFAULT_CONFIG_NAME
        # Fall back to the repository the package was installed from (editable install).
        path = Path(__file__).resolve().parent.parent / DEFAULT_CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    return path.resolve()


def _read_raw(source: Path) -> dict[str, Any]:
    """The file's YAML as a mapping; an empty file is an empty mapping."""
    try:
        return yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from exc


def _section(raw: dict[str, Any], name: str, source: Path) -> dict[str, Any]:
    value = raw.get(name)
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: section '{name}' is missing or not a mapping")
    return value


def _build(cls: type, values: dict[str, Any], section: str, source: Path, **converted: Any):
    """Construct a section dataclass, naming unknown or missing keys.

    Unknown keys are judged on the file's own keys, missing ones after the
    converted values are merged in, so a typo is named as the user wrote it.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in '{section}': {', '.join(sorted(unknown))}")
    merged = {**values, **converted}
    missing = names - set(merged)
    if missing:
        raise ConfigError(f"{source}: missing key(s) in '{section}': {', '.join(sorted(missing))}")
    return cls(**merged)


def _date(value: Any) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    return dt.date.fromisoformat(str(value))


def _resolve(value: Any, root: Path) -> Path:
    """A configured path; relative ones are relative to the config file's folder."""
    path = Path(str(value))
    return path if path.is_absolute() else root / path


def _problem(raw: dict[str, Any], source: Path) -> ProblemConfig:
    problem = _build(ProblemConfig, _section(raw, "problem", source), "problem", source)
    if not 0 < problem.success_target <= 1:
        raise ConfigError(f"{source}: problem.success_target must be in (0, 1]")
    if problem.selection_metric not in ("pr_auc", "roc_auc"):
        raise ConfigError(f"{source}: problem.selection_metric must be pr_auc or roc_auc")
    return problem


def _datasets(raw: dict[str, Any], source: Path) -> dict[str, DatasetConfig]:
    """Every dataset profile, keyed by its name (which is also its `name` field)."""
    return {
        name: _build(
            DatasetConfig,
            {**values, "name": name},
            f"datasets.{name}",
            source,
            landing_dir=_resolve(values.get("landing_dir", ""), source.parent),
        )
        for name, values in _section(raw, "datasets", source).items()
    }


def _chosen_dataset(
    raw: dict[str, Any], datasets: dict[str, DatasetConfig], requested: str | None, source: Path
) -> DatasetConfig:
    """The active profile: the caller's choice, else $CHURN_DATASET, else the file's `dataset`."""
    chosen = requested or os.environ.get("CHURN_DATASET") or raw.get("dataset")
    if chosen not in datasets:
        raise ConfigError(
            f"{source}: dataset {chosen!r} is not one of: {', '.join(sorted(datasets))}"
        )
    return datasets[chosen]


def _warehouse(raw: dict[str, Any], source: Path) -> WarehouseConfig:
    values = _section(raw, "warehouse", source)
    paths = {key: _resolve(value, source.parent) for key, value in values.items()}
    return _build(WarehouseConfig, values, "warehouse", source, **paths)


def _generator(raw: dict[str, Any], source: Path) -> GeneratorConfig:
    values = _section(raw, "generator", source)
    return _build(
        GeneratorConfig,
        values,
        "generator",
        source,
        start_date=_date(values.get("start_date")),
        drift_from=_date(values.get("drift_from")),
        oracle_dir=_resolve(values.get("oracle_dir", ""), source.parent),
    )


def _training(raw: dict[str, Any], source: Path) -> TrainingConfig:
    training = _build(TrainingConfig, _section(raw, "training", source), "training", source)
    # Cost-based thresholds need both costs; one alone would silently weigh the other as zero.
    if (training.cost_missed_churner is None) != (training.cost_wasted_offer is None):
        raise ConfigError(
            f"{source}: set both training.cost_missed_churner and training.cost_wasted_offer, or neither"
        )
    return training


def _quality(raw: dict[str, Any], source: Path) -> QualityConfig:
    values = _section(raw, "quality", source)
    quality = _build(
        QualityConfig, values, "quality", source,
        label_share_band=tuple(float(v) for v in values.get("label_share_band", ())),
    )
    band = quality.label_share_band
    if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
        raise ConfigError(f"{source}: quality.label_share_band must be [low, high] within [0, 1]")
    return quality


def _scoring(raw: dict[str, Any], source: Path) -> ScoringConfig:
    scoring = _build(ScoringConfig, _section(raw, "scoring", source), "scoring", source)
    if not 0 < scoring.high_risk_probability <= 1:
        raise ConfigError(f"{source}: scoring.high_risk_probability must be in (0, 1]")
    return scoring


def _assemble(raw: dict[str, Any], source: Path, dataset: str | None) -> ChurnConfig:
    """Build and check every section, in file order so the first problem is reported first."""
    problem = _problem(raw, source)
    datasets = _datasets(raw, source)
    chosen = _chosen_dataset(raw, datasets, dataset, source)
    return ChurnConfig(
        root=source.parent,
        source_file=source,
        problem=problem,
        dataset=chosen,
        datasets=datasets,
        warehouse=_warehouse(raw, source),
        generator=_generator(raw, source),
        training=_training(raw, source),
        scoring=_scoring(raw, source),
        monitoring=_build(MonitoringConfig, _section(raw, "monitoring", source), "monitoring", source),
        quality=_quality(raw, source),
        raw=raw,
    )


def load_config(
    path: str | os.PathLike[str] | None = None, dataset: str | None = None
) -> ChurnConfig:
    """Read churn.yml into a ChurnConfig; `dataset` overrides the default profile."""
    source = find_config_file(path)
    return _assemble(_read_raw(source), source, dataset)


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def write_relocated_config(
    config: ChurnConfig, new_root: Path, overrides: dict[str, Any] | None = None
) -> Path:
    """Write a churn.yml whose warehouse (and demo landing) live under `new_root`.

    Code paths (dbt project, expectations, shipped data sets) keep pointing at the
    original checkout. Tests, benchmarks and backfills use this to get a private
    warehouse while reading the same SQL and suites.
    """
    new_root = Path(new_root).resolve()
    new_root.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(config.raw, default=str))
    for key in ("dbt_project_dir", "expectations_dir"):
        raw["warehouse"][key] = str(getattr(config.warehouse, key))
    for key, value in list(raw["warehouse"].items()):
        if key not in ("dbt_project_dir", "expectations_dir"):
            raw["warehouse"][key] = str(new_root / Path(str(value)).relative_to("warehouse"))
    raw["generator"]["oracle_dir"] = str(new_root / "oracle")
    for name, values in raw["datasets"].items():
        landing = Path(str(values["landing_dir"]))
        values["landing_dir"] = (
            str(new_root / landing.relative_to("warehouse"))
            if landing.parts and landing.parts[0] == "warehouse"
            else str(config.datasets[name].landing_dir)
        )
    raw = _deep_merge(raw, overrides or {})
    target = new_root / DEFAULT_CONFIG_NAME
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    return target

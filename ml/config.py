"""The one typed configuration object every stage reads.

`churn.yml` states the problem (target, horizon, success metric) and where
everything lives. Loading it once into frozen dataclasses means a typo fails at
start-up with the key's name instead of deep inside a stage, and no stage keeps
its own copy of a value.

Every value is also checked at load against its field's type (from the
dataclass annotations, so a new setting is type-checked without extra code)
and, for numbers with a meaningful range, against `RANGES`: `horizon_days:
thirty`, `-30` or `0` fail at start naming the key's path, the value and what
is allowed, instead of running with nonsense and exit 0.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import types
import typing
from collections.abc import Callable
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


CLOCK_TODAY = "today"
CLOCK_DATA_END = "data_end"


@dataclass(frozen=True)
class EventTableConfig:
    """One dated landing table the gates watch: its date column, freshness lag and seasonality."""

    table: str
    date_column: str
    max_lag_days: int  # the newest event may be this many days older than the day before the cutoff
    seasonality: str  # weekday | month_day: which earlier days a recent day is compared with


@dataclass(frozen=True)
class SettledTableConfig:
    """A single-file landing table re-exported whole each day whose rows before the last build must not change.

    A row is known from `known_from`; a date in `later_dates` (and the columns
    `filled_with` it, e.g. a cancellation's reason) may be filled in on a later
    day. The row's state before a date is what the snapshots before it could
    see: rows known before it, later dates (and their columns) only when earlier.
    """

    table: str
    known_from: str
    later_dates: tuple[str, ...] = ()
    filled_with: tuple[tuple[str, tuple[str, ...]], ...] = ()  # later date -> columns set together with it


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    description: str
    landing_dir: Path
    landing_format: str
    feature_mart: str
    generate_if_empty: bool
    # How tonight's as_of_date is decided: today | data_end (the generator's end) | YYYY-MM-DD.
    clock: str
    event_tables: tuple[EventTableConfig, ...]
    # This dataset's own build, published, models and reports files live here, so one
    # dataset's nightly can never replace another's published state.
    warehouse_dir: Path
    # Business settings a dataset may set for itself (None: `problem:` / `training:`'s).
    success_target: float | None = None
    selection_metric: str | None = None
    cost_missed_churner: float | None = None
    cost_wasted_offer: float | None = None
    # Single-file tables whose daily re-export keeps the build incremental while rows
    # dated before the last build are unchanged (ml.data.landing compares a signature).
    settled_history: tuple[SettledTableConfig, ...] = ()


@dataclass(frozen=True)
class EngineSettings:
    """DuckDB settings applied to every connection the ML layer opens, and to dbt's."""

    memory_limit: str
    threads: int | None
    temp_directory: Path | None

    def pragmas(self) -> dict[str, str | int]:
        """Setting name -> value, only those configured (unset ones keep DuckDB's default)."""
        values: dict[str, str | int | None] = {
            "memory_limit": self.memory_limit, "threads": self.threads,
            "temp_directory": str(self.temp_directory) if self.temp_directory else None,
        }
        return {name: value for name, value in values.items() if value is not None}


@dataclass(frozen=True)
class WarehouseConfig:
    dir: Path
    build_db: Path
    published_db: Path
    models_dir: Path
    reports_dir: Path
    dbt_project_dir: Path
    expectations_dir: Path
    memory_limit: str
    threads: int | None
    temp_directory: Path | None

    @property
    def engine(self) -> EngineSettings:
        return EngineSettings(self.memory_limit, self.threads, self.temp_directory)


@dataclass(frozen=True)
class SparkConfig:
    """Spark local mode for the ML layer (ml.warehouse.spark), set like dbt's `spark` target.

    The table and metastore folders are not set here: they live in each
    dataset's `<warehouse_dir>/spark`, like its dbt_target, so datasets never share them.
    """

    master: str              # local[N]: driver and executors in one JVM (what CI proves)
    shuffle_partitions: int  # spark.sql.shuffle.partitions; Spark's 200 is far too many for one machine
    driver_memory: str       # spark.driver.memory (JVM heap), e.g. 2g; read once, when the JVM starts
    table_format: str        # parquet (no jars, what CI proves) or delta: ml.warehouse.table_formats


@dataclass(frozen=True)
class GeneratorConfig:
    customers: int
    start_date: dt.date
    months: int
    seed: int
    oracle_dir: Path
    drift_from: dt.date | None
    partitioned: bool  # dated event tables as date=YYYY-MM-DD partition folders (a daily extract), not one file


# The candidate algorithms, simplest first: selection prefers the earlier one
# when it is within noise of the best (ml.modeling.evaluate.select_by_simplicity).
ALGORITHMS = ("logistic_regression", "random_forest", "xgboost")
SEARCH_STRATEGIES = ("halving", "random")

# A search space: parameter -> the values drawn from (a tuple per parameter).
SearchSpace = dict[str, tuple[Any, ...]]


@dataclass(frozen=True)
class TrainingConfig:
    cv_folds: int
    out_of_time_snapshots: int
    search_iterations: int
    search_strategy: str  # halving (draws culled fold by fold) | random (every draw on every fold)
    small_table_rows: int  # at or below this many training rows the search widens
    small_table_iterations: int  # draws per candidate on such a table
    search_spaces: dict[str, SearchSpace]  # the candidates (keys) and what each draws from
    small_table_spaces: dict[str, SearchSpace]  # replaces/extends those parameters on a small table
    calibration: str
    random_state: int
    max_training_rows: int
    # Above this many training rows the candidate search (CV, halving, calibration) runs on a
    # seeded sample of whole customers of at most this many rows; only the winner sees them all.
    search_rows: int
    early_stopping_rounds: int | None  # boosting stops after this many rounds without gain (null: never)
    importance_rows: int  # permutation importance on a seeded sample of at most this many held-out rows
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
    # Who gets reasons in the nightly: flagged (exact TreeSHAP for every will_churn customer; the
    # API explains anyone on demand) or all (every scored customer, about 3x the cost at demo rates).
    reasons_for: str

    @property
    def risk_band_names(self) -> tuple[str, ...]:
        return RISK_BANDS


@dataclass(frozen=True)
class OperatingPointConfig:
    """How many customers tonight's decision may flag, on top of the threshold rule.

    The rule (recall target, or expected cost) is applied to the champion's
    stored out-of-fold predictions at every scoring, so changing it needs no
    retrain; a capacity then raises the threshold until tonight's flagged
    customers fit. At most one of the two limits may be set.
    """

    capacity_customers: int | None  # contact at most this many customers per night
    capacity_share: float | None    # or at most this share of tonight's active customers


@dataclass(frozen=True)
class PromotionConfig:
    """When a challenger replaces the champion: better by more than `margin` on the same rows."""

    margin: float  # in the selection metric; a tie (or a smaller gain) keeps the champion


@dataclass(frozen=True)
class ServingConfig:
    """`churn serve`: limits that keep one client from stalling the API, and the prediction log."""

    pool_size: int                # in-memory DuckDB connections holding the prepared feature SQL
    max_body_bytes: int           # larger request bodies are refused (413) before they are read
    body_timeout_seconds: float   # a body that does not arrive in time is refused (408)
    max_rows_per_table: int       # what-if rows per source table
    reload_seconds: float         # how often the published database is checked for a new publish
    api_key_env: str              # when this environment variable is set, scoring routes need its value
    log_segment_bytes: int        # prediction-log files rotate past this size
    landing_index_max_rows: int   # GET ?as_of= copies landing rows sorted by customer up to this many (0: off)


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
    publish_gate: PublishGateConfig


@dataclass(frozen=True)
class PublishGateConfig:
    """When drift stops publishing: the drifted-feature share, or any top feature drifted."""

    drifted_share: float
    top_feature_drift: bool


@dataclass(frozen=True)
class QualityConfig:
    label_share_band: tuple[float, float]
    row_count_tolerance: float
    chunk_rows: int
    # no business date lies before it: the landing suites' lower date band ({"$PARAMETER": "earliest_date"})
    earliest_date: dt.date


FUTURE_ROWS_HOLD_BACK = "hold_back"
FUTURE_ROWS_FAIL = "fail"


@dataclass(frozen=True)
class GatesConfig:
    """The landing gates run before dbt: rows after the cutoff, freshness, completeness per day."""

    future_rows: str  # hold_back (warn; dbt cannot see them at this as_of) | fail
    max_future_share: float  # held-back rows above this share of a table fail the run anyway
    completeness_window_days: int  # tonight's recent days judged against the reference
    completeness_reference_periods: int  # earlier same-weekday (or same day-of-month) days in the reference
    completeness_mad_factor: float  # band = median +- factor x max(1.4826 MAD, sqrt(median))
    completeness_min_rows: int  # days whose reference median is below this are not judged (too sparse)


WAREHOUSE_FILE_KEYS = ("build_db", "published_db", "models_dir", "reports_dir")
DATASET_OVERRIDES = {"success_target": "problem", "selection_metric": "problem",
                     "cost_missed_churner": "training", "cost_wasted_offer": "training"}


@dataclass(frozen=True)
class FileSections:
    """The sections a dataset profile adjusts, as the file states them."""

    problem: ProblemConfig
    training: TrainingConfig
    warehouse: WarehouseConfig

    def warehouse_for(self, dataset: DatasetConfig) -> WarehouseConfig:
        """The file's warehouse files moved into the dataset's own folder (same names inside it)."""
        base = self.warehouse
        moved = {}
        for key in WAREHOUSE_FILE_KEYS:
            path = getattr(base, key)
            inside = path.relative_to(base.dir) if path.is_relative_to(base.dir) else Path(path.name)
            moved[key] = dataset.warehouse_dir / inside
        return dataclasses.replace(base, dir=dataset.warehouse_dir, **moved)

    def for_dataset(self, dataset: DatasetConfig) -> dict[str, Any]:
        """problem, training and warehouse with the dataset's overrides and folder applied."""
        changes: dict[str, dict[str, Any]] = {"problem": {}, "training": {}}
        for key, section in DATASET_OVERRIDES.items():
            if getattr(dataset, key) is not None:
                changes[section][key] = getattr(dataset, key)
        if changes["training"]:  # costs come as a pair: the dataset's both replace the file's
            changes["training"] = {"cost_missed_churner": dataset.cost_missed_churner,
                                   "cost_wasted_offer": dataset.cost_wasted_offer}
        return {"problem": dataclasses.replace(self.problem, **changes["problem"]),
                "training": dataclasses.replace(self.training, **changes["training"]),
                "warehouse": self.warehouse_for(dataset)}


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
    gates: GatesConfig
    serving: ServingConfig
    operating_point: OperatingPointConfig
    promotion: PromotionConfig
    spark: SparkConfig
    # Where the data plane lives (dbt models, churn_scores and its history): "duckdb" (the build
    # database) or "spark" (schema `churn` of the dataset's Spark folder); $CHURN_ENGINE overrides.
    engine: str = "duckdb"
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # The file's own problem, training and warehouse sections, before the dataset's
    # overrides and folder were applied (what `with_dataset` starts from).
    file_sections: FileSections | None = field(default=None, repr=False, compare=False)

    def with_dataset(self, name: str) -> ChurnConfig:
        """The same configuration pointed at another dataset profile (its settings and its own files)."""
        if name not in self.datasets:
            raise ConfigError(
                f"{self.source_file}: unknown dataset {name!r}; "
                f"known: {', '.join(sorted(self.datasets))}"
            )
        sections = self.file_sections or FileSections(self.problem, self.training, self.warehouse)
        return dataclasses.replace(self, dataset=self.datasets[name],
                                   **sections.for_dataset(self.datasets[name]))

    def replace_paths(self, **warehouse_paths: Path) -> ChurnConfig:
        """A copy with some warehouse paths moved (tests, benchmarks, backfills)."""
        return dataclasses.replace(
            self, warehouse=dataclasses.replace(self.warehouse, **warehouse_paths)
        )

    def decided_as_of(self, explicit: str | dt.date | None = None, today: dt.date | None = None) -> dt.date:
        """Tonight's as_of_date, decided by the run and never read from the data.

        `--as-of` wins; otherwise the dataset's clock: `today` (the wall clock),
        `data_end` (the generator's end, start_date + months: the demo's "today")
        or a fixed date. The newest event in the data never moves it, so one
        row dated weeks ahead cannot shift every customer's snapshot.
        """
        if explicit:
            return explicit if isinstance(explicit, dt.date) else dt.date.fromisoformat(str(explicit))
        clock = self.dataset.clock
        if clock == CLOCK_TODAY:
            return today or dt.date.today()
        if clock == CLOCK_DATA_END:
            total = self.generator.start_date.year * 12 + self.generator.start_date.month - 1 + self.generator.months
            return dt.date(total // 12, total % 12 + 1, self.generator.start_date.day)
        return dt.date.fromisoformat(clock)

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


@dataclass(frozen=True)
class Allowed:
    """A range rule: the test, and what to tell the user is allowed."""

    test: Callable[[Any], bool]
    text: str


def _at_least(low: float, text: str | None = None) -> Allowed:
    return Allowed(lambda v: v is None or v >= low, text or f">= {low}")


def _between(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Allowed:
    def test(v: Any) -> bool:
        return v is None or ((v > low) if low_open else (v >= low)) and ((v < high) if high_open else (v <= high))
    return Allowed(test, f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def _one_of(*choices: str) -> Allowed:
    return Allowed(lambda v: v in choices, f"one of {', '.join(choices)}")


SHARE = _between(0, 1, low_open=True)
MEMORY_PATTERN = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
# JVM sizes as spark.driver.memory takes them: a whole number and a unit (k, m, g, t).
JVM_MEMORY_PATTERN = re.compile(r"^[1-9]\d*[kmgt]$")
SPARK_MASTER_PATTERN = re.compile(r"^local(\[(\*|[1-9]\d*)\])?$")
# spark.table_format: the keys of ml.warehouse.table_formats.TABLE_FORMATS (that layer sits above this one).
TABLE_FORMAT_NAMES = ("parquet", "delta")
EVERY_PATTERN = re.compile(r"^\s*[1-9]\d*\s*[dwm]\s*$")

# Ranges of the settings whose type alone admits nonsense ("section.key" -> rule).
RANGES: dict[str, Allowed] = {
    "problem.horizon_days": _at_least(1, "a whole number of days >= 1"),
    "problem.success_target": SHARE,
    "problem.selection_metric": _one_of("pr_auc", "roc_auc"),
    "warehouse.memory_limit": Allowed(lambda v: bool(MEMORY_PATTERN.match(v)), "a size such as 3GB or 512MB"),
    "warehouse.threads": _at_least(1),
    "generator.customers": _at_least(1),
    "generator.months": _at_least(1),
    "generator.seed": _at_least(0),
    "training.cv_folds": _at_least(2),
    "training.out_of_time_snapshots": _at_least(1),
    "training.search_iterations": _at_least(1),
    "training.search_strategy": _one_of(*SEARCH_STRATEGIES),
    "training.small_table_rows": _at_least(0),
    "training.small_table_iterations": _at_least(1),
    "training.calibration": _one_of("isotonic", "sigmoid"),
    "training.random_state": _at_least(0),
    "training.max_training_rows": _at_least(1),
    "training.search_rows": _at_least(1000),
    "training.early_stopping_rounds": _at_least(1, ">= 1 (or null)"),
    "training.importance_rows": _at_least(100),
    "training.cost_missed_churner": Allowed(lambda v: v is None or v > 0, "> 0 (or null)"),
    "training.cost_wasted_offer": Allowed(lambda v: v is None or v > 0, "> 0 (or null)"),
    "scoring.top_reasons": _between(1, 50),
    "scoring.high_risk_probability": _between(0, 1, low_open=True),
    "scoring.reasons_for": _one_of("flagged", "all"),
    "monitoring.psi_bins": _between(2, 1000),
    "monitoring.psi_threshold": Allowed(lambda v: v > 0, "> 0"),
    "monitoring.distance_threshold": Allowed(lambda v: v > 0, "> 0"),
    "monitoring.max_p_value": SHARE,
    "monitoring.dataset_drift_share": SHARE,
    "monitoring.top_features": _at_least(1),
    "monitoring.retrain_every_days": _at_least(1),
    "monitoring.recall_margin": _between(0, 1, high_open=True),
    "monitoring.reference_quantiles": _between(10, 100_000),
    "monitoring.null_share_jump": SHARE,
    "monitoring.new_category_share": SHARE,
    "monitoring.backfill_months": _at_least(1),
    "monitoring.backfill_every": Allowed(lambda v: bool(EVERY_PATTERN.match(v)), "a count and a unit d, w or m (7d)"),
    "operating_point.capacity_customers": Allowed(lambda v: v is None or v >= 1, ">= 1 (or null)"),
    "operating_point.capacity_share": Allowed(lambda v: v is None or 0 < v <= 1, "> 0 and <= 1 (or null)"),
    "promotion.margin": _between(0, 1, high_open=True),
    "datasets.success_target": SHARE,
    "datasets.selection_metric": Allowed(lambda v: v is None or v in ("pr_auc", "roc_auc"),
                                         "one of pr_auc, roc_auc (or null)"),
    "datasets.cost_missed_churner": Allowed(lambda v: v is None or v > 0, "> 0 (or null)"),
    "datasets.cost_wasted_offer": Allowed(lambda v: v is None or v > 0, "> 0 (or null)"),
    "quality.row_count_tolerance": _at_least(0),
    "quality.chunk_rows": _at_least(1000),
    "spark.master": Allowed(lambda v: bool(SPARK_MASTER_PATTERN.match(v)), "local, local[N] or local[*]"),
    "spark.shuffle_partitions": _at_least(1),
    "spark.driver_memory": Allowed(lambda v: bool(JVM_MEMORY_PATTERN.match(v)), "a JVM size such as 2g or 512m"),
    "spark.table_format": _one_of(*TABLE_FORMAT_NAMES),
}


def _type_name(expected: Any) -> str:
    if isinstance(expected, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(expected))
    if expected is type(None):
        return "null"
    origin = typing.get_origin(expected)
    if origin is dict:
        key, value = typing.get_args(expected)
        return f"a mapping of {_type_name(key)} to {_type_name(value)}"
    if origin is tuple:
        args = typing.get_args(expected)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} numbers"
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false",
            Path: "a path", dt.date: "a date (YYYY-MM-DD)"}.get(expected, getattr(expected, "__name__", str(expected)))


def _has_type(value: Any, expected: Any) -> bool:
    """Whether a loaded value fits a field annotation (bool is not a number here)."""
    if expected is Any:
        return True
    if isinstance(expected, types.UnionType):
        return any(_has_type(value, t) for t in typing.get_args(expected))
    if expected is type(None):
        return value is None
    origin = typing.get_origin(expected)
    if origin is dict:
        key, item = typing.get_args(expected)
        return isinstance(value, dict) and all(_has_type(k, key) and _has_type(v, item) for k, v in value.items())
    if origin is tuple:
        args = typing.get_args(expected)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length
            return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
        return isinstance(value, tuple) and len(value) == len(args) and all(
            _has_type(v, t) for v, t in zip(value, args, strict=True))
    if expected is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _check_values(instance: Any, section: str, source: Path) -> None:
    """Every field's type, then its range rule: the first wrong value is named with what is allowed."""
    hints = typing.get_type_hints(type(instance))
    for item in dataclasses.fields(instance):
        value = getattr(instance, item.name)
        path = f"{section}.{item.name}"
        if not _has_type(value, hints[item.name]):
            raise ConfigError(f"{source}: {path} = {value!r}: expected {_type_name(hints[item.name])}")
        rule = RANGES.get(path) or RANGES.get(f"{section.split('.')[0]}.{item.name}")
        if rule is not None and not rule.test(value):
            raise ConfigError(f"{source}: {path} = {value!r} is out of range; allowed: {rule.text}")


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
    instance = cls(**merged)
    _check_values(instance, section, source)
    return instance


def _date(value: Any, key: str = "date", source: Path | None = None) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise ConfigError(f"{source}: {key} = {value!r}: expected a date (YYYY-MM-DD)") from None


def _resolve(value: Any, root: Path) -> Path:
    """A configured path; relative ones are relative to the config file's folder."""
    path = Path(str(value))
    return path if path.is_absolute() else root / path


def _problem(raw: dict[str, Any], source: Path) -> ProblemConfig:
    return _build(ProblemConfig, _section(raw, "problem", source), "problem", source)


def _clock(value: Any, section: str, source: Path) -> str:
    text = str(value)
    if text in (CLOCK_TODAY, CLOCK_DATA_END) or isinstance(value, dt.date):
        return text
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{source}: {section}.clock is {value!r}; allowed: today, data_end or YYYY-MM-DD") from None
    return text


def _event_tables(values: Any, section: str, source: Path) -> tuple[EventTableConfig, ...]:
    """The dataset's dated landing tables, in file order."""
    tables = []
    for table, settings in (values or {}).items():
        built = _build(EventTableConfig, {**(settings or {}), "table": table},
                       f"{section}.event_tables.{table}", source)
        if built.seasonality not in ("weekday", "month_day"):
            raise ConfigError(f"{source}: {section}.event_tables.{table}.seasonality is {built.seasonality!r}; "
                              "allowed: weekday, month_day")
        if not isinstance(built.max_lag_days, int) or built.max_lag_days < 0:
            raise ConfigError(f"{source}: {section}.event_tables.{table}.max_lag_days must be an integer >= 0")
        tables.append(built)
    return tuple(tables)


def _settled_history(values: Any, section: str, source: Path) -> tuple[SettledTableConfig, ...]:
    """The dataset's re-exported single-file tables and the dates that settle their rows."""
    tables = []
    for table, settings in (values or {}).items():
        key = f"{section}.settled_history.{table}"
        if not isinstance(settings, dict) or not isinstance(settings.get("known_from"), str):
            raise ConfigError(f"{source}: {key} needs known_from: <date column>")
        later = settings.get("later_dates") or []
        filled = settings.get("filled_with") or {}
        if not isinstance(later, list) or not all(isinstance(c, str) for c in later):
            raise ConfigError(f"{source}: {key}.later_dates must be a list of column names")
        if not isinstance(filled, dict) or not all(d in later and isinstance(cs, list) for d, cs in filled.items()):
            raise ConfigError(f"{source}: {key}.filled_with maps a date of later_dates to a list of columns")
        tables.append(_build(SettledTableConfig, {**settings, "table": table}, key, source,
                             later_dates=tuple(later),
                             filled_with=tuple((d, tuple(cs)) for d, cs in filled.items())))
    return tuple(tables)


def _datasets(raw: dict[str, Any], source: Path, warehouse_dir: Path) -> dict[str, DatasetConfig]:
    """Every dataset profile, keyed by its name (which is also its `name` field).

    A profile without `warehouse_dir` keeps its files in `<warehouse.dir>/<name>`.
    """
    datasets = {}
    for name, values in _section(raw, "datasets", source).items():
        section = f"datasets.{name}"
        dataset = _build(
            DatasetConfig,
            {**values, "name": name},
            section,
            source,
            landing_dir=_resolve(values.get("landing_dir", ""), source.parent),
            clock=_clock(values.get("clock", ""), section, source),
            event_tables=_event_tables(values.get("event_tables"), section, source),
            settled_history=_settled_history(values.get("settled_history"), section, source),
            warehouse_dir=_resolve(values["warehouse_dir"], source.parent) if values.get("warehouse_dir")
            else warehouse_dir / name,
            **{key: values.get(key) for key in DATASET_OVERRIDES},
        )
        if (dataset.cost_missed_churner is None) != (dataset.cost_wasted_offer is None):
            raise ConfigError(f"{source}: set both {section}.cost_missed_churner and "
                              f"{section}.cost_wasted_offer, or neither")
        datasets[name] = dataset
    return datasets


def _check_datasets_apart(datasets: dict[str, DatasetConfig], sections: FileSections,
                          oracle_dir: Path, source: Path) -> None:
    """Refuse profiles whose files would mix: a shared folder, or one inside another's outputs."""
    homes: dict[Path, str] = {}
    for name, dataset in datasets.items():
        if dataset.warehouse_dir in homes:
            raise ConfigError(f"{source}: datasets {homes[dataset.warehouse_dir]!r} and {name!r} share "
                              f"warehouse_dir {dataset.warehouse_dir}; each dataset needs its own")
        homes[dataset.warehouse_dir] = name
    for name, dataset in datasets.items():
        for other_name, other in datasets.items():
            if other_name == name:
                continue
            theirs = sections.warehouse_for(other)
            taken = (theirs.models_dir, theirs.reports_dir, other.landing_dir, oracle_dir,
                     *(theirs.dir / sub for sub in ("dbt_target", "backfill", "prediction_log")))
            clash = next((p for p in taken if dataset.warehouse_dir.is_relative_to(p)), None)
            if clash is not None:
                raise ConfigError(f"{source}: datasets.{name}.warehouse_dir {dataset.warehouse_dir} lies inside "
                                  f"{clash}, which dataset {other_name!r} writes; give {name!r} a warehouse_dir")


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


ENGINE_KEYS = ("memory_limit", "threads", "temp_directory")
ENGINES = ("duckdb", "spark")


def _engine(raw: dict[str, Any], source: Path) -> str:
    """The engine of the data plane: $CHURN_ENGINE (`make nightly ENGINE=spark`), else the file's `engine`."""
    from_env = os.environ.get("CHURN_ENGINE")
    chosen = from_env or raw.get("engine") or "duckdb"
    if chosen not in ENGINES:
        where = "$CHURN_ENGINE" if from_env else f"{source}: engine"
        raise ConfigError(f"{where} is {chosen!r}, not one of: {', '.join(ENGINES)}")
    return str(chosen)


def _warehouse(raw: dict[str, Any], source: Path) -> WarehouseConfig:
    values = _section(raw, "warehouse", source)
    paths = {key: _resolve(value, source.parent) for key, value in values.items()
             if key not in ENGINE_KEYS and isinstance(value, str)}
    temp = values.get("temp_directory")
    if isinstance(temp, str):
        paths["temp_directory"] = _resolve(temp, source.parent)
    return _build(WarehouseConfig, values, "warehouse", source, **paths)


def _generator(raw: dict[str, Any], source: Path) -> GeneratorConfig:
    values = _section(raw, "generator", source)
    return _build(
        GeneratorConfig,
        values,
        "generator",
        source,
        start_date=_date(values.get("start_date"), "generator.start_date", source),
        drift_from=_date(values.get("drift_from"), "generator.drift_from", source),
        oracle_dir=_resolve(values.get("oracle_dir", ""), source.parent),
    )


def _number(test: Callable[[float], bool], text: str) -> Allowed:
    return Allowed(lambda v: isinstance(v, int | float) and not isinstance(v, bool) and test(v), text)


def _whole(low: int) -> Allowed:
    return Allowed(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, f"a whole number >= {low}")


def _either(*rules: Allowed) -> Allowed:
    return Allowed(lambda v: any(r.test(v) for r in rules), " or ".join(r.text for r in rules))


_NULL = Allowed(lambda v: v is None, "null")
_POSITIVE = _number(lambda v: v > 0, "a number > 0")
_NON_NEGATIVE = _number(lambda v: v >= 0, "a number >= 0")
_FRACTION = _number(lambda v: 0 < v <= 1, "a number in (0, 1]")

# The parameters a search space may tune, per candidate, and each one's values.
# Checked here so a typo or an impossible value fails at start naming its key,
# not as an estimator error after the mart has been read.
SEARCHABLE: dict[str, dict[str, Allowed]] = {
    "logistic_regression": {"C": _POSITIVE},
    "random_forest": {
        "n_estimators": _whole(1),
        "max_depth": _either(_whole(1), _NULL),
        "min_samples_leaf": _either(_whole(1), _number(lambda v: 0 < v < 1, "a share in (0, 1)")),
        "min_samples_split": _either(_whole(2), _number(lambda v: 0 < v < 1, "a share in (0, 1)")),
        "max_features": _either(_one_of("sqrt", "log2"), _whole(1), _FRACTION, _NULL),
        "max_samples": _either(_FRACTION, _NULL),
        "criterion": _one_of("gini", "entropy", "log_loss"),
    },
    "xgboost": {
        "n_estimators": _whole(1),
        "max_depth": _whole(0),
        "learning_rate": _FRACTION,
        "subsample": _FRACTION,
        "colsample_bytree": _FRACTION,
        "min_child_weight": _NON_NEGATIVE,
        "gamma": _NON_NEGATIVE,
        "reg_alpha": _NON_NEGATIVE,
        "reg_lambda": _NON_NEGATIVE,
        "max_bin": _whole(2),
    },
}


def _search_spaces(values: Any, key: str, source: Path, required: bool) -> dict[str, SearchSpace]:
    """candidate -> parameter -> tuple of values, every name and value checked against SEARCHABLE."""
    if not isinstance(values, dict) or (required and not values):
        raise ConfigError(f"{source}: {key} must be a mapping of candidate to its search space "
                          f"(candidates: {', '.join(ALGORITHMS)})")
    unknown = [name for name in values if name not in SEARCHABLE]
    if unknown:
        raise ConfigError(f"{source}: {key}: unknown candidate(s) {', '.join(map(str, unknown))}; "
                          f"known: {', '.join(ALGORITHMS)}")
    spaces: dict[str, SearchSpace] = {}
    for algorithm in (a for a in ALGORITHMS if a in values):  # simplest first, whatever the file's order
        space = values[algorithm] if values[algorithm] is not None else {}
        where = f"{key}.{algorithm}"
        if not isinstance(space, dict):
            raise ConfigError(f"{source}: {where} must be a mapping of parameter to a list of values "
                              "({} tries the estimator's defaults)")
        rules = SEARCHABLE[algorithm]
        spaces[algorithm] = {}
        for param, choices in space.items():
            if param not in rules:
                raise ConfigError(f"{source}: {where}.{param}: not a searchable parameter of {algorithm}; "
                                  f"allowed: {', '.join(rules)}")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{source}: {where}.{param} = {choices!r}: expected a non-empty list of values")
            for i, choice in enumerate(choices):
                if not rules[param].test(choice):
                    raise ConfigError(f"{source}: {where}.{param}[{i}] = {choice!r} is out of range; "
                                      f"allowed: {rules[param].text}")
            spaces[algorithm][param] = tuple(choices)
    return spaces


def _training(raw: dict[str, Any], source: Path) -> TrainingConfig:
    values = _section(raw, "training", source)
    spaces = _search_spaces(values.get("search_spaces"), "training.search_spaces", source, required=True)
    small = _search_spaces(values.get("small_table_spaces", {}), "training.small_table_spaces", source,
                           required=False)
    extra = [a for a in small if a not in spaces]
    if extra:
        raise ConfigError(f"{source}: training.small_table_spaces names {', '.join(extra)}, "
                          "which training.search_spaces does not train")
    training = _build(TrainingConfig, values, "training", source, search_spaces=spaces, small_table_spaces=small)
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
        label_share_band=tuple(values["label_share_band"]) if isinstance(values.get("label_share_band"), list)
        else values.get("label_share_band"),
        **({"earliest_date": _date(values["earliest_date"], "quality.earliest_date", source)}
           if "earliest_date" in values else {}),
    )
    band = quality.label_share_band
    if len(band) != 2 or not 0 <= band[0] < band[1] <= 1:
        raise ConfigError(f"{source}: quality.label_share_band must be [low, high] within [0, 1]")
    return quality


def _monitoring(raw: dict[str, Any], source: Path) -> MonitoringConfig:
    values = _section(raw, "monitoring", source)
    gate = values.get("publish_gate")
    if not isinstance(gate, dict):
        raise ConfigError(f"{source}: monitoring.publish_gate is missing or not a mapping")
    publish_gate = _build(PublishGateConfig, gate, "monitoring.publish_gate", source)
    if not 0 < publish_gate.drifted_share <= 1:
        raise ConfigError(f"{source}: monitoring.publish_gate.drifted_share must be in (0, 1]")
    return _build(MonitoringConfig, values, "monitoring", source, publish_gate=publish_gate)


def _gates(raw: dict[str, Any], source: Path) -> GatesConfig:
    gates = _build(GatesConfig, _section(raw, "gates", source), "gates", source)
    if gates.future_rows not in (FUTURE_ROWS_HOLD_BACK, FUTURE_ROWS_FAIL):
        raise ConfigError(f"{source}: gates.future_rows is {gates.future_rows!r}; allowed: hold_back, fail")
    if not 0 <= gates.max_future_share < 1:
        raise ConfigError(f"{source}: gates.max_future_share must be in [0, 1)")
    if gates.completeness_window_days < 1 or gates.completeness_reference_periods < 3:
        raise ConfigError(f"{source}: gates.completeness_window_days must be >= 1 and "
                          "gates.completeness_reference_periods >= 3")
    if gates.completeness_mad_factor <= 0:
        raise ConfigError(f"{source}: gates.completeness_mad_factor must be > 0")
    return gates


def _serving(raw: dict[str, Any], source: Path) -> ServingConfig:
    serving = _build(ServingConfig, _section(raw, "serving", source), "serving", source)
    if serving.pool_size < 1 or serving.max_body_bytes < 1 or serving.max_rows_per_table < 1:
        raise ConfigError(f"{source}: serving.pool_size, max_body_bytes and max_rows_per_table must be >= 1")
    if serving.landing_index_max_rows < 0:
        raise ConfigError(f"{source}: serving.landing_index_max_rows must be >= 0 (0 turns the index off)")
    return serving


def _scoring(raw: dict[str, Any], source: Path) -> ScoringConfig:
    """The high-risk probability is range-checked with every other setting (RANGES)."""
    return _build(ScoringConfig, _section(raw, "scoring", source), "scoring", source)


def _operating_point(raw: dict[str, Any], source: Path) -> OperatingPointConfig:
    values = _section(raw, "operating_point", source)
    point = _build(OperatingPointConfig, values, "operating_point", source)
    # Two caps would leave "which one wins" to the reader; one states it.
    if point.capacity_customers is not None and point.capacity_share is not None:
        raise ConfigError(f"{source}: set operating_point.capacity_customers or operating_point.capacity_share, "
                          "not both")
    return point


def _promotion(raw: dict[str, Any], source: Path) -> PromotionConfig:
    return _build(PromotionConfig, _section(raw, "promotion", source), "promotion", source)


def _spark(raw: dict[str, Any], source: Path) -> SparkConfig:
    return _build(SparkConfig, _section(raw, "spark", source), "spark", source)


def _assemble(raw: dict[str, Any], source: Path, dataset: str | None) -> ChurnConfig:
    """Build and check every section, in file order so the first problem is reported first."""
    problem = _problem(raw, source)
    warehouse = _warehouse(raw, source)
    datasets = _datasets(raw, source, warehouse.dir)
    chosen = _chosen_dataset(raw, datasets, dataset, source)
    generator = _generator(raw, source)
    sections = FileSections(problem, _training(raw, source), warehouse)
    _check_datasets_apart(datasets, sections, generator.oracle_dir, source)
    return ChurnConfig(
        root=source.parent,
        source_file=source,
        dataset=chosen,
        datasets=datasets,
        generator=generator,
        file_sections=sections,
        **sections.for_dataset(chosen),
        scoring=_scoring(raw, source),
        monitoring=_monitoring(raw, source),
        quality=_quality(raw, source),
        gates=_gates(raw, source),
        serving=_serving(raw, source),
        operating_point=_operating_point(raw, source),
        promotion=_promotion(raw, source),
        spark=_spark(raw, source),
        engine=_engine(raw, source),
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
    warehouse while reading the same SQL and suites. A relocated config can be
    relocated again: what lay under its warehouse folder moves again.
    """
    new_root = Path(new_root).resolve()
    new_root.mkdir(parents=True, exist_ok=True)
    raw = json.loads(json.dumps(config.raw, default=str))
    old_root = config.warehouse.dir.resolve()

    def moved(value: Any) -> Path | None:
        """Where a path under the warehouse goes: relative `warehouse/...` (the checkout's churn.yml)
        or under the config's warehouse folder (a config relocated before); None for any other path."""
        path = Path(str(value))
        if not path.is_absolute() and path.parts and path.parts[0] == "warehouse":
            return new_root / path.relative_to("warehouse")
        if path.is_absolute() and path.resolve().is_relative_to(old_root):
            return new_root / path.resolve().relative_to(old_root)
        return None

    for key in ("dbt_project_dir", "expectations_dir"):
        raw["warehouse"][key] = str(getattr(config.warehouse, key))
    for key, value in list(raw["warehouse"].items()):
        if key in ("dbt_project_dir", "expectations_dir") or (key in ENGINE_KEYS and key != "temp_directory"):
            continue
        if value is not None:
            target = moved(value)
            if target is None:
                raise ConfigError(f"warehouse.{key} = {value!r} is outside the warehouse folder {old_root}; "
                                  "a relocated copy would share it")
            raw["warehouse"][key] = str(target)
    raw["generator"]["oracle_dir"] = str(new_root / "oracle")
    for name, values in raw["datasets"].items():
        landing = moved(values["landing_dir"])
        values["landing_dir"] = str(landing if landing is not None else config.datasets[name].landing_dir)
        if values.get("warehouse_dir"):  # a dataset's own files move with the warehouse
            home = moved(values["warehouse_dir"])
            values["warehouse_dir"] = str(home if home is not None else values["warehouse_dir"])
    raw = _deep_merge(raw, overrides or {})
    target = new_root / DEFAULT_CONFIG_NAME
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    return target

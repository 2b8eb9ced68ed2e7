"""Which snapshots of the feature mart a build changed: the rows a night's audits and profile must read.

An incremental build deletes and re-inserts the snapshots from the mart's
previous latest as_of_date on (macros/incremental_snapshots.sql) and fills in
the labels of older snapshots whose horizon became observable; every other
stored row is exactly what an earlier, audited build left. So each build
records its scope here (`mart_builds`): a full rebuild, or the date it rebuilt
from plus the snapshot dates whose labels it filled. Readers ask for the union
of the builds since their own last success (`scope_since`), so a night whose
audit failed is covered again by the next one.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import current_contract
from ml.warehouse import Session, connect, declare, quote, quote_literal

MART_BUILDS = declare(
    name="mart_builds",
    owner=__name__,
    grain="one row per dbt build of a dataset's feature mart",
    description="Which snapshots each build of the feature mart rebuilt or relabelled, so the night's audits "
                "and profile read those rows instead of the whole mart.",
    columns=[
        ("dataset", "VARCHAR", "the churn.yml dataset profile"),
        ("feature_mart", "VARCHAR", "the mart model built"),
        ("as_of", "DATE", "the build's as_of"),
        ("full_refresh", "BOOLEAN", "every snapshot was (re)built: readers read the whole mart"),
        ("rebuilt_from", "DATE", "snapshots on or after this date were deleted and inserted again (NULL: full)"),
        ("matured", "VARCHAR", "comma-separated snapshot dates before rebuilt_from whose labels the build filled"),
        ("built_at", "TIMESTAMP", "when the build finished"),
    ],
)


@dataclass(frozen=True)
class NightScope:
    """The mart rows some builds may have changed: all of them, or a date predicate."""

    full: bool
    rebuilt_from: dt.date | None = None
    matured: tuple[dt.date, ...] = ()

    def predicate(self, as_of_column: str) -> str | None:
        """SQL selecting the changed rows, or None when every row may have changed."""
        if self.full:
            return None
        terms = [f"{quote(as_of_column)} >= cast({quote_literal(self.rebuilt_from.isoformat())} as date)"]
        if self.matured:
            dates = ", ".join(f"cast({quote_literal(d.isoformat())} as date)" for d in self.matured)
            terms.append(f"{quote(as_of_column)} in ({dates})")
        return " or ".join(terms)

    def describe(self) -> str:
        if self.full:
            return "all snapshots"
        matured = f" and the labels matured on {', '.join(map(str, self.matured))}" if self.matured else ""
        return f"snapshots from {self.rebuilt_from}{matured}"

    def union(self, other: NightScope) -> NightScope:
        if self.full or other.full:
            return NightScope(full=True)
        start = min(self.rebuilt_from, other.rebuilt_from)
        matured = tuple(sorted({d for d in (*self.matured, *other.matured) if d < start}))
        return NightScope(full=False, rebuilt_from=start, matured=matured)


FULL = NightScope(full=True)


@dataclass(frozen=True)
class MartBefore:
    """What the mart held before dbt ran: its latest snapshot and the snapshot dates still unlabelled."""

    existed: bool
    latest: dt.date | None
    unlabelled: tuple[dt.date, ...]


def _dates(values: list[tuple]) -> tuple[dt.date, ...]:
    return tuple(sorted(pd.Timestamp(v).date() for v, in values if v is not None))


def mart_before_build(config: ChurnConfig, contract: FeatureContract | None = None) -> MartBefore:
    """Read before dbt runs (two aggregates of the mart's date and label columns, no feature is read)."""
    mart = config.dataset.feature_mart
    if not config.warehouse.build_db.exists():
        return MartBefore(False, None, ())
    contract = contract or current_contract(config)
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if not session.exists(mart) or not {contract.as_of, contract.label} <= set(session.columns(mart)):
            return MartBefore(False, None, ())
        as_of, label = quote(contract.as_of), quote(contract.label)
        latest = session.scalar(f"select max({as_of}) from {quote(mart)}")
        unlabelled = _dates(session.rows(f"select distinct {as_of} from {quote(mart)} where {label} is null"))
    return MartBefore(True, None if latest is None else pd.Timestamp(latest).date(), unlabelled)


def record_mart_build(config: ChurnConfig, as_of: dt.date, before: MartBefore, full_refresh: bool,
                      replacing: dt.datetime | None = None, contract: FeatureContract | None = None) -> dt.datetime:
    """Store a build's scope (replacing the row stamped `replacing`); returns the row's stamp.

    The labels a build filled are the dates unlabelled before it that have labels now. `contract`
    defaults to the last build's; a build passes tonight's (a first build has no manifest yet).
    """
    contract = contract or current_contract(config)
    mart = quote(config.dataset.feature_mart)
    built_at = dt.datetime.now()
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        if full_refresh or not before.existed or before.latest is None:
            scope = FULL
        else:
            older = [d for d in before.unlabelled if d < before.latest]
            matured = _dates(session.rows(
                f"select distinct {quote(contract.as_of)} from {mart} where {quote(contract.label)} is not null "
                f"and {quote(contract.as_of)} in (select unnest(?::date[]))", [older])) if older else ()
            scope = NightScope(full=False, rebuilt_from=before.latest, matured=matured)
        row = pd.DataFrame([{
            "dataset": config.dataset.name, "feature_mart": config.dataset.feature_mart, "as_of": as_of,
            "full_refresh": scope.full, "rebuilt_from": scope.rebuilt_from,
            "matured": ",".join(d.isoformat() for d in scope.matured), "built_at": built_at,
        }], columns=MART_BUILDS.column_names).astype({"rebuilt_from": "datetime64[us]", "as_of": "datetime64[us]"})
        session.append(MART_BUILDS, row, where="dataset = ? and feature_mart = ? and built_at = ?",
                       params=[config.dataset.name, config.dataset.feature_mart, replacing])
    return built_at


def scope_since(session: Session, config: ChurnConfig, since: dt.datetime | None) -> NightScope:
    """The rows the builds after `since` (a reader's last success) may have changed.

    Everything when the reader never succeeded, or no build was ever recorded
    (a warehouse built before this table existed); the latest build's scope
    when none came after `since` (re-checking the last night, never nothing).
    """
    if since is None or not session.exists(MART_BUILDS):
        return FULL
    rows = session.rows(
        f"select full_refresh, rebuilt_from, matured, built_at > ? from {quote(MART_BUILDS.name)} "
        "where dataset = ? and feature_mart = ? order by built_at desc",
        [since, config.dataset.name, config.dataset.feature_mart])
    if not rows:
        return FULL
    scopes = [_scope(full, start, matured) for full, start, matured, after in rows if after] or [
        _scope(*rows[0][:3])]
    scope = scopes[0]
    for other in scopes[1:]:
        scope = scope.union(other)
    return scope


def _scope(full: bool, start: object, matured: str | None) -> NightScope:
    if full or start is None:
        return FULL
    dates = tuple(dt.date.fromisoformat(d) for d in (matured or "").split(",") if d)
    return NightScope(full=False, rebuilt_from=pd.Timestamp(start).date(), matured=dates)


def scoped_relation(config: ChurnConfig, contract: FeatureContract, scope: NightScope) -> str:
    """The mart, or the subquery of its rows in `scope`."""
    predicate = scope.predicate(contract.as_of)
    mart = quote(config.dataset.feature_mart)
    return mart if predicate is None else f"(select * from {mart} where {predicate})"

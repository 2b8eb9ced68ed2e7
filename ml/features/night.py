"""Which snapshots of the feature mart a build changed: the rows a night's audits and profile must read.

An incremental build deletes and re-inserts the snapshots from the mart's
previous latest as_of_date on (macros/incremental_snapshots.sql) and fills in
the labels of older snapshots whose horizon became observable; every other
stored row is exactly what an earlier, audited build left. So each build
records its scope here (`mart_builds`): a full rebuild, or the date it rebuilt
from plus the snapshot dates whose labels it filled. Readers ask for the union
of the builds since their own last success (`scope_since`), so a night whose
audit failed is covered again by the next one.

A finished build also stores what the mart holds after it (latest snapshot,
still-unlabelled snapshot dates, row count), computed from the rows it
rebuilt, so the next build learns what the mart held before it without
reading the mart (`mart_before_build`); only a build that did not finish, a
mart whose row count moved outside a build, or a warehouse without that state
is read in SQL.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.features.mart import current_contract
from ml.logs import get_logger
from ml.warehouse import Session, connect, declare, quote, quote_literal

log = get_logger("build")

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
        ("finished", "BOOLEAN", "the build succeeded; false while it runs or after it was killed or failed"),
        ("latest_snapshot", "DATE", "the mart's latest as_of_date after the build (finished builds)"),
        ("unlabelled", "VARCHAR", "comma-separated snapshot dates whose label was still NULL after the build"),
        ("mart_rows", "BIGINT", "the mart's row count after the build: a mart changed since no longer matches"),
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


def _date_list(text: str | None) -> tuple[dt.date, ...]:
    return tuple(dt.date.fromisoformat(d) for d in (text or "").split(",") if d)


def mart_before_build(config: ChurnConfig, contract: FeatureContract | None = None) -> MartBefore:
    """What the mart holds before dbt runs: from the last finished build's stored state when it is trusted.

    The state is trusted when the newest build of the mart finished and the
    mart still has the row count it left (both metadata reads). Otherwise (a
    build killed or failed after it, a mart changed by hand, a warehouse from
    before the state was stored) the mart's date and label columns are read.
    """
    mart = config.dataset.feature_mart
    if not config.warehouse.build_db.exists():
        return MartBefore(False, None, ())
    contract = contract or current_contract(config)
    with connect(config.warehouse.build_db, read_only=True, settings=config.warehouse.engine) as session:
        if not session.exists(mart) or not {contract.as_of, contract.label} <= set(session.columns(mart)):
            return MartBefore(False, None, ())
        stored, why = _stored_before(session, config)
        if stored is not None:
            return stored
        log.info("what %s held before tonight's build is read from the mart: %s", mart, why)
        return _read_before(session, mart, contract)


def _stored_before(session: Session, config: ChurnConfig) -> tuple[MartBefore | None, str]:
    """The newest build's stored state if it finished and the mart still matches it, else why not."""
    if not session.exists(MART_BUILDS) or "mart_rows" not in session.columns(MART_BUILDS):
        return None, "no build state stored yet"
    row = session.one(
        f"select finished, latest_snapshot, unlabelled, mart_rows from {quote(MART_BUILDS.name)} "
        "where dataset = ? and feature_mart = ? order by built_at desc limit 1",
        [config.dataset.name, config.dataset.feature_mart])
    if row is None:
        return None, "no build of it recorded"
    finished, latest, unlabelled, rows = row
    if finished is None or rows is None:
        return None, "its last build was recorded before the build state was stored"
    if not finished:
        return None, "the last build did not finish (killed or failed), so the mart may hold either state"
    now = session.row_count(config.dataset.feature_mart)
    if now != rows:
        return None, f"it has {now:,d} rows, the last build left {rows:,d}: changed outside a build"
    return MartBefore(True, None if latest is None else pd.Timestamp(latest).date(), _date_list(unlabelled)), ""


def _read_before(session: Session, mart: str, contract: FeatureContract) -> MartBefore:
    """Two aggregates of the mart's date and label columns (no feature is read)."""
    as_of, label = quote(contract.as_of), quote(contract.label)
    latest = session.scalar(f"select max({as_of}) from {quote(mart)}")
    unlabelled = _dates(session.rows(f"select distinct {as_of} from {quote(mart)} where {label} is null"))
    return MartBefore(True, None if latest is None else pd.Timestamp(latest).date(), unlabelled)


@dataclass(frozen=True)
class _After:
    """What a finished build left in the mart, and which of the older unlabelled dates it labelled."""

    latest: dt.date | None
    unlabelled: tuple[dt.date, ...]
    matured: tuple[dt.date, ...]
    rows: int


def _after_build(session: Session, mart: str, contract: FeatureContract, before: MartBefore,
                 scope: NightScope) -> _After:
    """The mart after a build, reading only the snapshots it could have changed.

    An incremental build rewrote the snapshots from `rebuilt_from` on and could
    only fill labels of the dates unlabelled before it (all within a horizon
    before it); every other date is as the previous state says. Those dates
    form one range from the oldest of them, which DuckDB prunes by the row
    groups' min/max; a full rebuild reads the two columns whole.
    """
    as_of, label = quote(contract.as_of), quote(contract.label)
    older = [d for d in before.unlabelled if scope.full or d < scope.rebuilt_from]
    start = None if scope.full else min([scope.rebuilt_from, *older])
    where = "" if start is None else f" where {as_of} >= ?"
    dates = {pd.Timestamp(d).date(): (int(labelled), int(total)) for d, labelled, total in session.rows(
        f"select {as_of}, count({label}), count(*) from {quote(mart)}{where} group by 1",
        [] if start is None else [start])}
    unlabelled = sorted(d for d, (labelled, total) in dates.items() if labelled < total)
    latest = max(dates, default=None)
    if latest is None and start is not None:  # nothing from the range on: the latest is older
        found = session.scalar(f"select max({as_of}) from {quote(mart)}")
        latest = None if found is None else pd.Timestamp(found).date()
    matured = tuple(sorted(d for d in older if dates.get(d, (0, 0))[0] > 0))
    return _After(latest, tuple(unlabelled), matured, session.row_count(mart))


def record_mart_build(config: ChurnConfig, as_of: dt.date, before: MartBefore, full_refresh: bool,
                      replacing: dt.datetime | None = None, contract: FeatureContract | None = None,
                      finished: bool = True) -> dt.datetime:
    """Store a build's scope (replacing the row stamped `replacing`); returns the row's stamp.

    The labels a build filled are the dates unlabelled before it that have labels now. `contract`
    defaults to the last build's; a build passes tonight's (a first build has no manifest yet).
    `finished=False` marks a build about to start: recorded as a full rebuild, with no state.
    """
    contract = contract or current_contract(config)
    built_at = dt.datetime.now()
    with connect(config.warehouse.build_db, settings=config.warehouse.engine) as session:
        if full_refresh or not before.existed or before.latest is None:
            scope = FULL
        else:
            scope = NightScope(full=False, rebuilt_from=before.latest)
        after = _after_build(session, config.dataset.feature_mart, contract, before, scope) if finished else None
        if after is not None and not scope.full:
            scope = NightScope(full=False, rebuilt_from=scope.rebuilt_from, matured=after.matured)
        row = pd.DataFrame([{
            "dataset": config.dataset.name, "feature_mart": config.dataset.feature_mart, "as_of": as_of,
            "full_refresh": scope.full, "rebuilt_from": scope.rebuilt_from,
            "matured": ",".join(d.isoformat() for d in scope.matured), "built_at": built_at,
            "finished": finished, "latest_snapshot": None if after is None else after.latest,
            "unlabelled": None if after is None else ",".join(d.isoformat() for d in after.unlabelled),
            "mart_rows": None if after is None else after.rows,
        }], columns=MART_BUILDS.column_names).astype({
            "rebuilt_from": "datetime64[us]", "as_of": "datetime64[us]", "latest_snapshot": "datetime64[us]",
            "mart_rows": "Int64"})
        with session.transaction():
            if session.exists(MART_BUILDS):  # tables from before the stored state had its columns
                session.add_missing_columns(MART_BUILDS, MART_BUILDS.column_types)
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
    return NightScope(full=False, rebuilt_from=pd.Timestamp(start).date(), matured=_date_list(matured))


def scoped_relation(config: ChurnConfig, contract: FeatureContract, scope: NightScope) -> str:
    """The mart, or the subquery of its rows in `scope`."""
    predicate = scope.predicate(contract.as_of)
    mart = quote(config.dataset.feature_mart)
    return mart if predicate is None else f"(select * from {mart} where {predicate})"

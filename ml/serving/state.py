"""What the API serves from: the published state, indexed in memory and swapped whole on a new publish.

The published database (what BI reads) is opened read-only just long enough
to copy tonight's `churn_scores` and the snapshot dates of the history; the
champion it names is loaded and tonight's feature values are computed by the
mart's own SQL. The server holds one `PublishedState` reference; a watcher
builds the next one when `publish_info` changes and swaps the reference, so a
request that already took the old state finishes on it.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ml.config import ChurnConfig
from ml.features.contract import FeatureContract
from ml.logs import get_logger, timed
from ml.modeling.explain import Explainer, top_k
from ml.modeling.model import ChurnModel
from ml.modeling.registry import REGISTRY_TABLE, champion_in, load_model
from ml.modeling.score import (
    HISTORY_SPEC,
    SCORES_SPEC,
    latest_scores_summary,
    published_scores,
    scored_dates,
    typical_values,
)
from ml.serving.features import CompiledFeatures, LandingIndex, RequestError, snapshot_features
from ml.serving.publish import PublishInfo, published_info
from ml.warehouse import connect, is_missing, json_value

log = get_logger("serve")

EXPLAIN_BATCH_ROWS = 2_000  # rows per background TreeSHAP batch: small enough to yield the cores often


def answer_value(value: Any) -> Any:
    """A feature or key value as the API answers it: plain JSON, dates cut to YYYY-MM-DD."""
    if isinstance(value, (pd.Timestamp, dt.date)) and not is_missing(value):
        return value.isoformat()[:10]
    return json_value(value)


Reasons = list[dict[str, Any]]  # one customer's reasons as the API answers them: feature, contribution


class ReasonCache:
    """Reasons of the customers the nightly left unexplained: the one mutable part of a `PublishedState`.

    The nightly explains flagged customers only (scoring.reasons_for), and a
    single row's TreeSHAP costs ~10 ms where a row in a batch costs ~30 us, so
    the others are explained in batches by a background thread after the state
    goes live (`PublishedState.explain_all`): they cannot be ready when the
    frozen state is built. The reasons come from that state's model and
    features, so each state has its own cache, thrown away with it. Requests
    read it while the thread writes; the lock makes each batch's update and
    each read whole, instead of a plain dict inside a frozen dataclass looking
    immutable while it was not.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: dict[str, Reasons] = {}

    def get(self, customer_id: str) -> Reasons | None:
        """The customer's cached reasons, or None when not computed yet."""
        with self._lock:
            return self._reasons.get(customer_id)

    def update(self, reasons: Mapping[str, Reasons]) -> None:
        """Add a batch of customers' reasons at once."""
        with self._lock:
            self._reasons.update(reasons)

    def missing(self, customer_ids: Iterable[str]) -> list[str]:
        """Those of `customer_ids` not cached yet, in order (the lock taken once, not per customer)."""
        with self._lock:
            return [c for c in customer_ids if c not in self._reasons]

    def __contains__(self, customer_id: object) -> bool:
        with self._lock:
            return customer_id in self._reasons

    def __len__(self) -> int:
        with self._lock:
            return len(self._reasons)


@dataclass(frozen=True)
class PublishedState:
    """One publish, ready to answer: the champion, tonight's answers by customer, the dates served.

    Nothing in it changes after it is built except `explained`, an explicit
    `ReasonCache` that the background thread fills and requests read.
    """

    info: PublishInfo | None
    stamp: tuple[int, int]  # (inode, mtime_ns) of the published file it was read from
    model: ChurnModel
    explainer: Explainer
    tonight: dt.date
    served_dates: tuple[dt.date, ...]
    answers: AnswerIndex = field(repr=False)
    # Tonight's feature rows by customer id (text): the nightly explains flagged customers only
    # (scoring.reasons_for), so the others' reasons are computed from these on demand.
    features: pd.DataFrame = field(repr=False, default_factory=pd.DataFrame)
    top_reasons: int = 3
    typical: dict[str, str] = field(default_factory=dict, repr=False)  # the model's typical values, for reasons
    # GET ?as_of=: the landing rows earlier served dates read, sorted by customer (None: read the files)
    landing: LandingIndex | None = field(default=None, repr=False)

    # filled by `explain_all` after the state goes live: the state's one mutable part, its own
    explained: ReasonCache = field(default_factory=ReasonCache, repr=False)

    def answer(self, customer_id: str) -> dict[str, Any] | None:
        """Tonight's published answer, with exact reasons computed now when the nightly left none."""
        answer = self.answers.get(customer_id)
        if answer is None or answer["reasons"] or customer_id not in self.features.index:
            return answer
        reasons = self.explained.get(customer_id)
        if reasons is None:
            reasons = self._reasons(self.features.loc[[customer_id]])[customer_id]
        return {**answer, "reasons": reasons}

    def unexplained(self) -> list[str]:
        """Customers answered without the nightly's reasons and not explained here yet."""
        # listed before the cache is asked: requests wait on its lock, not on this walk over every answer
        return self.explained.missing(self.answers.unreasoned())

    def explain_all(self, keep_going: Callable[[], bool], batch_rows: int = EXPLAIN_BATCH_ROWS) -> int:
        """Fill `explained` for every unexplained customer, a batch at a time, while `keep_going()`."""
        todo = self.unexplained()
        for start in range(0, len(todo), batch_rows):
            if not keep_going():
                break
            self.explained.update(self._reasons(self.features.loc[todo[start:start + batch_rows]]))
        return len(self.explained)

    def _reasons(self, rows: pd.DataFrame) -> dict[str, Reasons]:
        contributions = self.explainer.contributions(self.explainer.matrix(rows), rows.index)
        top = top_k(contributions.values, self.top_reasons)
        out: dict[str, Reasons] = {}
        for customer, row in zip(top.index, top.to_dict("records"), strict=True):
            out[str(customer)] = [
                {"feature": row[f"reason_{i}"], "contribution": answer_value(row[f"reason_{i}_contribution"])}
                for i in range(1, self.top_reasons + 1) if not is_missing(row[f"reason_{i}"])]
        return out


def file_stamp(path: os.PathLike[str]) -> tuple[int, int]:
    """Changes whenever publish `os.replace`s the file."""
    stat = os.stat(path)
    return stat.st_ino, stat.st_mtime_ns


def _value_reader(column: pd.Series) -> Callable[[int], Any]:
    """Position -> the value `Series.tolist()` would hold there, without holding a Python object per row.

    Numbers, booleans and text are read from the column's numpy array; date and
    time columns through pandas, whose values are Timestamps (numpy's would
    come out as integers of nanoseconds)."""
    if column.dtype.kind == "M" or isinstance(column.dtype, pd.DatetimeTZDtype):
        return column.iat.__getitem__
    return column.to_numpy().__getitem__


class AnswerIndex(Mapping[str, dict[str, Any]]):
    """Tonight's published answers by customer id (as text), each built when it is asked for.

    One dict per customer, with its feature values as Python objects, was about
    60 objects a customer: at a million customers, 62 s to index and 4.9 GB
    (`python -m benchmarks.api_state`). Here the published rows stay in their
    columns and only the key -> row position maps are built; an answer (about
    60 values converted) is assembled per request, which costs tens of
    microseconds. A customer repeated in `scores` answers with its last row, in
    `features` with its first, as the dicts did.
    """

    def __init__(self, scores: pd.DataFrame, features: pd.DataFrame, contract: FeatureContract) -> None:
        key = contract.key
        self._rows = dict(zip(scores[key].astype(str).tolist(), range(len(scores)), strict=True))
        feature_keys = features[key].astype(str).tolist() if len(features) else []
        self._feature_rows = dict(zip(reversed(feature_keys), range(len(feature_keys) - 1, -1, -1), strict=True))
        self._names = list(contract.feature_names)
        self._features = ({name: _value_reader(features[name]) for name in self._names} if len(features) else {})
        self._reason_names = [c for c in scores.columns
                              if c.startswith("reason_") and c.removeprefix("reason_").isdigit()]
        self._as_of = _value_reader(scores[contract.as_of])
        self._probability = scores["churn_probability"].to_numpy(dtype="float64")
        self._will_churn = scores["will_churn"].to_numpy()
        self._risk_band = scores["risk_band"].to_numpy()
        self._model_version = scores["model_version"].to_numpy()
        self._reasons = [(scores[n].to_numpy(), scores[f"{n}_contribution"].to_numpy()) for n in self._reason_names]
        self._reasoned = scores[self._reason_names].notna().any(axis=1).to_numpy()  # all False without reasons

    def __getitem__(self, customer_id: str) -> dict[str, Any]:
        row = self._rows[customer_id]
        at = self._feature_rows.get(customer_id)
        return {
            "customer_id": customer_id,
            "as_of": answer_value(self._as_of(row)),
            "churn_probability": float(self._probability[row]),
            "will_churn": bool(self._will_churn[row]),
            "risk_band": self._risk_band[row],
            "model_version": self._model_version[row],
            "reasons": [{"feature": names[row], "contribution": answer_value(contributions[row])}
                        for names, contributions in self._reasons if not is_missing(names[row])],
            "features": {} if at is None else {n: answer_value(self._features[n](at)) for n in self._names},
        }

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, customer_id: object) -> bool:
        return customer_id in self._rows

    def unreasoned(self) -> list[str]:
        """Customers published without reasons who have tonight's features (so can be explained here)."""
        return [c for c, row in self._rows.items() if not self._reasoned[row] and c in self._feature_rows]


@dataclass(frozen=True)
class PublishedRows:
    """What the published database holds for serving: tonight's scores and the dates served."""

    info: PublishInfo | None
    stamp: tuple[int, int]
    version: str
    tonight: dt.date
    served_dates: tuple[dt.date, ...]
    scores: pd.DataFrame = field(repr=False)


def read_published(config: ChurnConfig, as_of_column: str) -> PublishedRows:
    """Open the published database read-only just long enough to copy what serving needs.

    `as_of_column` is the mart contract's snapshot column (the dataset's own name)."""
    db = config.warehouse.published_db
    if not db.exists():
        raise RequestError(f"nothing published yet ({db} missing); run `make nightly` first")
    stamp = file_stamp(db)
    with connect(db, read_only=True, settings=config.warehouse.engine) as session:
        present = set(session.tables(base_tables_only=False))  # views too: a Spark publish is views over Parquet
        for table in (REGISTRY_TABLE, SCORES_SPEC.name):
            if table not in present:
                raise RequestError(f"published database {db} has no {table} table; run `make nightly`")
        info = published_info(session)
        version = champion_in(session, config.dataset.name)
        summary = latest_scores_summary(session, as_of_column)
        if version is None or summary is None or summary.last_as_of is None:
            raise RequestError(f"published database {db} has no champion or scores for {config.dataset.name!r}")
        scores = published_scores(session)
        history = scored_dates(session, as_of_column) if session.exists(HISTORY_SPEC) else []
    served = tuple(sorted({*history, summary.last_as_of}))
    return PublishedRows(info, stamp, version, summary.last_as_of, served, scores)


def load_state(config: ChurnConfig, compiled: CompiledFeatures) -> PublishedState:
    """Read the published database once, read-only, and build everything a request needs."""
    published = read_published(config, compiled.as_of_column)
    with timed(f"loading champion {published.version} and tonight's features", log):
        model = load_model(config, published.version, registry_db=config.warehouse.published_db)
        features = snapshot_features(compiled, published.tonight)
    # kept for the reasons of customers the nightly did not explain (scoring.reasons_for = flagged),
    # and the one copy of the feature values the answers read
    by_key = features.set_index(features[model.contract.key].astype(str)) if len(features) else features
    del features
    with timed(f"indexing {len(published.scores):,d} published answers", log):
        answers = AnswerIndex(published.scores, by_key, model.contract)
    landing = LandingIndex.build(compiled, published.served_dates, published.tonight, config.warehouse.engine,
                                 config.serving.landing_index_max_rows)
    return PublishedState(published.info, published.stamp, model, Explainer(model), published.tonight,
                          published.served_dates, answers, by_key, config.scoring.top_reasons, typical_values(model),
                          landing=landing)


def settle_heap() -> None:
    """Keep a loaded state out of the garbage collector's full passes.

    A state holds objects per customer (its keys in the position maps, the
    reasons the background thread caches) that live until the next publish.
    Python's cyclic collector walks every tracked object on each full pass,
    which showed as 60 ms pauses in the GET route's p99 when each answer was a
    dict of its own; frozen objects are skipped by it and still freed by
    reference counting when a newer state replaces them.
    Each call first unfreezes and collects, so cyclic garbage frozen by the
    previous call (an old state still held by a request then) is freed now.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class StateHolder:
    """The current state, and a watcher thread that swaps in the next publish without a restart."""

    def __init__(self, config: ChurnConfig, compiled: CompiledFeatures) -> None:
        self.config = config
        self.compiled = compiled
        self.current: PublishedState = load_state(config, compiled)
        self._freeze_heap = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._explaining: threading.Thread | None = None

    def refresh(self) -> bool:
        """Load the published database if it changed since the current state; True when swapped."""
        db = self.config.warehouse.published_db
        try:
            if file_stamp(db) == self.current.stamp:
                return False
            state = load_state(self.config, self.compiled)
        except Exception:  # a half-finished nightly must not take the server down: keep serving the old state
            log.exception("could not load the new publish of %s; still serving %s", db, self.current.info)
            return False
        self.current = state  # one reference assignment: requests hold whichever state they took
        if self._freeze_heap:
            settle_heap()
        log.info("serving publish %s (model %s, %d customers)", state.info, state.model.version, len(state.answers))
        self.explain(state)
        return True

    def explain(self, state: PublishedState) -> None:
        """Fill the reasons the nightly left out, in a background thread; requests meanwhile compute their own."""
        def run() -> None:
            # a newer publish or a stop ends it: its reasons would never be read
            with timed("reasons of the customers the nightly did not explain", log):
                done = state.explain_all(lambda: not self._stop.is_set() and self.current is state)
            log.info("%d customers' reasons computed in the background", done)

        self._explaining = threading.Thread(target=run, name="reasons", daemon=True)
        self._explaining.start()

    def start(self, freeze_heap: bool = False) -> None:
        """Serve: fill reasons, watch for publishes; `freeze_heap` (the server process) keeps
        each loaded state out of the cyclic collector's passes (`settle_heap`)."""
        self._freeze_heap = freeze_heap
        if freeze_heap:
            settle_heap()
        self.explain(self.current)

        def watch() -> None:
            while not self._stop.wait(self.config.serving.reload_seconds):
                self.refresh()

        self._thread = threading.Thread(target=watch, name="publish-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in (self._thread, self._explaining):
            if thread is not None:
                thread.join(timeout=5)
        if self.current.landing is not None:  # a replaced state's copy is freed with the state
            self.current.landing.close()


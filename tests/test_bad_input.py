"""Bad input never reaches BI: each fault gives a non-zero exit, a message naming the
file or table, the column and the number of rows, and a byte-identical published file.

Every case starts from one shared published baseline (small generated data, one
complete nightly) copied per fault, with exactly ONE fault applied. The nightly
runs as a real `churn nightly` subprocess; the faults run two at a time so the
file stays quick on two cores.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from ml.config import ChurnConfig
from ml.warehouse import connect

from .conftest import QUICK_TRAINING, REPO_ROOT, copy_warehouse, make_config, rewrite


def duplicate_customer_ids(config: ChurnConfig) -> None:
    # Five customers arrive twice with a different region: not exact duplicates, so staging keeps both.
    rewrite(config, "customers", """
        select * from t union all
        select * replace (case when lower(trim(region)) = 'north' then 'south' else 'north' end as region)
        from (select distinct on (customer_id) * from t order by customer_id limit 5)""")


def null_keys(config: ChurnConfig) -> None:
    rewrite(config, "payments", "select * replace (case when payment_id in "
            "(select payment_id from t group by payment_id having count(*) = 1 order by payment_id limit 7) "
            "then null else customer_id end as customer_id) from t")


def negative_amounts(config: ChurnConfig) -> None:
    rewrite(config, "payments", "select * replace (case when payment_id in "
            "(select payment_id from t group by payment_id having count(*) = 1 order by payment_id limit 6) "
            "then -abs(amount) - 1 else amount end as amount) from t")


def future_dates(config: ChurnConfig) -> None:
    rewrite(config, "usage_events", "select * replace (case when row_number() over () <= 4 "
            "then date '2999-01-01' else event_date end as event_date) from t")


def unknown_contract_type(config: ChurnConfig) -> None:
    rewrite(config, "subscriptions", "select * replace (case when subscription_id in "
            "(select subscription_id from t group by all having count(*) = 1 order by 1 limit 3) "
            "then 'Lifetime' else contract_type end "
            "as contract_type) from t")


def missing_column(config: ChurnConfig) -> None:
    rewrite(config, "payments", "select * exclude (amount) from t")


def text_in_amounts(config: ChurnConfig) -> None:
    rewrite(config, "payments", "select * replace (case when payment_id in "
            "(select payment_id from t group by payment_id having count(*) = 1 order by payment_id limit 5) "
            "then 'n/a' else amount::varchar end as amount) from t")


def empty_table(config: ChurnConfig) -> None:
    rewrite(config, "support_tickets", "select * from t limit 0")


def truncated_parquet(config: ChurnConfig) -> None:
    path = config.dataset.landing_dir / "usage_events.parquet"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_page(config: ChurnConfig) -> None:
    # Footer intact (row counts still read), 2 KB of zeros in the middle of the data pages.
    path = config.dataset.landing_dir / "usage_events.parquet"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 2000] = bytes(2000)
    path.write_bytes(bytes(data))


def no_churners(config: ChurnConfig) -> None:
    # Nobody ever cancels: the label share of the mart drops to 0, far below the plausible band.
    rewrite(config, "subscriptions", "select * replace (null::date as cancellation_date, "
            "null::varchar as cancellation_reason) from t")


def usage_third_missing_last_weeks(config: ChurnConfig) -> None:
    # A partial extract: a third of the last three weeks' usage rows, about 1.5% of the table.
    rewrite(config, "usage_events", "select * from t where not (event_date >= date '2025-06-10' "
            "and hash(customer_id, event_date) % 3 = 0)")


def usage_day_missing(config: ChurnConfig) -> None:
    rewrite(config, "usage_events", "select * from t where event_date <> date '2025-06-24'")


def usage_partial_last_day(config: ChurnConfig) -> None:
    rewrite(config, "usage_events", "select * from t where not (event_date = date '2025-06-30' "
            "and hash(customer_id) % 2 = 0)")


def stale_tickets(config: ChurnConfig) -> None:
    rewrite(config, "support_tickets", "select * from t where opened_at < timestamp '2025-06-15'")


def many_rows_after_cutoff(config: ChurnConfig) -> None:
    # 1% of usage rows dated a few days after the data end: far above gates.max_future_share.
    rewrite(config, "usage_events", "select * replace (case when hash(customer_id, event_date) % 100 = 0 "
            "then date '2025-07-05' else event_date end as event_date) from t")


def payments_before_signup(config: ChurnConfig) -> None:
    rewrite(config, "payments", "select * replace (case when payment_id in "
            "(select payment_id from t order by payment_id limit 6) then date '2017-01-01' "
            "else invoice_date end as invoice_date) from t")


@dataclass(frozen=True)
class Fault:
    name: str
    apply: Callable[[ChurnConfig], None]
    expected: tuple[str, ...]  # fragments the error must contain: file/table, column, count


FAULTS = [
    Fault("duplicate_customer_ids", duplicate_customer_ids,
          ("unique_stg_saas__customers_customer_id", "failures: 5")),
    Fault("null_keys", null_keys, ("not_null_stg_saas__payments_customer_id", "failures: 7")),
    Fault("negative_amounts", negative_amounts, ("stg_saas__payments_amount", "failures: 6")),
    Fault("future_dates", future_dates,
          ("demo_raw_usage_events (table usage_events, column event_date)", "failed [critical]: 4 of")),
    Fault("unknown_contract_type", unknown_contract_type,
          ("accepted_values_stg_saas__subscriptions_contract_type", "failures: 3")),  # rows, not values
    Fault("missing_column", missing_column, ("payments.parquet: required column(s) missing: amount",)),
    Fault("text_in_amounts", text_in_amounts, ("payments.parquet: column amount: 5 of", "rows are not double")),
    Fault("empty_table", empty_table, ("support_tickets.parquet: empty (0 rows)",)),
    Fault("truncated_parquet", truncated_parquet, ("usage_events.parquet: not readable as parquet",)),
    Fault("corrupt_page", corrupt_page, ("usage_events.parquet: not readable as parquet",)),
    Fault("usage_third_missing_last_weeks", usage_third_missing_last_weeks,
          ("incomplete extract: usage_events (column event_date)", "2025-06-10", "rows (expected")),
    Fault("usage_day_missing", usage_day_missing,
          ("incomplete extract: usage_events (column event_date): 1 day(s)", "2025-06-24 0 rows (expected")),
    Fault("usage_partial_last_day", usage_partial_last_day,
          ("incomplete extract: usage_events (column event_date): 1 day(s)", "2025-06-30")),
    Fault("stale_tickets", stale_tickets,
          ("stale source: support_tickets (column opened_at): newest event 2025-06-14", "9 day(s) late")),
    Fault("many_rows_after_cutoff", many_rows_after_cutoff,
          ("usage_events (column event_date):", "dated on or after the cutoff 2025-07-01, from 2025-07-05",
           "fail the run")),
    Fault("payments_before_signup", payments_before_signup,
          ("payments (column invoice_date): 6 row(s)", "before the customer's signup_date")),
    Fault("no_churners", no_churners,
          ("(table customer_features, column churned_within_30d): expect_column_mean_to_be_between failed",
           "observed 0.0")),
]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class Outcome:
    returncode: int
    output: str
    published_before: str
    published_after: str
    failed_steps: list[tuple[str, str]]
    score_returncode: int | None = None  # `churn score` run after the nightly (lost-feature case)
    score_output: str = ""


def run_nightly(config: ChurnConfig, *extra: str, command: str = "nightly",
                options: tuple[str, ...] = ()) -> tuple[int, str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ml.cli", "--config", str(config.source_file), *extra, command, *options],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    return proc.returncode, proc.stdout + proc.stderr


def failed_steps(config: ChurnConfig) -> list[tuple[str, str]]:
    with connect(config.warehouse.build_db, read_only=True) as con:
        return con.rows("select step, message from pipeline_runs where status = 'failed' order by started_at")


def drop_needed_feature(config: ChurnConfig) -> tuple[str, Path]:
    """Point the warehouse at a copy of the dbt project whose mart lacks one numeric feature
    the champion uses, in its SQL and its YAML alike (a YAML entry without the SQL column is
    refused before the build: tests/test_early_errors.py), so the build passes and scoring
    must refuse."""
    import yaml

    from ml.features.contract import load_contract
    from ml.features.dbt import dbt_target_path

    mart = config.dataset.feature_mart
    feature = load_contract(dbt_target_path(config) / "manifest.json", mart).numeric[0]
    project = config.warehouse.dir / "dbt_project_copy"
    shutil.copytree(config.warehouse.dbt_project_dir, project,
                    ignore=shutil.ignore_patterns("target", "logs", "dbt_packages"))
    marts = project / "models" / "marts"
    (marts / f"{mart}.sql").rename(marts / f"{mart}_full.sql")
    (marts / f"{mart}.sql").write_text(f"select * exclude ({feature}) from {{{{ ref('{mart}_full') }}}}\n")
    for path in marts.glob("*.yml"):
        spec = yaml.safe_load(path.read_text())
        for model in spec.get("models", []):
            if model["name"] == mart:
                model["columns"] = [c for c in model.get("columns", []) if c["name"] != feature]
        path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return feature, project


@pytest.fixture(scope="module")
def outcomes(published_warehouse: ChurnConfig, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Outcome]:
    """Every fault's nightly, two at a time, each in its own copy of the published baseline."""
    root = tmp_path_factory.mktemp("bad_input")
    jobs: dict[str, tuple[ChurnConfig, tuple[str, ...]]] = {}
    for fault in FAULTS:
        config = copy_warehouse(published_warehouse, root / fault.name, QUICK_TRAINING)
        fault.apply(config)
        jobs[fault.name] = (config, ())
    # The mart loses a feature the champion needs (through a private copy of the dbt project).
    config = copy_warehouse(published_warehouse, root / "mart_lost_feature", QUICK_TRAINING)
    feature, project = drop_needed_feature(config)
    config = make_config(root / "mart_lost_feature", {**QUICK_TRAINING, "warehouse": {"dbt_project_dir": str(project)}})
    jobs["mart_lost_feature"] = (config, ())
    (root / "lost_feature.txt").write_text(feature)
    # The Telco CSV with a row of 22 fields, and one with text in a numeric column.
    for name, mangle in (("csv_extra_field", lambda line: line + ",EXTRA"),
                         ("csv_text_in_number", lambda line: line.replace(",29.85,", ",twenty,", 1))):
        landing = root / name / "telco"
        landing.mkdir(parents=True)
        source = (REPO_ROOT / "data" / "telco" / "telco_customer_churn.csv").read_bytes().split(b"\r\n")
        source[1] = mangle(source[1].decode()).encode()
        (landing / "telco_customer_churn.csv").write_bytes(b"\r\n".join(source))
        config = copy_warehouse(published_warehouse, root / name / "wh",
                                {**QUICK_TRAINING, "datasets": {"telco": {"landing_dir": str(landing)}}})
        jobs[name] = (config, ("--dataset", "telco"))

    def run(name: str) -> tuple[str, Outcome]:
        config, extra = jobs[name]
        before = digest(config.warehouse.published_db)
        code, output = run_nightly(config, *extra)
        # a --dataset run records its steps in that dataset's own build database; `before`/`after`
        # stay the demo's published file, which another dataset's failed run must not touch either
        recorded = config.with_dataset(extra[1]) if extra else config
        steps = failed_steps(recorded) if recorded.warehouse.build_db.exists() else []
        score_code, score_output = run_nightly(config, command="score") if name == "mart_lost_feature" else (None, "")
        return name, Outcome(code, output, before, digest(config.warehouse.published_db), steps,
                             score_code, score_output)

    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(pool.map(run, jobs))
    results["_lost_feature"] = (root / "lost_feature.txt").read_text()
    return results


def assert_refused(outcome: Outcome, fragments: tuple[str, ...]) -> None:
    assert outcome.returncode != 0, outcome.output[-3000:]
    for fragment in fragments:
        assert fragment in outcome.output, (fragment, outcome.output[-3000:])
    assert outcome.published_after == outcome.published_before
    # The failing run is recorded in the build database with the same message.
    assert outcome.failed_steps, "failed run not recorded in pipeline_runs"
    assert fragments[0] in outcome.failed_steps[-1][1]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
def test_fault_is_refused_and_nothing_is_published(outcomes: dict[str, Outcome], fault: Fault) -> None:
    assert_refused(outcomes[fault.name], fault.expected)


def test_a_mart_without_a_champion_feature_is_refused(outcomes: dict[str, Outcome]) -> None:
    """The champion's feature is gone from the mart: the old model never scores it silently. The nightly
    either stops at the first stage reading the mart by its contract, or (the feature set changed, issue 14)
    trains a challenger on the new mart and says what the promotion rule decided."""
    feature = outcomes["_lost_feature"]
    outcome = outcomes["mart_lost_feature"]
    if outcome.returncode != 0:
        assert_refused(outcome, (feature, "customer_features"))
        assert outcome.failed_steps[-1][0] in ("profile", "score")
        assert outcome.score_returncode not in (0, None)
        assert feature in outcome.score_output and "customer_features" in outcome.score_output
    else:
        assert "feature definitions:" in outcome.output and feature in outcome.output, outcome.output[-3000:]
        assert "challenger" in outcome.output


def test_csv_row_with_an_extra_field_is_refused(outcomes: dict[str, Outcome]) -> None:
    assert_refused(outcomes["csv_extra_field"],
                   ("telco_customer_churn.csv: 1 malformed row(s), first at line 2",
                    "Expected Number of Columns: 21 Found: 22"))


def test_csv_text_in_a_numeric_column_is_refused(outcomes: dict[str, Outcome]) -> None:
    assert_refused(outcomes["csv_text_in_number"],
                   ("telco_customer_churn.csv: column MonthlyCharges: 1 of 7,043 rows are not double", "'twenty'"))

"""`churn score`: what BI reads must be complete, consistent, idempotent and refused when wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ml.cli import main
from ml.config import ChurnConfig
from ml.features.contract import ContractError, Feature, FeatureContract
from ml.modeling.explain import Explainer, reason_columns
from ml.modeling.registry import load_champion
from ml.modeling.score import (
    HISTORY_TABLE,
    SCORES_TABLE,
    ScoreError,
    check_mart,
    ranked_layout,
    reason_texts,
    risk_bands,
    score,
    score_frame,
    typical_values,
)
from ml.reports.summary import score_summary, success_line
from ml.warehouse import connect
from tests.conftest import QUICK_TRAINING, copy_warehouse, query


@pytest.fixture
def scoring_warehouse(trained_warehouse: ChurnConfig, tmp_path: Path) -> ChurnConfig:
    """A private copy of the trained warehouse that a test may score and change."""
    return copy_warehouse(trained_warehouse, tmp_path / "wh", QUICK_TRAINING)




def latest_active(config: ChurnConfig, key: str, as_of: str) -> pd.DataFrame:
    mart = config.dataset.feature_mart
    return query(config, f'select "{key}", "{as_of}" from "{mart}" '
                        f'where "{as_of}" = (select max("{as_of}") from "{mart}")')


def test_scores_cover_every_active_customer_consistently(scoring_warehouse: ChurnConfig) -> None:
    config = scoring_warehouse
    result = score(config)
    model = load_champion(config)
    key, as_of = model.contract.key, model.contract.as_of
    scores = query(config, f"select * from {SCORES_TABLE}")
    active = latest_active(config, key, as_of)
    k = config.scoring.top_reasons

    reasons = [c for i in range(1, k + 1) for c in (f"reason_{i}", f"reason_{i}_contribution", f"reason_{i}_text")]
    assert reasons[:2] == reason_columns(k)[:2]
    expected_columns = [key, as_of, "churn_probability", "will_churn", "risk_band", "rank",
                        *reasons, "contribution_unit", "model_version", "scored_at", "run_id"]
    assert list(scores.columns) == expected_columns
    # One row per active customer at the latest snapshot, and nothing else.
    assert len(scores) == len(active) == result.rows > 1000
    assert scores[key].is_unique
    assert set(scores[key]) == set(active[key])
    assert scores[as_of].nunique() == 1
    assert pd.Timestamp(scores[as_of].iloc[0]).date() == result.as_of_date
    with connect(config.warehouse.build_db, read_only=True) as con:
        assert con.columns(SCORES_TABLE)[as_of] == con.columns(config.dataset.feature_mart)[as_of]

    p = scores["churn_probability"].to_numpy()
    assert ((p >= 0) & (p <= 1)).all()
    # Exactly the champion's calibrated probability of each customer's mart row.
    mart_rows = query(config, f'select * from "{config.dataset.feature_mart}" where "{as_of}" = ?',
                     [result.as_of_date]).set_index(key).loc[scores[key]]
    np.testing.assert_allclose(p, model.predict_proba(mart_rows), rtol=0, atol=1e-12)
    assert scores["model_version"].eq(model.version).all()
    assert scores["run_id"].eq(result.run_id).all()
    # will_churn is the threshold decision, and the result counts it.
    np.testing.assert_array_equal(scores["will_churn"].to_numpy(), p >= model.threshold)
    assert result.flagged == int(scores["will_churn"].sum()) > 0
    # Ranks are 1..n, 1 = highest probability.
    assert sorted(scores["rank"]) == list(range(1, len(scores) + 1))
    by_rank = scores.sort_values("rank")["churn_probability"].to_numpy()
    assert (np.diff(by_rank) <= 0).all()
    # The band cannot contradict the decision: low exactly when not flagged, high only when flagged and likely.
    band = scores["risk_band"]
    np.testing.assert_array_equal((band == "low").to_numpy(), ~scores["will_churn"].to_numpy())
    high = (band == "high").to_numpy()
    assert (p[high] >= config.scoring.high_risk_probability).all()
    assert (p[(band == "medium").to_numpy()] < config.scoring.high_risk_probability).all()
    assert band.isin(["high", "medium", "low"]).all()
    # Contributions say their unit; every reason has a sentence with the customer's value and direction.
    assert scores["contribution_unit"].eq("log_odds" if model.algorithm != "random_forest" else "probability").all()
    descriptions = {f.name: f.description.strip().rstrip(".") or f.name for f in model.contract.features}
    # scoring.reasons_for = flagged: exactly the will_churn customers carry reasons.
    assert config.scoring.reasons_for == "flagged"
    flagged = scores["will_churn"].to_numpy(dtype=bool)
    for i in range(1, k + 1):
        for column in (f"reason_{i}", f"reason_{i}_contribution", f"reason_{i}_text"):
            np.testing.assert_array_equal(scores[column].notna().to_numpy(), flagged, err_msg=column)
    explained = scores[flagged]
    first = explained.iloc[0]
    for i in range(1, k + 1):
        text = first[f"reason_{i}_text"]
        assert text.startswith(descriptions[first[f"reason_{i}"]] + ": ")
        assert text.endswith("raises risk" if first[f"reason_{i}_contribution"] > 0 else "lowers risk")
    # Reasons name contract features, most churn-raising first.
    for i in range(1, k + 1):
        assert explained[f"reason_{i}"].isin(model.contract.feature_names).all()
    for i in range(1, k):
        assert (explained[f"reason_{i}_contribution"] >= explained[f"reason_{i + 1}_contribution"]).all()
    assert (explained[[f"reason_{i}" for i in range(1, k + 1)]].nunique(axis=1) == k).all()
    # Unexplained rows hold SQL NULL, not NaN (pandas reads both as NaN; BI's `is null` sees only one).
    (nulls, nans), = query(config, f"select count(*) filter (where reason_1_contribution is null), "
                                   f"count(*) filter (where isnan(reason_1_contribution)) from {SCORES_TABLE}"
                           ).itertuples(index=False)
    assert (nulls, nans) == (int((~flagged).sum()), 0)

    history = query(config, f"select * from {HISTORY_TABLE}")
    assert len(history) == len(scores)
    assert set(history.columns) == set(scores.columns)


def test_rescoring_replaces_instead_of_duplicating(scoring_warehouse: ChurnConfig) -> None:
    config = scoring_warehouse
    first = score(config)
    before = query(config, f"select * exclude (scored_at, run_id) from {SCORES_TABLE} order by rank")
    second = score(config, chunk_rows=700)  # several chunks: same answer as one
    after = query(config, f"select * exclude (scored_at, run_id) from {SCORES_TABLE} order by rank")
    assert second.rows == first.rows
    pd.testing.assert_frame_equal(before, after, check_exact=False, rtol=1e-9)
    model = load_champion(config)
    key, as_of = model.contract.key, model.contract.as_of
    history = query(config, f"select * from {HISTORY_TABLE}")
    assert len(history) == first.rows
    assert not history.duplicated([key, as_of, "model_version"]).any()
    assert history["run_id"].eq(second.run_id).all()


@pytest.mark.parametrize("change", ["drop", "retype"])
def test_a_mart_that_breaks_the_contract_is_refused(scoring_warehouse: ChurnConfig, change: str) -> None:
    config = scoring_warehouse
    score(config)
    before = query(config, f"select * from {SCORES_TABLE} order by rank")
    history_before = query(config, f"select count(*) as n from {HISTORY_TABLE}")["n"].iloc[0]
    column = load_champion(config).contract.numeric[0]
    mart = config.dataset.feature_mart
    with connect(config.warehouse.build_db) as con:
        if change == "drop":
            con.execute(f'alter table "{mart}" drop column "{column}"')
        else:
            con.execute(f'alter table "{mart}" alter column "{column}" type varchar')
    with pytest.raises(ContractError) as raised:
        score(config)
    message = str(raised.value)
    assert repr(column) in message and repr(mart) in message
    assert ("missing" if change == "drop" else "VARCHAR") in message
    # What BI reads is untouched by the refused run.
    pd.testing.assert_frame_equal(query(config, f"select * from {SCORES_TABLE} order by rank"), before)
    assert query(config, f"select count(*) as n from {HISTORY_TABLE}")["n"].iloc[0] == history_before


def test_scoring_without_a_champion_says_to_train(private_warehouse: ChurnConfig) -> None:
    with pytest.raises(ScoreError, match="no champion model; run churn train"):
        score(private_warehouse)
    with connect(private_warehouse.warehouse.build_db, read_only=True) as con:
        assert not con.exists(SCORES_TABLE)


@pytest.fixture
def quiet_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `main` from binding a log handler to this test's captured stderr (closed afterwards)."""
    monkeypatch.setattr("ml.cli.configure_logging", lambda verbose=False: None)


def test_cli_scores_and_reports(
    scoring_warehouse: ChurnConfig, capsys: pytest.CaptureFixture, quiet_cli: None
) -> None:
    assert main(["--config", str(scoring_warehouse.source_file), "score", "--chunk-rows", "1000"]) == 0
    out = capsys.readouterr().out
    rows = query(scoring_warehouse, f"select count(*) as n from {SCORES_TABLE}")["n"].iloc[0]
    assert f"{rows:,d} customers" in out and "flagged" in out


def test_cli_without_champion_exits_non_zero(
    private_warehouse: ChurnConfig, caplog: pytest.LogCaptureFixture, quiet_cli: None
) -> None:
    assert main(["--config", str(private_warehouse.source_file), "score"]) == 1
    assert "no champion model; run churn train" in caplog.text


@pytest.mark.parametrize("keys", [["c9", "c10", "c2", "c1", "c3"], [9, 10, 2, 1, 3]])
def test_ranks_put_the_highest_probability_first_and_break_ties_by_key(small_config: ChurnConfig,
                                                                        keys: list) -> None:
    contract = FeatureContract(model="m", key="customer_id", as_of="as_of_date", label="churned",
                               features=(Feature("x", "numeric"),))
    scores = pd.DataFrame({"customer_id": keys, "as_of_date": pd.Timestamp("2026-01-01"),
                           "churn_probability": [0.2, 0.5, 0.5, 0.2, 0.9], "will_churn": False,
                           "contribution_unit": "log_odds"})
    ranked = ranked_layout(scores, small_config, contract, "v1", "run-1", threshold=0.6)
    by_rank = ranked.sort_values("rank")["customer_id"].tolist()
    # ties ordered by key as the key's type orders it: "c10" < "c2" as text, 2 < 10 as numbers
    text = isinstance(keys[0], str)
    assert by_rank == (["c3", "c10", "c2", "c1", "c9"] if text else [3, 2, 10, 1, 9])
    assert ranked["rank"].tolist() == ([5, 2, 3, 4, 1] if text else [5, 3, 2, 4, 1])  # rows keep their order


def test_risk_bands_follow_the_decision() -> None:
    p = np.array([0.0, 0.0199, 0.02, 0.2999, 0.3, 1.0])
    # threshold 0.02: everything flagged is at least medium, nothing unflagged is above low.
    assert list(risk_bands(p, 0.02, 0.3)) == ["low", "low", "medium", "medium", "high", "high"]
    # A threshold above the high bound: every flagged customer is high, none medium, the rest low.
    assert list(risk_bands(p, 0.5, 0.3)) == ["low", "low", "low", "low", "low", "high"]


def test_reason_text_names_value_typical_value_and_direction(trained_warehouse: ChurnConfig) -> None:
    model = load_champion(trained_warehouse)
    numeric = next(f for f in model.contract.features if f.kind == "numeric")
    frame = pd.DataFrame({numeric.name: [12.0, float("nan")]})
    reasons = pd.DataFrame({"reason_1": pd.array([numeric.name] * 2, dtype="string"),
                            "reason_1_contribution": [0.4, -0.1]})
    texts = reason_texts(model, frame, reasons, 1, {numeric.name: "340"})["reason_1_text"]
    label = numeric.description.strip().rstrip(".") or numeric.name
    assert list(texts) == [f"{label}: 12 (typical 340), raises risk", f"{label}: missing (typical 340), lowers risk"]
    assert numeric.name in typical_values(model)


def test_nightly_summary_reports_scores_and_held_out_metrics(scoring_warehouse: ChurnConfig) -> None:
    config = scoring_warehouse
    result = score(config)
    lines = score_summary(config)
    text = "\n".join(lines)
    assert f"scored {result.rows:,d} customers as of {result.as_of_date}" in text
    assert f"model {result.model_version}: {result.flagged:,d} flagged ({result.flagged_share:.1%})" in text
    metrics = query(
        config,
        "select split, recall, precision, roc_auc from model_metrics "
        "where model_version = ? and split in ('out_of_time', 'baseline')",
        [result.model_version],
    ).set_index("split")
    for metric in ("recall", "precision", "roc_auc"):
        line = next(row for row in lines if row.split()[0] == metric)
        assert line.split() == [metric, f"{metrics.loc['out_of_time', metric]:.3f}",
                                f"{metrics.loc['baseline', metric]:.3f}"]
    # The criterion is judged in words, and the operating point is said in people.
    recall = metrics.loc["out_of_time", "recall"]
    target = config.problem.success_target
    verdict = f"met ({recall:.3f} held out)" if recall >= target else f"MISSED ({recall:.3f} held out)"
    assert f"success criterion recall >= {target}: {verdict}" in text
    p = query(config, f"select churn_probability, will_churn from {SCORES_TABLE}")
    caught = p.loc[p["will_churn"], "churn_probability"].sum()
    missed = p.loc[~p["will_churn"], "churn_probability"].sum()
    assert f"contact {result.flagged:,d} of {result.rows:,d} active customers" in text
    assert f"about {caught:,.0f} of them are expected to churn" in text
    assert f"about {missed:,.0f} expected churners are not flagged" in text


def test_success_line_says_met_or_missed() -> None:
    assert success_line("recall", 0.795, 0.8) == "  ✗ success criterion recall >= 0.8: MISSED (0.795 held out)"
    assert success_line("recall", 0.81, 0.8).startswith("  ✓ success criterion recall >= 0.8: met")


def test_nightly_summary_says_when_nothing_was_scored(private_warehouse: ChurnConfig) -> None:
    assert score_summary(private_warehouse) == [f"  no {SCORES_TABLE} table: nothing was scored"]


def test_check_mart_names_every_mismatch() -> None:
    trained = FeatureContract("mart", "key", "as_of", "label",
                              (Feature("f_num", "numeric"), Feature("f_cat", "categorical"),
                               Feature("f_gone", "numeric")))
    today = FeatureContract("mart", "key", "as_of", "label",
                            (Feature("f_num", "numeric"), Feature("f_cat", "numeric")))
    columns = {"key": "VARCHAR", "as_of": "DATE", "f_num": "VARCHAR", "f_cat": "DOUBLE"}
    with pytest.raises(ContractError) as raised:
        check_mart(trained, today, "mart", columns, "m1")
    message = str(raised.value)
    assert "'mart'" in message and "m1" in message
    assert "missing feature 'f_gone'" in message
    assert "feature 'f_cat' changed kind categorical -> numeric" in message
    assert "column 'f_gone' is missing from the table" in message
    assert "numeric feature 'f_num' has type VARCHAR" in message
    check_mart(trained, trained, "mart", {**columns, "f_num": "DECIMAL(18,2)", "f_gone": "BIGINT"}, "m1")


def test_flagged_only_reasons_equal_the_full_explanation_where_given(trained_warehouse: ChurnConfig) -> None:
    """reasons_for=flagged explains exactly the will_churn rows, with the same reasons `all` gives them,
    and leaves the others NULL (the API explains them on demand); a chunk with nobody flagged works."""
    model = load_champion(trained_warehouse)
    c = model.contract
    mart = trained_warehouse.dataset.feature_mart
    rows = query(trained_warehouse, f'select * from "{mart}" where "{c.as_of}" = (select max("{c.as_of}") '
                                    f'from "{mart}") order by "{c.key}" limit 400')
    explainer = Explainer(model)
    everyone = score_frame(model, explainer, rows, 3, reasons_for="all")
    flagged_only = score_frame(model, explainer, rows, 3, reasons_for="flagged")
    flagged = everyone["will_churn"].to_numpy(dtype=bool)
    assert 0 < flagged.sum() < len(rows)
    assert list(flagged_only.columns) == list(everyone.columns)
    assert flagged_only.dtypes.to_dict() == everyone.dtypes.to_dict()
    pd.testing.assert_frame_equal(flagged_only[flagged], everyone[flagged])
    assert flagged_only.loc[~flagged, [c for c in flagged_only if c.startswith("reason_")]].isna().all().all()
    nobody = score_frame(model, explainer, rows[~flagged].head(20), 3, reasons_for="flagged")
    assert len(nobody) == 20 and nobody["reason_1"].isna().all()
    # the API leaves the texts out: everything else is the same, for all rows and for flagged-only reasons
    for reasons_for, full in (("all", everyone), ("flagged", flagged_only)):
        bare = score_frame(model, explainer, rows, 3, reasons_for=reasons_for, texts=False)
        pd.testing.assert_frame_equal(bare, full[[c for c in full.columns if not c.endswith("_text")]])


def test_a_value_summed_in_another_order_prints_the_same_reason_text() -> None:
    """Spark and DuckDB sum in different orders; at a rounding boundary the last bit used to flip the text."""
    import numpy as np

    from ml.modeling.score import _format_value

    boundary = -3.085  # minutes over whole days hit such values often
    below, above = np.nextafter(boundary, -np.inf), np.nextafter(boundary, np.inf)
    assert f"{below:,.3g}" != f"{above:,.3g}", "the planted pair must round apart without the fix"
    assert _format_value(below) == _format_value(above) == _format_value(boundary)
    assert _format_value(np.nextafter(3.0, 0.0)) == "3"

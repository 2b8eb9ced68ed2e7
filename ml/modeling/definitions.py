"""Has the mart redefined the features a model was trained on?

A model records fingerprints of its features (`ml.features.fingerprint`): the
SQL of the mart and everything upstream (per model), its contract, and each
feature's values on the model's own held-out rows (per column). Tonight's mart
is checked against them:

- the contract gained features: the model still scores correctly, but a
  challenger should learn from them (`added`);
- the contract dropped or re-kinded a feature the model uses: it cannot score;
- the SQL changed: the model's held-out rows are re-read from the new mart and
  each feature whose values differ is `redefined`; features whose values are
  unchanged keep their meaning, so an unrelated SQL edit changes nothing.

Scoring refuses a model whose features were redefined (`affects_model`), so an
old model never silently scores a new definition.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from ml.config import ChurnConfig
from ml.features.contract import ContractError, FeatureContract
from ml.features.dbt import dbt_target_path
from ml.features.fingerprint import contract_fingerprint, sql_fingerprint, value_fingerprints
from ml.features.mart import MartError, TrainingError, current_contract, load_evaluation_rows
from ml.modeling.model import ChurnModel
from ml.warehouse import Reader

SQL = "sql"
CONTRACT = "contract"
VALUES = "values"


@dataclass(frozen=True)
class DefinitionCheck:
    """What changed in the mart's feature definitions since `version` was trained."""

    version: str | None
    known: bool  # False: the model predates fingerprints, nothing can be said
    sql_changed: bool = False
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    rekinded: tuple[str, ...] = ()
    redefined: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    @property
    def affects_model(self) -> bool:
        """The model would score something other than what it learned."""
        return bool(self.removed or self.rekinded or self.redefined)

    @property
    def changed(self) -> bool:
        """The model's features were redefined, or new ones are available."""
        return self.affects_model or bool(self.added)

    def describe(self) -> str:
        parts = []
        if self.redefined:
            parts.append(f"redefined (values differ on its held-out rows): {', '.join(self.redefined)}")
        if self.removed:
            parts.append(f"removed: {', '.join(self.removed)}")
        if self.rekinded:
            parts.append(f"changed kind: {', '.join(self.rekinded)}")
        if self.added:
            parts.append(f"added: {', '.join(self.added)}")
        if not parts:
            return "no feature definition changed" + (" (the SQL changed, the model's features compute the same values)"
                                                      if self.sql_changed else "")
        return f"features of model {self.version} " + "; ".join(parts)


def definitions_of(config: ChurnConfig, contract: FeatureContract, eval_frame: Any) -> dict[str, Any]:
    """The fingerprints training records in a model's metadata (`feature_definitions`)."""
    manifest = dbt_target_path(config) / "manifest.json"
    return {
        # None: the rows did not come from a dbt build here (a mart written directly, as in tests and
        # benchmarks); the value fingerprints still tell a redefined feature.
        SQL: sql_fingerprint(manifest, contract.model) if manifest.is_file() else None,
        CONTRACT: contract_fingerprint(contract),
        VALUES: value_fingerprints(eval_frame, contract),
        "granularity": {SQL: "per mart model (its SQL and every upstream model and macro)",
                        VALUES: "per contract feature, on the model's held-out rows"},
    }


def current_definitions_sha256(config: ChurnConfig) -> str:
    """One hash of tonight's mart SQL and contract: equal for models trained on the same definitions."""
    contract = current_contract(config)
    sql = sql_fingerprint(dbt_target_path(config) / "manifest.json", contract.model)
    return definitions_sha256(sql, contract_fingerprint(contract))


def definitions_sha256(sql: str, contract: str) -> str:
    return hashlib.sha256(f"{sql}|{contract}".encode()).hexdigest()


def model_definitions_sha256(model: ChurnModel) -> str | None:
    recorded = model.metadata.feature_definitions
    if not recorded:
        return None
    return definitions_sha256(str(recorded[SQL]), str(recorded[CONTRACT]))


def check_definitions(data: Reader, config: ChurnConfig, model: ChurnModel) -> DefinitionCheck:
    """Compare tonight's mart with what `model` was trained on (see the module doc).

    `data` is where the mart is: the build DuckDB, or Spark's warehouse when
    the mart was built there (the held-out rows are re-read with the SQL both
    engines share, so the check is the same on either).
    """
    recorded = model.metadata.feature_definitions
    if not recorded:
        return DefinitionCheck(model.version, known=False,
                               notes=("the model predates feature fingerprints; not checked",))
    if not (dbt_target_path(config) / "manifest.json").is_file():
        return DefinitionCheck(model.version, known=False,
                               notes=("no dbt build of this mart to compare with (a mart written directly)",))
    contract = current_contract(config)
    mine = {f.name: f.kind for f in model.contract.features}
    theirs = {f.name: f.kind for f in contract.features}
    added = tuple(n for n in theirs if n not in mine)
    removed = tuple(n for n in mine if n not in theirs)
    rekinded = tuple(n for n in mine if n in theirs and mine[n] != theirs[n])
    sql_now = sql_fingerprint(dbt_target_path(config) / "manifest.json", contract.model)
    sql_changed = sql_now != recorded[SQL]
    redefined: tuple[str, ...] = ()
    notes: list[str] = []
    if sql_changed:
        kept = [n for n in mine if n not in removed and n not in rekinded]
        try:
            rows = load_evaluation_rows(data, config, model.contract, model.metadata.validation or {})
        except (ContractError, MartError, TrainingError, KeyError) as exc:
            # Its rows cannot be re-read: every kept feature may have changed.
            notes.append(f"held-out rows could not be re-read ({exc}); all features treated as redefined")
            redefined = tuple(kept)
        else:
            now = value_fingerprints(rows, model.contract)
            before = recorded.get(VALUES) or {}
            redefined = tuple(n for n in kept if before.get(n) != now.get(n))
    return DefinitionCheck(model.version, True, sql_changed, added, removed, rekinded, redefined, tuple(notes))

"""The feature contract: which mart columns are keys, label and features.

Analysts own the feature definitions in SQL; the mart's YAML marks each
column's role and kind under `config.meta`. Reading that from dbt's manifest
(rather than a Python list) is what lets a feature be added with SQL and YAML
alone: the next training run picks it up.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROLES = ("key", "as_of", "label", "feature", "split")
# `split` is optional: a column of train/test the analyst fixed; training holds out its test rows.
KINDS = ("numeric", "categorical")


class ContractError(ValueError):
    """The mart's YAML does not describe a usable contract, or data does not match it."""


@dataclass(frozen=True)
class Feature:
    name: str
    kind: str  # numeric | categorical
    description: str = ""


@dataclass(frozen=True)
class FeatureContract:
    model: str
    key: str
    as_of: str
    label: str
    features: tuple[Feature, ...]
    split: str | None = None  # the given train/test column, when the mart declares one

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def numeric(self) -> list[str]:
        return [f.name for f in self.features if f.kind == "numeric"]

    @property
    def categorical(self) -> list[str]:
        return [f.name for f in self.features if f.kind == "categorical"]

    @property
    def columns(self) -> list[str]:
        return [self.key, self.as_of, self.label, *([self.split] if self.split else []), *self.feature_names]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureContract:
        return cls(
            model=data["model"],
            key=data["key"],
            as_of=data["as_of"],
            label=data["label"],
            features=tuple(Feature(**f) for f in data["features"]),
            split=data.get("split"),
        )

    def check_columns(self, table: str, available: dict[str, str] | list[str]) -> None:
        """Refuse a table whose columns do not match, naming each missing column."""
        present = set(available)
        missing = [c for c in self.columns if c not in present and c != self.label]
        if missing:
            raise ContractError(
                f"table {table!r} does not match the feature contract of {self.model!r}: "
                f"missing column(s) {', '.join(missing)}"
            )

    def diff(self, other: FeatureContract) -> list[str]:
        """Human-readable differences between two contracts (model vs current mart)."""
        mine = {f.name: f.kind for f in self.features}
        theirs = {f.name: f.kind for f in other.features}
        problems = [f"missing feature {n!r}" for n in mine if n not in theirs]
        problems += [
            f"feature {n!r} changed kind {mine[n]} -> {theirs[n]}"
            for n in mine
            if n in theirs and mine[n] != theirs[n]
        ]
        for role in ("key", "as_of", "label"):
            if getattr(self, role) != getattr(other, role):
                problems.append(f"{role} column changed {getattr(self, role)!r} -> {getattr(other, role)!r}")
        return problems


def _column_meta(column: dict[str, Any]) -> dict[str, Any]:
    # dbt >= 1.10 keeps column meta under config.meta; older YAML puts it at top level.
    return {**(column.get("meta") or {}), **((column.get("config") or {}).get("meta") or {})}


def load_contract(manifest_path: Path, model: str) -> FeatureContract:
    """Read the contract of mart `model` from a dbt manifest.json."""
    if not manifest_path.is_file():
        raise ContractError(f"dbt manifest not found: {manifest_path} (run the dbt build first)")
    manifest = json.loads(manifest_path.read_text())
    nodes = [
        n for n in manifest["nodes"].values()
        if n.get("resource_type") == "model" and n.get("name") == model
    ]
    if not nodes:
        raise ContractError(f"{manifest_path}: no model named {model!r}")
    columns = nodes[0].get("columns") or {}
    by_role: dict[str, list[str]] = {r: [] for r in ROLES}
    features: list[Feature] = []
    problems: list[str] = []
    for name, column in columns.items():
        meta = _column_meta(column)
        role = meta.get("role")
        if role is None:
            continue  # documented but not part of the contract (e.g. audit columns)
        if role not in ROLES:
            problems.append(f"column {name!r}: role {role!r} not one of {ROLES}")
            continue
        by_role[role].append(name)
        if role == "feature":
            kind = meta.get("kind")
            if kind not in KINDS:
                problems.append(f"feature {name!r}: kind {kind!r} not one of {KINDS}")
                continue
            features.append(Feature(name=name, kind=kind, description=column.get("description", "")))
    for role in ("key", "as_of", "label"):
        if len(by_role[role]) != 1:
            problems.append(f"exactly one column needs role {role!r}, found {by_role[role] or 'none'}")
    if len(by_role["split"]) > 1:
        problems.append(f"at most one column may have role 'split', found {by_role['split']}")
    if not features:
        problems.append("no column has role 'feature'")
    if problems:
        raise ContractError(f"model {model!r} ({nodes[0].get('original_file_path')}): " + "; ".join(problems))
    return FeatureContract(
        model=model,
        key=by_role["key"][0],
        as_of=by_role["as_of"][0],
        label=by_role["label"][0],
        features=tuple(features),
        split=by_role["split"][0] if by_role["split"] else None,
    )

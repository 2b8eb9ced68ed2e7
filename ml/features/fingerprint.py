"""Fingerprints of what a feature means, so a model knows when its features were redefined.

Three fingerprints are recorded with every model:

- `sql`: per MART MODEL, not per column: sha256 over the dbt manifest's
  checksum (of the raw SQL file) of the mart and of every model and macro
  upstream of it. Raw, not compiled, code: the compiled SQL embeds the run's
  `as_of` var and database name, which change every night without any
  definition changing.
- `contract`: sha256 of the mart's contract (key, as_of, label, every feature's
  name, kind and type), so a feature added, dropped or re-kinded is seen.
- `values`: per CONTRACT FEATURE, sha256 of its values on fixed rows (the
  model's held-out rows, ordered by key and as_of). SQL cannot be attributed
  to a column reliably (CTEs, macros, `select *`), but its effect can: when
  `sql` changed, re-reading those rows from the new mart and comparing these
  hashes says which features now compute something else.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ml.features.contract import ContractError, FeatureContract

# Coarse on purpose: a parallel sum's last-bit noise must not straddle a rounding
# boundary on any of thousands of values, while a real redefinition moves values far more.
SIGNIFICANT_DIGITS = 6
NOISE_FLOOR = 1e-9  # relative to the column's largest magnitude


def sql_fingerprint(manifest_path: Path, model: str) -> str:
    """sha256 of the checksums of `model` and everything it depends on, from a dbt manifest."""
    if not manifest_path.is_file():
        raise ContractError(f"dbt manifest not found: {manifest_path} (run the dbt build first)")
    manifest = json.loads(manifest_path.read_text())
    nodes: dict[str, Any] = {**manifest.get("nodes", {}), **manifest.get("macros", {})}
    roots = [uid for uid, node in manifest.get("nodes", {}).items()
             if node.get("resource_type") == "model" and node.get("name") == model]
    if not roots:
        raise ContractError(f"{manifest_path}: no model named {model!r}")
    seen: dict[str, str] = {}
    pending = list(roots)
    while pending:
        uid = pending.pop()
        if uid in seen or uid not in nodes:
            continue  # sources have no SQL of their own; their types are the landing contract's
        node = nodes[uid]
        checksum = (node.get("checksum") or {}).get("checksum")
        seen[uid] = checksum or hashlib.sha256(str(node.get("macro_sql", "")).encode()).hexdigest()
        depends = node.get("depends_on") or {}
        pending += list(depends.get("nodes", [])) + list(depends.get("macros", []))
    payload = json.dumps(sorted(seen.items())).encode()
    return hashlib.sha256(payload).hexdigest()


def contract_fingerprint(contract: FeatureContract) -> str:
    return hashlib.sha256(json.dumps(contract.to_dict(), sort_keys=True).encode()).hexdigest()


def value_fingerprints(frame: pd.DataFrame, contract: FeatureContract) -> dict[str, str]:
    """Per contract feature present in `frame`, sha256 of its values ordered by (key, as_of).

    Values are hashed as text so a column that moved from integer to double
    with the same numbers is the same definition; missing values hash as one
    token. Numbers are rounded to SIGNIFICANT_DIGITS first: DuckDB sums
    doubles in parallel, so two builds of the same SQL differ in the last bits.
    Values within NOISE_FLOOR of the column's largest magnitude hash as 0: a
    difference of two near-equal sums (a trend) is 1e-15 in one build and
    -2e-15 in the next, which no significant-digit rounding makes equal.
    """
    ordered = frame.sort_values([contract.key, contract.as_of], kind="mergesort")
    out: dict[str, str] = {}
    for name in contract.feature_names:
        if name not in ordered.columns:
            continue
        column = ordered[name]
        numeric = pd.to_numeric(column, errors="coerce") if name in contract.numeric else None
        if numeric is not None and not (numeric.isna() & column.notna()).any():
            values = numeric.to_numpy(dtype=float)
            finite = np.abs(values[np.isfinite(values)])
            floor = (float(finite.max()) if finite.size else 0.0) * NOISE_FLOOR
            values = np.where(np.abs(values) <= floor, 0.0, values)
            text = pd.Series(["\\N" if np.isnan(v) else f"{float(v):.{SIGNIFICANT_DIGITS}g}" for v in values])
        else:
            text = column.map(lambda v: "\\N" if pd.isna(v) else str(v))
        out[name] = hashlib.sha256("\x1f".join(text.tolist()).encode()).hexdigest()
    return out

"""One verdict of a quality check: what the audit stores and the data-docs pages show.

Its own module so the audit (which writes data_quality_results) and the data
docs (which render each verdict) share one record instead of a record and a
protocol mirroring it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CheckResult:
    """The verdict on one expectation, as stored in data_quality_results."""

    suite: str
    table_name: str
    expectation_type: str
    column_name: str | None
    severity: str
    success: bool
    observed_value: str | None
    unexpected_count: int | None
    element_count: int | None
    details: str
    rows_checked: int | None = None
    scope: str = "all"

    def describe(self) -> str:
        if self.unexpected_count is not None and self.element_count is not None:
            tonight = " of tonight's" if self.scope == "tonight" else ""
            facts = [f"{self.unexpected_count:,d} of {self.element_count:,d}{tonight} rows"]
        else:
            facts = [f"observed {self.observed_value}"] if self.observed_value is not None else []
        facts += [self.details] if self.details else []
        column = f", column {self.column_name}" if self.column_name else ""
        return (f"{self.suite} (table {self.table_name}{column}): "
                f"{self.expectation_type} failed [{self.severity}]: {'; '.join(facts)}")

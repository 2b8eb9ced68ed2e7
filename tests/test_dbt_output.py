"""dbt's output is stored without terminal colour codes, and dbt is told not to colour it."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

import ml.features.dbt as dbt
from tests.conftest import make_config


def test_a_failing_dbt_is_reported_without_colour_codes(tmp_path: Path, monkeypatch) -> None:
    """Plant a dbt that colours its error output (as dbt does even into a pipe) and fails."""
    fake = tmp_path / "dbt"
    fake.write_text("#!/bin/sh\n"
                    "printf '\\033[31mCompilation Error\\033[0m in model \\033[1mcustomer_features\\033[0m\\n'\n"
                    "echo \"colours=$DBT_USE_COLORS\" >&2\n"
                    "exit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(dbt, "dbt_executable", lambda: str(fake))
    config = make_config(tmp_path / "wh")
    with pytest.raises(dbt.DbtError) as caught:
        dbt.run_dbt(config, "build")
    message = str(caught.value)
    assert "\x1b" not in message
    assert "Compilation Error in model customer_features" in message
    assert "colours=false" in message

"""Churn-prediction warehouse pipeline: dbt features on DuckDB, models, scores, monitoring."""

__version__ = "0.1.0"

"""Churn-prediction warehouse pipeline: dbt features on DuckDB, models, scores, monitoring."""

import os

# OpenMP threads (XGBoost, scikit-learn) busy-wait between parallel regions by
# default; on a shared or oversubscribed machine that made a 2-thread XGBoost fit
# over 20x slower than a 1-thread one. Passive waiting must be set before the
# OpenMP runtime loads, i.e. before sklearn/xgboost are imported: here.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

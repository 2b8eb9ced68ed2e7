# Two commands on a fresh machine: `make nightly` and `make test`.
# Both create .venv and install the project into it when it is missing or
# pyproject.toml changed (the stamp file records the install).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SPARK_STAMP := $(VENV)/.installed-spark
DATASET ?=
# ENGINE=spark runs the data plane on Spark local mode (installs the .[spark] extra; needs Java 17)
ENGINE ?=
ENGINE_STAMP := $(if $(filter spark,$(ENGINE)),$(SPARK_STAMP),$(STAMP))
ENGINE_ENV := $(if $(ENGINE),CHURN_ENGINE=$(ENGINE) $(if $(filter spark,$(ENGINE)),PYSPARK_PYTHON=$(abspath $(BIN)/python),),)
# e.g. BENCH_NIGHTLY_ARGS='--customers 200000 --months 12' (python -m benchmarks.nightly --help)
BENCH_NIGHTLY_ARGS ?=
DATASET_FLAG := $(if $(DATASET),--dataset $(DATASET),)

.DEFAULT_GOAL := help
.PHONY: help install nightly build train score monitor publish backfill profile generate serve bench-api bench-nightly bench-engines docs report-screenshots lint test test-slow test-spark bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  DATASET=telco selects another dataset profile from churn.yml; ENGINE=spark runs it on Spark local mode"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install the project

nightly: $(ENGINE_STAMP) ## the whole refresh on the demo data (or DATASET=..., ENGINE=spark)
	$(ENGINE_ENV) $(BIN)/churn $(DATASET_FLAG) nightly

build: $(STAMP) ## dbt build of the feature mart only
	$(BIN)/churn $(DATASET_FLAG) build

generate: $(STAMP) ## (re)generate the demo landing data
	$(BIN)/churn generate --overwrite

profile: $(STAMP) ## EDA profile of the feature mart, with plots
	$(BIN)/churn $(DATASET_FLAG) profile

train: $(STAMP) ## train a challenger now (champion only if it wins)
	$(BIN)/churn $(DATASET_FLAG) train --force

score: $(STAMP) ## score active customers with the champion
	$(BIN)/churn $(DATASET_FLAG) score

monitor: $(STAMP) ## drift and performance monitoring
	$(BIN)/churn $(DATASET_FLAG) monitor

publish: $(STAMP) ## publish BI tables atomically
	$(BIN)/churn $(DATASET_FLAG) publish

backfill: $(STAMP) ## replay a few months of nightly runs for monitoring history
	$(BIN)/churn backfill

serve: $(STAMP) ## real-time scoring API (FastAPI) on 127.0.0.1:8000; docs at /docs
	$(BIN)/churn $(DATASET_FLAG) serve

bench-api: $(STAMP) ## bounded loopback load on both API routes (50/100/200 req/s); p50/p95/p99 saved
	$(BIN)/python -m benchmarks.api

docs: $(STAMP) ## dbt docs (lineage to the exposures, every column): generate, then serve on 127.0.0.1:8080
	$(BIN)/python -m ml.reports.dbt_docs

report-screenshots: $(STAMP) ## PNG of every report page (after make nightly) under warehouse/reports/screenshots/
	$(BIN)/python -m ml.reports.screenshots

lint: $(STAMP) ## ruff (style, bug-prone patterns, import order) and the dbt dialect lint (no DuckDB-only SQL)
	$(BIN)/ruff check ml tests benchmarks
	$(BIN)/python -m ml.features.dialect_lint dbt_project

test: $(STAMP) ## the test suite (small generated data, a few minutes)
	$(BIN)/python -m pytest

test-slow: $(STAMP) ## also the large-scale variants
	$(BIN)/python -m pytest -m "not spark"

$(SPARK_STAMP): pyproject.toml $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,spark]'
	touch $(SPARK_STAMP)

test-spark: $(SPARK_STAMP) ## the demo built on Spark local mode equals DuckDB's (installs .[spark]; needs Java 17)
	PYSPARK_PYTHON=$(abspath $(BIN)/python) $(BIN)/python -m pytest -m spark

bench: $(STAMP) ## speed and memory benchmarks, then the 1M nightly figures (an hour or more; results printed and saved)
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.nightly $(BENCH_NIGHTLY_ARGS)

bench-nightly: $(STAMP) ## issue 10's figures at 1M customers x 12 and 24 months in one command (BENCH_NIGHTLY_ARGS=...)
	$(BIN)/python -m benchmarks.nightly $(BENCH_NIGHTLY_ARGS)

bench-engines: $(SPARK_STAMP) ## the demo nightly twice on DuckDB, then on Spark local mode; per-stage ratios saved (run alone)
	$(BIN)/python -m benchmarks.engines

clean: ## remove generated warehouse content (keeps the venv)
	rm -rf warehouse/*.duckdb warehouse/*.duckdb.wal warehouse/landing warehouse/oracle warehouse/models warehouse/reports warehouse/dbt_target warehouse/generated_suites warehouse/spark
	@# other datasets' own folders (warehouse/<dataset>/, see README "Where each dataset's files live")
	rm -rf $(patsubst %/build.duckdb,%,$(wildcard warehouse/*/build.duckdb))

{#- Incremental snapshot models (customer x as_of_date): the spine, the
    *_windowed models and the mart.

    A past snapshot's features never change once built (they read only events
    before its as_of_date), so a nightly run keeps every stored snapshot dated
    before the previous run's latest as_of_date and (re)builds the grid dates
    from that date on: the previous latest (a mid-month scoring date is no
    longer on tonight's grid; a month start may have gained a cancellation
    dated on it) and tonight's. The pre-hook deletes them and the model inserts
    them again, in the model's one transaction, so a killed run leaves the
    model as it was and the next run repeats the same work.

    Design notes (DuckDB and Spark share this SQL):
    - the rebuild date is read with run_query when the model is compiled and
      written into the SQL as a date literal, so engines prune by it;
    - a night earlier than what a model holds is refused here; the pipeline
      (ml/features/incremental.py) full-refreshes such a night before dbt
      would see it. -#}

{#- The first as_of_date this run rebuilds, as a date literal; none when the
    model is built from scratch (first build, --full-refresh, or a changed
    definition named in `full_refresh_models`, macros/night_values.sql). -#}
{% macro snapshot_rebuild_from() -%}
    {%- if not execute or not is_incremental() -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set latest = run_query('select max(as_of_date) from ' ~ this).columns[0].values()[0] -%}
    {%- if latest is none -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set as_of = night_value('as_of') -%}
    {%- if as_of and as_of | string < latest | string -%}
        {{ exceptions.raise_compiler_error(
            this.identifier ~ ' holds snapshots up to ' ~ latest ~ ', later than as_of ' ~ as_of
            ~ ': an incremental run would mix two timelines; build with --full-refresh') }}
    {%- endif -%}
    {{ return("cast('" ~ latest ~ "' as date)") }}
{%- endmacro %}

{#- Pre-hook: drop the snapshots this run rebuilds (nothing on a full build). -#}
{% macro delete_rebuilt_snapshots() -%}
    {%- set rebuild_from = snapshot_rebuild_from() -%}
    {%- if rebuild_from is not none -%}
        delete from {{ this }} where as_of_date >= {{ rebuild_from }}
    {%- endif -%}
{%- endmacro %}

{#- The shared config of the snapshot models: keyed by (customer_id, as_of_date); row-wise
    tests read tonight's snapshots by as_of_date (macros/tonight_tests.sql). -#}
{% macro snapshot_model_config() -%}
    {{ return(adapter.dispatch('snapshot_model_config')()) }}
{%- endmacro %}

{#- Spark without Delta has neither DELETE nor UPDATE on a table, which
    delete+insert and the label fill need, so there the snapshot models are
    rebuilt in full each run (same rows; the incremental path is DuckDB's). -#}
{% macro default__snapshot_model_config() -%}
    {{ config(materialized='table') }}
{%- endmacro %}

{% macro duckdb__snapshot_model_config() -%}
    {{ config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=['customer_id', 'as_of_date'],
        on_schema_change='fail',
        pre_hook="{{ delete_rebuilt_snapshots() }}",
        meta={'tonight_column': 'as_of_date'}
    ) }}
{%- endmacro %}

{#- Post-hook of a mart: the label of every stored snapshot still null whose
    horizon is observed tonight, from the cancellations known tonight (any
    cancellation in (as_of_date, as_of_date + horizon]). Features stay as
    stored; on a full build there is nothing left to fill. -#}
{% macro fill_matured_labels(label, cancellations, snapshot_dates) -%}
    {%- if is_incremental() %}
    update {{ this }} as mart
    set {{ label }} = case
        when exists (
            select 1
            from {{ cancellations }} as cancellations
            where cancellations.customer_id = mart.customer_id
                and cancellations.cancellation_date > mart.as_of_date
                and cancellations.cancellation_date <= mart.as_of_date + {{ var('horizon_days') }}
        ) then 1
        else 0
    end
    where {{ label }} is null
        and as_of_date in (select as_of_date from {{ snapshot_dates }} where is_horizon_observed)
    {%- endif %}
{%- endmacro %}

{#- Overrides dbt's own: a model named in `full_refresh_models` (its
    definition changed since the last build, see ml/features/incremental.py)
    is rebuilt from scratch even when the run as a whole is incremental. -#}
{% macro should_full_refresh() -%}
    {%- if model is defined and model.name in night_value('full_refresh_models', []) -%}
        {{ return(true) }}
    {%- endif -%}
    {%- set config_full_refresh = config.get('full_refresh') -%}
    {%- if config_full_refresh is none -%}
        {%- set config_full_refresh = flags.FULL_REFRESH -%}
    {%- endif -%}
    {{ return(config_full_refresh) }}
{%- endmacro %}

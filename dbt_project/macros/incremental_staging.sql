{#- Incremental staging of the high-volume event tables (usage, payments, support tickets).

    A run cleans and deduplicates only the landing rows dated from the
    watermark on: the latest date staged so far minus the table's late-arrival
    lag (var `event_lag_days`, churn.yml's event_tables max_lag_days), so a row
    that lands up to that many days late is still picked up. Those rows
    replace the stored rows with the same unique key (delete+insert), so a
    re-landed row is never staged twice. A table without a configured lag is
    re-read whole; landing history that was rewritten or removed needs
    `churn build --full-refresh` (the pipeline passes it when it detects one).
    The watermark is a date literal, so engines can skip older row groups. -#}
{% macro staged_since(date_column, table) -%}
    {%- set lags = var('event_lag_days', {}) -%}
    {%- if not execute or not is_incremental() or table not in lags -%}
        {{ return(none) }}
    {%- endif -%}
    {%- set latest = run_query('select max(' ~ date_column ~ ') from ' ~ this).columns[0].values()[0] -%}
    {%- if latest is none -%}
        {{ return(none) }}
    {%- endif -%}
    {{ return("cast('" ~ latest ~ "' as date) - " ~ (lags[table] | int)) }}
{%- endmacro %}

{#- The config of an incrementally staged event table. Spark without Delta
    cannot delete by key, so there the table is restaged in full each run. -#}
{% macro event_staging_config(unique_key, tonight_column) -%}
    {{ return(adapter.dispatch('event_staging_config')(unique_key, tonight_column)) }}
{%- endmacro %}

{% macro default__event_staging_config(unique_key, tonight_column) -%}
    {{ config(materialized='table') }}
{%- endmacro %}

{% macro duckdb__event_staging_config(unique_key, tonight_column) -%}
    {#- tonight_column: the date row-wise dbt tests filter on (macros/tonight_tests.sql) -#}
    {{ config(
        materialized='incremental',
        incremental_strategy='delete+insert',
        unique_key=unique_key,
        on_schema_change='fail',
        meta={'tonight_column': tonight_column}
    ) }}
{%- endmacro %}

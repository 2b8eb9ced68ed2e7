{#- The few spellings DuckDB and Spark do not share, behind adapter.dispatch.
    Everything else in the project is written once in the SQL both engines
    read (ml/features/dialect_lint.py refuses DuckDB-only syntax outside the
    duckdb__ macros here). default__ is the Spark spelling: Databricks and
    other Spark-SQL engines inherit it. -#}

{#- Whole days from `start` to `end` (dates), an integer: DuckDB's date - date
    is a day count, Spark's an INTERVAL. -#}
{% macro day_diff(start, end) -%}
    {{ return(adapter.dispatch('day_diff')(start, end)) }}
{%- endmacro %}

{% macro default__day_diff(start, end) -%}
    datediff({{ end }}, {{ start }})
{%- endmacro %}

{% macro duckdb__day_diff(start, end) -%}
    ({{ end }} - {{ start }})
{%- endmacro %}

{#- One row per date from `start` to `stop` (both included) in steps of one
    `unit` (day or month): a select-list expression that multiplies the row. -#}
{% macro date_series(start, stop, unit) -%}
    {{ return(adapter.dispatch('date_series')(start, stop, unit)) }}
{%- endmacro %}

{% macro default__date_series(start, stop, unit) -%}
    explode(sequence(cast({{ start }} as date), cast({{ stop }} as date), interval 1 {{ unit }}))
{%- endmacro %}

{% macro duckdb__date_series(start, stop, unit) -%}
    cast(unnest(generate_series(
        cast({{ start }} as timestamp), cast({{ stop }} as timestamp), interval 1 {{ unit }}
    )) as date)
{%- endmacro %}

{#- For each (customer_id, as_of_date) row of `spine`, the `columns` of the
    latest `lookups` row of the same customer dated (`date_column`) before
    as_of_date - offset_days (or on it, when `inclusive`); nulls when there is
    none. A point-in-time lookup that stays linear in rows per customer:
    DuckDB's ASOF join, elsewhere one ordered pass over both sets. -#}
{% macro latest_before(spine, lookups, date_column, columns, inclusive=false, offset_days=0) -%}
    {{ return(adapter.dispatch('latest_before')(spine, lookups, date_column, columns, inclusive, offset_days)) }}
{%- endmacro %}

{#- Spine and lookup rows in one timeline per customer; a lookup row carries its
    rank by date, so the running max of that rank at a spine row is the latest
    lookup at or before it (ties: lookups first when inclusive, else last),
    fetched back by an equi-join. Nulls in the lookup's columns stay nulls. -#}
{% macro default__latest_before(spine, lookups, date_column, columns, inclusive, offset_days) -%}
    with lookup_rows as (
        select
            lookups.*,
            row_number() over (partition by customer_id order by {{ date_column }}) as lookup_rank
        from {{ lookups }} as lookups
    ),

    timeline as (
        select
            customer_id,
            as_of_date,
            as_of_date{% if offset_days %} - {{ offset_days }}{% endif %} as timeline_date,
            {{ 1 if inclusive else 0 }} as tie_order,
            cast(null as bigint) as lookup_rank
        from {{ spine }}
        union all
        select
            customer_id,
            cast(null as date) as as_of_date,
            {{ date_column }} as timeline_date,
            {{ 0 if inclusive else 1 }} as tie_order,
            lookup_rank
        from lookup_rows
    ),

    positioned as (
        select
            customer_id,
            as_of_date,
            max(lookup_rank) over (
                partition by customer_id
                order by timeline_date, tie_order
                rows between unbounded preceding and current row
            ) as lookup_rank
        from timeline
    )

    select
        positioned.customer_id,
        positioned.as_of_date
        {%- for column in columns %},
        lookup_rows.{{ column }}
        {%- endfor %}
    from positioned
    left join lookup_rows
        on lookup_rows.customer_id = positioned.customer_id
        and lookup_rows.lookup_rank = positioned.lookup_rank
    where positioned.as_of_date is not null
{%- endmacro %}

{% macro duckdb__latest_before(spine, lookups, date_column, columns, inclusive, offset_days) -%}
    select
        spine.customer_id,
        spine.as_of_date
        {%- for column in columns %},
        lookups.{{ column }}
        {%- endfor %}
    from {{ spine }} as spine
    asof left join {{ lookups }} as lookups
        on lookups.customer_id = spine.customer_id
        and lookups.{{ date_column }} {{ '<=' if inclusive else '<' }} spine.as_of_date{% if offset_days %} - {{ offset_days }}{% endif %}
{%- endmacro %}

{#- on-run-start: the sources of the selected models as tables over the landing
    files. DuckDB reads them through the sources' external_location instead. -#}
{% macro register_landing_sources() -%}
    {{ return(adapter.dispatch('register_landing_sources')()) }}
{%- endmacro %}

{% macro default__register_landing_sources() -%}
{%- endmacro %}

{#- External tables (dropping one keeps its files), recreated every run so a new
    partition or column is seen. A partitioned table reads its folder
    recursively without hive columns, as DuckDB does (hive_partitioning = false). -#}
{% macro spark__register_landing_sources() -%}
    {%- if execute -%}
        {%- set landing_dir = var('landing_dir') -%}
        {%- set folders = var('landing_folders', []) -%}
        {%- set needed = [] -%}
        {%- for node_id in selected_resources -%}
            {%- set node = graph.nodes.get(node_id) -%}
            {%- if node is not none -%}
                {%- for parent in node.depends_on.nodes if parent.startswith('source.') and parent not in needed -%}
                    {%- do needed.append(parent) -%}
                {%- endfor -%}
            {%- endif -%}
        {%- endfor -%}
        {%- for source_id in needed -%}
            {%- set source = graph.sources[source_id] -%}
            {%- if source.source_name == 'telco' -%}
                {%- set reader = "csv options (path '" ~ landing_dir ~ "/" ~ source.name ~ ".csv', header 'true')" -%}
            {%- elif source.name in folders -%}
                {%- set reader = "parquet options (path '" ~ landing_dir ~ "/" ~ source.name ~ "', recursiveFileLookup 'true')" -%}
            {%- else -%}
                {%- set reader = "parquet options (path '" ~ landing_dir ~ "/" ~ source.name ~ ".parquet')" -%}
            {%- endif -%}
            {%- do run_query('create schema if not exists ' ~ source.schema) -%}
            {%- do run_query('drop table if exists ' ~ source.schema ~ '.' ~ source.identifier) -%}
            {%- do run_query('create table ' ~ source.schema ~ '.' ~ source.identifier ~ ' using ' ~ reader) -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro %}

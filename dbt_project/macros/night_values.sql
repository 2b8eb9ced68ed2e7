{#- The values that change every night: `as_of`, `full_refresh_models` and
    `tests_since`. The pipeline passes them in the environment variable
    CHURN_DBT_NIGHT (JSON, ml/features/dbt.py), not as --vars: any change of
    --vars makes dbt parse the whole project again (6-10 s, twice a night),
    while an env var read only while executing is invisible to partial
    parsing. So it is read only when `execute` is true: at parse time (where
    dbt would record it and re-parse every model using it when it changes)
    the default stands, and no config may depend on these values. A --vars
    value given by hand (`dbt build --vars '{as_of: 2025-10-01}'`) still wins. -#}
{% macro night_value(name, default=none) -%}
    {%- set given = var(name, none) -%}
    {%- if given is not none -%}
        {{ return(given) }}
    {%- endif -%}
    {%- if not execute -%}
        {{ return(default) }}
    {%- endif -%}
    {%- set value = fromjson(env_var('CHURN_DBT_NIGHT', '{}')).get(name) -%}
    {{ return(default if value is none else value) }}
{%- endmacro %}

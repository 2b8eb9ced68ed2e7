{#- Raw category values arrive in mixed case with stray spaces; staging
    compares and groups on the trimmed lower-case form (empty text = missing). -#}
{% macro clean_category(column) -%}
    nullif(lower(trim(cast({{ column }} as {{ dbt.type_string() }}))), '')
{%- endmacro %}

{#- Row-wise tests on tonight's rows only; table-level tests on the whole.

    An incremental night adds a few rows to large tables. A row-wise test
    (one verdict per row) needs to read only the rows this night wrote:
    the stored ones passed when they were written. So for the models in
    `tests_since` ({model: {column, since}}; the pipeline passes it on
    incremental nights, ml/features/incremental.py `tests_since`, through
    macros/night_values.sql) these tests
    read the rows whose `column` is on or after `since`. Table-level tests
    (unique, unique_combination_of_columns, row counts, label share) and the
    singular leakage test are not in the list, so they keep reading the whole
    table; a full refresh passes none, so everything is tested. A `where`
    configured on a test is kept and combined with tonight's filter.

    One table-level test is narrowed too: a unique combination of columns
    that includes the night's column. Two rows sharing such a key share its
    date; a night writes only rows dated from `since` on, and the rows before
    it were unique when written and are never rewritten, so a duplicate can
    only be among tonight's rows (the usage key test read 38M rows a night at
    200,000 customers x 24 months). A key without the date (payment_id) is
    still tested on the whole table. -#}
{% macro get_where_subquery(relation) -%}
    {%- set where = config.get('where', '') -%}
    {%- set night = tonight_condition(relation) -%}
    {%- set conditions = [where, night] | select | list -%}
    {%- if conditions -%}
        {%- set filtered -%}
            (select * from {{ relation }} where {{ '(' ~ (conditions | join(') and (')) ~ ')' }}) dbt_subquery
        {%- endset -%}
        {{ return(filtered) }}
    {%- endif -%}
    {{ return(relation) }}
{%- endmacro %}

{#- Generic tests whose verdict is per row: safe to narrow to tonight's rows. -#}
{% macro row_wise_tests() -%}
    {{ return(['not_null', 'accepted_values', 'accepted_range', 'expression_is_true', 'relationships']) }}
{%- endmacro %}

{#- The condition selecting tonight's rows of `relation` for this test, or '' to test every row. -#}
{% macro tonight_condition(relation) -%}
    {%- set entry = night_value('tests_since', {}).get(relation.identifier) if relation.identifier is defined else none -%}
    {%- set test = model.get('test_metadata') if model is mapping else none -%}
    {%- if entry is none or test is none -%}
        {{ return('') }}
    {%- endif -%}
    {%- set key = test.get('kwargs', {}).get('combination_of_columns') or [] -%}
    {%- set dated_key = test.get('name') == 'unique_combination_of_columns' and entry['column'] in key -%}
    {%- if test.get('name') not in row_wise_tests() and not dated_key -%}
        {{ return('') }}
    {%- endif -%}
    {{ return(entry['column'] ~ " >= cast('" ~ entry['since'] ~ "' as date)") }}
{%- endmacro %}

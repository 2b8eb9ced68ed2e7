{#- Overrides dbt's built-in accepted_values so a failure counts ROWS, not
    distinct values: three rows of an unknown contract type report
    "failures: 3", the size of the problem an operator has to fix (the
    built-in reports 1). Nulls pass: not_null is its own test. -#}
{% test accepted_values(model, column_name, values, quote=True) %}

with all_values as (
    select {{ column_name }} as value_field
    from {{ model }}
    where {{ column_name }} is not null
),

unexpected as (
    select value_field
    from all_values
    where value_field not in (
        {% for value in values -%}
            {%- if not loop.first %}, {% endif -%}
            {% if quote -%}'{{ value }}'{%- else -%}{{ value }}{%- endif -%}
        {%- endfor %}
    )
),

final as (
    select * from unexpected
)

select * from final

{% endtest %}

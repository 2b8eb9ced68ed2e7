{#- Groups of the given columns that occur more than once: a composite key check
    (dbt_utils has one, but the warehouse builds without hub packages). -#}
{% test unique_combination_of_columns(model, combination_of_columns) %}

select
    {{ combination_of_columns | join(', ') }},
    count(*) as occurrences
from {{ model }}
group by {{ combination_of_columns | join(', ') }}
having count(*) > 1

{% endtest %}

{#- Time travel (`as_of`, see night_values.sql): a build "as if run on that date". Anything dated
    on or after it has not happened yet, so it must be invisible downstream. -#}

{% macro as_of_cutoff() -%}
    {%- set as_of = night_value('as_of') -%}
    {%- if as_of is none or as_of == '' -%}
        null::date
    {%- else -%}
        '{{ as_of }}'::date
    {%- endif -%}
{%- endmacro %}

{#- True when the event dated `column` is visible at the build's as_of. -#}
{% macro visible_before_cutoff(column) -%}
    {%- set as_of = night_value('as_of') -%}
    {%- if as_of is none or as_of == '' -%}
        true
    {%- else -%}
        {{ column }} < {{ as_of_cutoff() }}
    {%- endif -%}
{%- endmacro %}

{#- The value of a date/timestamp column if it is already known at the build's
    as_of, else null (e.g. a cancellation that has not happened yet). -#}
{% macro known_at_cutoff(column) -%}
    case when {{ visible_before_cutoff(column) }} then {{ column }} end
{%- endmacro %}

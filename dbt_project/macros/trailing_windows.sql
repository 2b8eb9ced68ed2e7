{#- Point-in-time window sums without joining every snapshot to every event.

    `daily_running_totals` collapses events to one row per customer and day and
    carries running totals; `trailing_window_totals` then looks up, with ASOF
    joins, the running total on the last event day strictly before as_of_date
    and strictly before as_of_date - w. Their difference is the sum over the
    w days [as_of_date - w, as_of_date). Cost: one sort of the events plus one
    merge per window, instead of snapshots x events pairs. -#}

{#- measures: {name: [aggregate over one customer's rows of one day, SQL type
    of the running total]}, e.g. {'active_days': ['1', 'integer']}. -#}
{% macro daily_running_totals(relation, date_column, measures) %}
    select
        customer_id,
        {{ date_column }} as event_date,
        {%- for name, (expression, type) in measures.items() %}
        (sum({{ expression }}) over customer_days)::{{ type }} as running_{{ name }},
        {%- endfor %}
    from {{ relation }}
    group by customer_id, {{ date_column }}
    window customer_days as (
        partition by customer_id
        order by {{ date_column }}
        rows between unbounded preceding and current row
    )
{% endmacro %}

{#- Per (customer_id, as_of_date) of `spine`: <measure>_total (all history before
    as_of_date), <measure>_<w>d for each window w in days, and the audit column
    last_event_date_used (latest event day read; must be < as_of_date). -#}
{% macro trailing_window_totals(spine, running, measures, windows) %}
    select
        snapshot.customer_id,
        snapshot.as_of_date,
        history.event_date as last_event_date_used,
        {%- for name in measures %}
        coalesce(history.running_{{ name }}, 0) as {{ name }}_total,
        {%- for days in windows %}
        coalesce(history.running_{{ name }}, 0)
            - coalesce(before_{{ days }}d.running_{{ name }}, 0) as {{ name }}_{{ days }}d,
        {%- endfor %}
        {%- endfor %}
    from {{ spine }} as snapshot
    asof left join {{ running }} as history
        on history.customer_id = snapshot.customer_id
        and history.event_date < snapshot.as_of_date
    {%- for days in windows %}
    asof left join {{ running }} as before_{{ days }}d
        on before_{{ days }}d.customer_id = snapshot.customer_id
        and before_{{ days }}d.event_date < snapshot.as_of_date - {{ days }}
    {%- endfor %}
{% endmacro %}

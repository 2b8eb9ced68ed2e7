{#- Point-in-time window sums without joining every snapshot to every event.

    `events` has customer_id, event_date and the measure columns; `spine` has
    (customer_id, as_of_date); `snapshot_dates` is the small as_of grid.
    measures: {name: [per-event expression to sum, SQL type of the sum]}.

    Two cheap passes instead of snapshots x events pairs:
    - trailing windows: each event is paired with the (few) grid dates whose
      longest window [as_of_date - w, as_of_date) holds it, a join against the
      ~20-row grid; sums per (customer, as_of_date) for each window;
    - all history: each event is put in the bucket of the first grid date after
      it, buckets are summed per customer, running totals over the buckets are
      looked up for each snapshot with an ASOF join (bucket date <= as_of_date).

    Output per spine row: <name>_<w>d for each window, <name>_total, and the
    audit column last_event_date_used (latest event day read; must be before
    as_of_date). -#}
{% macro trailing_window_totals(events, spine, snapshot_dates, measures, windows) %}
    {%- set longest = windows | max %}
    with grid as (
        select as_of_date from {{ snapshot_dates }}
    ),

    events_in_windows as (
        select
            events.*,
            grid.as_of_date,
        from {{ events }} as events
        inner join grid
            on events.event_date >= grid.as_of_date - {{ longest }}
            and events.event_date < grid.as_of_date
    ),

    window_totals as (
        select
            customer_id,
            as_of_date,
            max(event_date) as last_window_event_date,
            {%- for name, (expression, type) in measures.items() %}
            {%- for days in windows %}
            coalesce(sum({{ expression }}) filter (where event_date >= as_of_date - {{ days }}), 0)::{{ type }}
                as {{ name }}_{{ days }}d,
            {%- endfor %}
            {%- endfor %}
        from events_in_windows
        group by customer_id, as_of_date
    ),

    -- every day from the first event to the last grid date, with the first grid date after it
    day_buckets as (
        select
            days.day::date as event_date,
            min(grid.as_of_date) as bucket_date,
        from range(
            (select min(event_date) from {{ events }})::timestamp,
            (select max(as_of_date) from grid)::timestamp,
            interval 1 day
        ) as days(day)
        inner join grid
            on grid.as_of_date > days.day::date
        group by days.day
    ),

    bucket_totals as (
        select
            events.customer_id,
            day_buckets.bucket_date,
            max(events.event_date) as last_event_date,
            {%- for name, (expression, type) in measures.items() %}
            sum({{ expression }}) as {{ name }},
            {%- endfor %}
        from {{ events }} as events
        inner join day_buckets using (event_date)
        group by events.customer_id, day_buckets.bucket_date
    ),

    running_buckets as (
        select
            customer_id,
            bucket_date,
            max(last_event_date) over customer_buckets as last_event_date,
            {%- for name in measures %}
            (sum({{ name }}) over customer_buckets)::{{ measures[name][1] }} as running_{{ name }},
            {%- endfor %}
        from bucket_totals
        window customer_buckets as (
            partition by customer_id
            order by bucket_date
            rows between unbounded preceding and current row
        )
    ),

    history as (
        select
            snapshot.customer_id,
            snapshot.as_of_date,
            running_buckets.last_event_date,
            {%- for name in measures %}
            coalesce(running_buckets.running_{{ name }}, 0) as {{ name }}_total,
            {%- endfor %}
        from {{ spine }} as snapshot
        asof left join running_buckets
            on running_buckets.customer_id = snapshot.customer_id
            and running_buckets.bucket_date <= snapshot.as_of_date
    )

    select
        history.customer_id,
        history.as_of_date,
        greatest(history.last_event_date, window_totals.last_window_event_date) as last_event_date_used,
        {%- for name, (expression, type) in measures.items() %}
        history.{{ name }}_total,
        {%- for days in windows %}
        coalesce(window_totals.{{ name }}_{{ days }}d, 0)::{{ type }} as {{ name }}_{{ days }}d,
        {%- endfor %}
        {%- endfor %}
    from history
    left join window_totals using (customer_id, as_of_date)
{% endmacro %}

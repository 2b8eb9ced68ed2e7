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
      looked up for each snapshot (bucket date <= as_of_date; latest_before in
      macros/cross_engine.sql, an ASOF join on DuckDB).

    Output per spine row: <name>_<w>d for each window, <name>_total, and the
    audit column last_event_date_used (latest event day read; must be before
    as_of_date).

    Incremental runs (`rebuild_from`, a date literal from
    snapshot_rebuild_from()) carry the all-history totals forward instead: a
    snapshot's <name>_total is its customer's latest stored snapshot's total
    (in {{ this }}, before rebuild_from) plus the events since that snapshot;
    a customer with no stored snapshot sums all their events. Only the
    snapshots from rebuild_from on are computed, and the windows read only the
    `longest` days before them. Both branches are written in the SQL DuckDB
    and Spark share (ml/features/dialect_lint.py checks). -#}
{% macro trailing_window_totals(events, spine, snapshot_dates, measures, windows, rebuild_from=none) %}
    {%- set longest = windows | max %}
    {%- if rebuild_from is not none %}
    {{ carried_window_totals(events, spine, measures, windows, rebuild_from) }}
    {%- else %}
    {%- set bucket_columns = ['last_event_date'] %}
    {%- for name in measures %}
    {%- do bucket_columns.append('running_' ~ name) %}
    {%- endfor %}
    with grid as (
        select as_of_date from {{ snapshot_dates }}
    ),

    events_in_windows as (
        select
            events.*,
            grid.as_of_date
        from {{ events }} as events
        inner join grid
            on events.event_date >= grid.as_of_date - {{ longest }}
            and events.event_date < grid.as_of_date
    ),

    window_totals as (
        select
            customer_id,
            as_of_date,
            max(event_date) as last_window_event_date
            {%- for name, (expression, type) in measures.items() %}
            {%- for days in windows %},
            cast(coalesce(sum({{ expression }}) filter (where event_date >= as_of_date - {{ days }}), 0) as {{ type }})
                as {{ name }}_{{ days }}d
            {%- endfor %}
            {%- endfor %}
        from events_in_windows
        group by customer_id, as_of_date
    ),

    day_range as (
        select
            (select min(event_date) from {{ events }}) as first_day,
            (select max(as_of_date) from grid) as last_day
    ),

    days as (
        select {{ date_series('first_day', 'last_day', 'day') }} as event_date
        from day_range
    ),

    -- every day from the first event to the last grid date, with the first grid date after it
    day_buckets as (
        select
            days.event_date,
            min(grid.as_of_date) as bucket_date
        from days
        inner join grid
            on grid.as_of_date > days.event_date
        group by days.event_date
    ),

    bucket_totals as (
        select
            events.customer_id,
            day_buckets.bucket_date,
            max(events.event_date) as last_event_date
            {%- for name, (expression, type) in measures.items() %},
            sum({{ expression }}) as {{ name }}
            {%- endfor %}
        from {{ events }} as events
        inner join day_buckets using (event_date)
        group by events.customer_id, day_buckets.bucket_date
    ),

    running_buckets as (
        select
            customer_id,
            bucket_date,
            max(last_event_date) over customer_buckets as last_event_date
            {%- for name in measures %},
            cast(sum({{ name }}) over customer_buckets as {{ measures[name][1] }}) as running_{{ name }}
            {%- endfor %}
        from bucket_totals
        window customer_buckets as (
            partition by customer_id
            order by bucket_date
            rows between unbounded preceding and current row
        )
    ),

    -- the running totals of each snapshot's latest bucket dated on or before it
    snapshot_buckets as (
        {{ latest_before(spine, 'running_buckets', 'bucket_date', bucket_columns, inclusive=true) }}
    ),

    history as (
        select
            customer_id,
            as_of_date,
            last_event_date
            {%- for name in measures %},
            coalesce(running_{{ name }}, 0) as {{ name }}_total
            {%- endfor %}
        from snapshot_buckets
    )

    select
        history.customer_id,
        history.as_of_date,
        greatest(history.last_event_date, window_totals.last_window_event_date) as last_event_date_used
        {%- for name, (expression, type) in measures.items() %},
        history.{{ name }}_total
        {%- for days in windows %},
        cast(coalesce(window_totals.{{ name }}_{{ days }}d, 0) as {{ type }}) as {{ name }}_{{ days }}d
        {%- endfor %}
        {%- endfor %}
    from history
    left join window_totals using (customer_id, as_of_date)
    {%- endif %}
{% endmacro %}

{#- The incremental branch of trailing_window_totals (see its notes). -#}
{% macro carried_window_totals(events, spine, measures, windows, rebuild_from) %}
    {%- set longest = windows | max %}
    {%- set since_carried = 'carried_from is null or event_date >= carried_from' %}
    with rebuilt_snapshots as (
        select customer_id, as_of_date from {{ spine }}
        where as_of_date >= {{ rebuild_from }}
    ),

    stored_snapshots as (
        select
            customer_id,
            as_of_date,
            last_event_date_used,
            {%- for name in measures %}
            {{ name }}_total,
            {%- endfor %}
            row_number() over (partition by customer_id order by as_of_date desc) as recency
        from {{ this }}
        where as_of_date < {{ rebuild_from }}
    ),

    -- each customer's latest stored snapshot: the totals carried forward
    carried as (
        select * from stored_snapshots where recency = 1
    ),

    bases as (
        select
            rebuilt_snapshots.customer_id,
            rebuilt_snapshots.as_of_date,
            carried.as_of_date as carried_from,
            carried.last_event_date_used as carried_last_event_date
            {%- for name in measures %},
            coalesce(carried.{{ name }}_total, 0) as carried_{{ name }}
            {%- endfor %}
        from rebuilt_snapshots
        left join carried
            on carried.customer_id = rebuilt_snapshots.customer_id
    ),

    -- events since the carried snapshot, and those in the longest window
    recent_events as (
        select
            events.*,
            bases.as_of_date,
            bases.carried_from
        from {{ events }} as events
        inner join bases
            on events.customer_id = bases.customer_id
            and events.event_date < bases.as_of_date
            and (
                bases.carried_from is null
                or events.event_date >= bases.carried_from
                or events.event_date >= bases.as_of_date - {{ longest }}
            )
    ),

    recent_totals as (
        select
            customer_id,
            as_of_date,
            max(case when {{ since_carried }} then event_date end) as last_new_event_date
            {%- for name, (expression, type) in measures.items() %},
            coalesce(sum(case when {{ since_carried }} then {{ expression }} end), 0) as new_{{ name }}
            {%- for days in windows %},
            coalesce(sum(case when event_date >= as_of_date - {{ days }} then {{ expression }} end), 0)
                as {{ name }}_{{ days }}d
            {%- endfor %}
            {%- endfor %}
        from recent_events
        group by customer_id, as_of_date
    )

    select
        bases.customer_id,
        bases.as_of_date,
        greatest(bases.carried_last_event_date, recent_totals.last_new_event_date) as last_event_date_used
        {%- for name, (expression, type) in measures.items() %},
        cast(bases.carried_{{ name }} + coalesce(recent_totals.new_{{ name }}, 0) as {{ type }}) as {{ name }}_total
        {%- for days in windows %},
        cast(coalesce(recent_totals.{{ name }}_{{ days }}d, 0) as {{ type }}) as {{ name }}_{{ days }}d
        {%- endfor %}
        {%- endfor %}
    from bases
    left join recent_totals
        on recent_totals.customer_id = bases.customer_id
        and recent_totals.as_of_date = bases.as_of_date
{% endmacro %}

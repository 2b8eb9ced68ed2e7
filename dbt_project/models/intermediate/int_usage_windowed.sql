{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}

with usage_events as (
    select
        customer_id,
        usage_date as event_date,
        sessions,
        minutes_used
    from {{ ref('stg_saas__usage_events') }}
    where {{ visible_before_cutoff('usage_date') }}
),

snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
    {%- if rebuild_from is not none %}
    where as_of_date >= {{ rebuild_from }}
    {%- endif %}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
),

-- one usage row per customer and active day, so each row is one active day
windowed as (
    {{ trailing_window_totals('usage_events', 'snapshots', 'snapshot_dates', {
        'sessions': ['sessions', 'integer'],
        'minutes': ['minutes_used', 'double'],
        'active_days': ['1', 'integer'],
    }, [30, 90], rebuild_from) }}
),

final as (
    select
        *,
        last_event_date_used as last_usage_date
    from windowed
)

select * from final

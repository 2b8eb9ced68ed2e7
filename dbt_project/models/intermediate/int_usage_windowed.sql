with snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
),

usage_days as (
    select * from {{ ref('int_usage_accumulated') }}
),

windowed as (
    {{ trailing_window_totals('snapshots', 'usage_days', ['sessions', 'minutes', 'active_days'], [30, 90]) }}
),

final as (
    select
        *,
        last_event_date_used as last_usage_date,
    from windowed
)

select * from final

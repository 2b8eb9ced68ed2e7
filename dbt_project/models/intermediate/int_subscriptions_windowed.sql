{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}

with snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
    {%- if rebuild_from is not none %}
    where as_of_date >= {{ rebuild_from }}
    {%- endif %}
),

periods as (
    select * from {{ ref('int_subscriptions_censored') }}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
),

first_periods as (
    select customer_id, monthly_price as first_monthly_price
    from periods
    where period_number = 1
),

-- the period in force on the day before as_of_date: the latest one started before it
current_periods as (
    {{ latest_before('snapshots', 'periods', 'start_date', ['plan', 'contract_type', 'monthly_price']) }}
),

-- the period in force 90 days before as_of_date
periods_in_force_90d_ago as (
    {{ latest_before('snapshots', 'periods', 'start_date', ['monthly_price'], inclusive=true, offset_days=90) }}
),

periods_90d_ago as (
    select
        customer_id,
        as_of_date,
        monthly_price as monthly_price_90d_ago
    from periods_in_force_90d_ago
),

period_starts as (
    select
        customer_id,
        start_date as event_date,
        is_plan_change,
        is_price_change
    from periods
),

changes as (
    {{ trailing_window_totals('period_starts', 'snapshots', 'snapshot_dates', {
        'plan_changes': ['is_plan_change::integer', 'integer'],
        'price_changes': ['is_price_change::integer', 'integer'],
    }, [90], rebuild_from) }}
),

final as (
    select
        current_periods.customer_id,
        current_periods.as_of_date,
        current_periods.plan,
        current_periods.contract_type,
        current_periods.monthly_price,
        -- subscribed less than 90 days ago: the price they started on
        coalesce(periods_90d_ago.monthly_price_90d_ago, first_periods.first_monthly_price)
            as monthly_price_90d_ago,
        changes.plan_changes_90d,
        changes.plan_changes_total,
        changes.price_changes_90d,
        -- stored so an incremental run can carry it forward
        changes.price_changes_total,
        changes.last_event_date_used
    from current_periods
    inner join periods_90d_ago using (customer_id, as_of_date)
    inner join changes using (customer_id, as_of_date)
    left join first_periods using (customer_id)
)

select * from final

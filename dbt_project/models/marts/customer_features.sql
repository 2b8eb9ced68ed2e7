{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}
{#- Incremental runs build the snapshots from rebuild_from on (see
    macros/incremental_snapshots.sql) and re-label the stored snapshots whose
    label is still null, keeping their features as stored. -#}
{%- set feature_columns = [
    'plan', 'contract_type', 'region', 'acquisition_channel', 'age_band', 'is_month_to_month',
    'monthly_spend', 'price_change_90d', 'plan_changes_90d', 'months_as_customer', 'login_days_30d',
    'usage_sessions_30d', 'usage_sessions_90d', 'usage_minutes_30d', 'usage_minutes_90d',
    'usage_trend_30_vs_prior_60', 'days_since_last_login', 'days_since_last_login_to_tenure_ratio',
    'spend_per_login', 'failed_payments_90d', 'tickets_30d', 'support_tickets_90d', 'tickets_per_month',
    'mean_satisfaction_30d', 'mean_satisfaction_90d'
] %}

with snapshots as (
    select * from {{ ref('int_customer_snapshots_spined') }}
    {%- if rebuild_from is not none %}
    where as_of_date >= {{ rebuild_from }}
    {%- endif %}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
),

cancellations as (
    select customer_id, cancellation_date
    from {{ ref('int_subscriptions_censored') }}
    where cancellation_date is not null
),

customers as (
    select * from {{ ref('stg_saas__customers') }}
),

subscriptions as (
    select * from {{ ref('int_subscriptions_windowed') }}
),

usage as (
    select * from {{ ref('int_usage_windowed') }}
),

payments as (
    select * from {{ ref('int_payments_windowed') }}
),

tickets as (
    select * from {{ ref('int_tickets_windowed') }}
),

-- features read straight from the windowed intermediate models
base_features as (
    select
        snapshots.customer_id,
        snapshots.as_of_date,
        -- days since signup, >= 1 for an active customer
        snapshots.as_of_date - customers.signup_date as tenure_days,
        subscriptions.plan,
        subscriptions.contract_type,
        customers.region,
        customers.acquisition_channel,
        coalesce(customers.age_band, 'unknown') as age_band,
        subscriptions.monthly_price as monthly_spend,
        subscriptions.monthly_price - subscriptions.monthly_price_90d_ago as price_change_90d,
        subscriptions.plan_changes_90d,
        usage.active_days_30d as login_days_30d,
        usage.sessions_30d as usage_sessions_30d,
        usage.sessions_90d as usage_sessions_90d,
        usage.minutes_30d as usage_minutes_30d,
        usage.minutes_90d as usage_minutes_90d,
        -- never logged in: counted from signup
        snapshots.as_of_date - coalesce(usage.last_usage_date, customers.signup_date)
            as days_since_last_login,
        payments.failed_payments_90d,
        tickets.tickets_30d,
        tickets.tickets_90d as support_tickets_90d,
        tickets.tickets_total,
        -- null when no rated ticket closed in the window
        tickets.satisfaction_points_30d / nullif(tickets.rated_tickets_30d, 0) as mean_satisfaction_30d,
        tickets.satisfaction_points_90d / nullif(tickets.rated_tickets_90d, 0) as mean_satisfaction_90d,
    from snapshots
    inner join customers using (customer_id)
    inner join subscriptions using (customer_id, as_of_date)
    inner join usage using (customer_id, as_of_date)
    inner join payments using (customer_id, as_of_date)
    inner join tickets using (customer_id, as_of_date)
),

-- features combining base features; denominators floored explicitly
derived_features as (
    select
        *,
        -- average month length in days
        tenure_days / 30.4375 as months_as_customer,
        (contract_type = 'month-to-month')::integer as is_month_to_month,
        -- USD per active day; no active day counts as one
        monthly_spend / greatest(login_days_30d, 1) as spend_per_login,
        -- lifetime tickets per month of tenure; tenure under a month counts as one
        tickets_total / greatest(tenure_days / 30.4375, 1) as tickets_per_month,
        days_since_last_login / greatest(tenure_days, 1) as days_since_last_login_to_tenure_ratio,
        -- minutes per day in the last 30 days minus minutes per day in the 60 days before
        usage_minutes_30d / 30 - (usage_minutes_90d - usage_minutes_30d) / 60
            as usage_trend_30_vs_prior_60,
    from base_features
),

{%- if rebuild_from is not none %}

-- stored snapshots still waiting for their label, features as stored
unlabelled as (
    select
        customer_id,
        as_of_date,
        {{ feature_columns | join(',\n        ') }}
    from {{ this }}
    where churned_within_30d is null
        and as_of_date < {{ rebuild_from }}
),
{%- endif %}

to_label as (
    select
        customer_id,
        as_of_date,
        {{ feature_columns | join(',\n        ') }}
    from derived_features
    {%- if rebuild_from is not none %}
    union all
    select * from unlabelled
    {%- endif %}
),

-- any cancellation in (as_of_date, as_of_date + horizon]: a customer who
-- cancels and returns within the horizon still churned
labels as (
    select
        to_label.customer_id,
        to_label.as_of_date,
        case
            when not snapshot_dates.is_horizon_observed then null
            when count(cancellations.cancellation_date) > 0 then 1
            else 0
        end as churned_within_30d
    from to_label
    inner join snapshot_dates
        on snapshot_dates.as_of_date = to_label.as_of_date
    left join cancellations
        on cancellations.customer_id = to_label.customer_id
        and cancellations.cancellation_date > to_label.as_of_date
        and cancellations.cancellation_date <= to_label.as_of_date + {{ var('horizon_days') }}
    group by to_label.customer_id, to_label.as_of_date, snapshot_dates.is_horizon_observed
),

final as (
    select
        to_label.customer_id,
        to_label.as_of_date,
        labels.churned_within_30d,
        {{ feature_columns | join(',\n        ') }}
    from to_label
    inner join labels
        on labels.customer_id = to_label.customer_id
        and labels.as_of_date = to_label.as_of_date
)

select * from final

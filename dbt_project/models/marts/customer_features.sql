{{ snapshot_model_config() }}
{#- Incremental runs build the snapshots from rebuild_from on (see
    macros/incremental_snapshots.sql); the post-hook fills in the labels of
    stored snapshots whose horizon has been observed since, in the same
    transaction, leaving their features as stored. -#}
{{ config(post_hook="{{ fill_matured_labels('churned_within_30d', ref('int_subscriptions_censored'), ref('int_snapshot_dates')) }}") }}
{%- set rebuild_from = snapshot_rebuild_from() %}

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
        {{ day_diff('customers.signup_date', 'snapshots.as_of_date') }} as tenure_days,
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
        {{ day_diff('coalesce(usage.last_usage_date, customers.signup_date)', 'snapshots.as_of_date') }}
            as days_since_last_login,
        payments.failed_payments_90d,
        tickets.tickets_30d,
        tickets.tickets_90d as support_tickets_90d,
        tickets.tickets_total,
        -- null when no rated ticket closed in the window
        tickets.satisfaction_points_30d / nullif(tickets.rated_tickets_30d, 0) as mean_satisfaction_30d,
        tickets.satisfaction_points_90d / nullif(tickets.rated_tickets_90d, 0) as mean_satisfaction_90d
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
        tenure_days / cast(30.4375 as double) as months_as_customer,
        (contract_type = 'month-to-month')::integer as is_month_to_month,
        -- USD per active day; no active day counts as one
        monthly_spend / greatest(login_days_30d, 1) as spend_per_login,
        -- lifetime tickets per month of tenure; tenure under a month counts as one
        tickets_total / greatest(tenure_days / cast(30.4375 as double), 1) as tickets_per_month,
        days_since_last_login / greatest(tenure_days, 1) as days_since_last_login_to_tenure_ratio,
        -- minutes per day in the last 30 days minus minutes per day in the 60 days before
        usage_minutes_30d / 30 - (usage_minutes_90d - usage_minutes_30d) / 60
            as usage_trend_30_vs_prior_60
    from base_features
),

-- cancellations in (as_of_date, as_of_date + horizon]: a customer who
-- cancels and returns within the horizon still churned
horizon_cancellations as (
    select
        derived_features.customer_id,
        derived_features.as_of_date,
        count(cancellations.cancellation_date) as cancellations_in_horizon
    from derived_features
    left join cancellations
        on cancellations.customer_id = derived_features.customer_id
        and cancellations.cancellation_date > derived_features.as_of_date
        and cancellations.cancellation_date <= derived_features.as_of_date + {{ var('horizon_days') }}
    group by derived_features.customer_id, derived_features.as_of_date
),

labelled as (
    select
        derived_features.*,
        -- null while the horizon after as_of_date is not fully observed
        case
            when not snapshot_dates.is_horizon_observed then null
            when horizon_cancellations.cancellations_in_horizon > 0 then 1
            else 0
        end as churned_within_30d
    from derived_features
    inner join horizon_cancellations
        on horizon_cancellations.customer_id = derived_features.customer_id
        and horizon_cancellations.as_of_date = derived_features.as_of_date
    inner join snapshot_dates
        on snapshot_dates.as_of_date = derived_features.as_of_date
),

final as (
    select
        customer_id,
        as_of_date,
        churned_within_30d,
        plan,
        contract_type,
        region,
        acquisition_channel,
        age_band,
        is_month_to_month,
        monthly_spend,
        price_change_90d,
        plan_changes_90d,
        months_as_customer,
        login_days_30d,
        usage_sessions_30d,
        usage_sessions_90d,
        usage_minutes_30d,
        usage_minutes_90d,
        usage_trend_30_vs_prior_60,
        days_since_last_login,
        days_since_last_login_to_tenure_ratio,
        spend_per_login,
        failed_payments_90d,
        tickets_30d,
        support_tickets_90d,
        tickets_per_month,
        mean_satisfaction_30d,
        mean_satisfaction_90d
    from labelled
)

select * from final

with usage_days as (
    select usage_date as event_date from {{ ref('stg_saas__usage_events') }}
    where {{ visible_before_cutoff('usage_date') }}
),

payments as (
    select * from {{ ref('stg_saas__payments') }}
),

tickets as (
    select * from {{ ref('stg_saas__support_tickets') }}
),

subscriptions as (
    select * from {{ ref('int_subscriptions_censored') }}
),

observed_event_dates as (
    select event_date from usage_days
    union all
    select invoice_date from payments where {{ visible_before_cutoff('invoice_date') }}
    union all
    select opened_at::date from tickets where {{ visible_before_cutoff('opened_at') }}
    union all
    select start_date from subscriptions
    union all
    select cancellation_date from subscriptions where cancellation_date is not null
),

observation_window as (
    select
        (select min(event_date) from usage_days) as first_usage_date,
        -- the day before as_of is the last day anyone could have seen. The pipeline
        -- always passes as_of (decided by the run, churn.yml `clock`); the newest
        -- event is only the fallback of a bare `dbt build` run by hand.
        coalesce(
            {{ as_of_cutoff() }} - 1,
            (select max(event_date) from observed_event_dates)
        ) as last_observed_day
),

bounds as (
    select
        last_observed_day,
        last_observed_day + 1 as latest_as_of_date,
        -- first month start at least 90 days after the first usage event, so the
        -- 90-day windows of the first snapshot are fully inside the data
        case
            when day(first_usage_date + 90) = 1 then first_usage_date + 90
            else (date_trunc('month', first_usage_date + 90) + interval 1 month)::date
        end as first_as_of_date
    from observation_window
),

monthly_dates as (
    select
        {{ date_series('first_as_of_date', 'latest_as_of_date', 'month') }} as as_of_date
    from bounds
),

all_dates as (
    select as_of_date from monthly_dates
    union
    select latest_as_of_date from bounds
),

final as (
    select
        all_dates.as_of_date,
        bounds.last_observed_day,
        all_dates.as_of_date = bounds.latest_as_of_date as is_latest,
        all_dates.as_of_date + {{ var('horizon_days') }} <= bounds.last_observed_day
            as is_horizon_observed
    from all_dates
    cross join bounds
)

select * from final

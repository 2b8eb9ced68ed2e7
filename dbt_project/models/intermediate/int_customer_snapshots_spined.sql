with customers as (
    select * from {{ ref('stg_saas__customers') }}
),

subscriptions as (
    select * from {{ ref('int_subscriptions_censored') }}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
),

first_periods as (
    select customer_id, min(start_date) as first_subscribed_on
    from subscriptions
    group by customer_id
),

-- the customer's latest period decides whether the relationship has ended
latest_periods as (
    select customer_id, cancellation_date
    from subscriptions
    qualify row_number() over (partition by customer_id order by start_date desc, subscription_id desc) = 1
),

customer_lifecycles as (
    select
        customers.customer_id,
        customers.signup_date,
        first_periods.first_subscribed_on,
        latest_periods.cancellation_date,
    from customers
    inner join first_periods using (customer_id)
    inner join latest_periods using (customer_id)
),

-- active at as_of: signed up and subscribed before it, not cancelled on or before it
spined as (
    select
        customer_lifecycles.customer_id,
        snapshot_dates.as_of_date,
        customer_lifecycles.signup_date,
        customer_lifecycles.first_subscribed_on,
        customer_lifecycles.cancellation_date,
        snapshot_dates.last_observed_day,
        snapshot_dates.is_latest,
        snapshot_dates.is_horizon_observed,
    from snapshot_dates
    inner join customer_lifecycles
        on customer_lifecycles.signup_date < snapshot_dates.as_of_date
        and customer_lifecycles.first_subscribed_on < snapshot_dates.as_of_date
        and (
            customer_lifecycles.cancellation_date is null
            or customer_lifecycles.cancellation_date > snapshot_dates.as_of_date
        )
),

final as (
    select * from spined
)

select * from final

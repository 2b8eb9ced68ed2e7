{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}

with customers as (
    select * from {{ ref('stg_saas__customers') }}
),

subscriptions as (
    select * from {{ ref('int_subscriptions_censored') }}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
    {%- if rebuild_from is not none %}
    where as_of_date >= {{ rebuild_from }}
    {%- endif %}
),

first_periods as (
    select customer_id, min(start_date) as first_subscribed_on
    from subscriptions
    group by customer_id
),

-- a period runs from its start until the customer's next period starts
periods as (
    select
        customer_id,
        start_date,
        cancellation_date,
        lead(start_date) over (
            partition by customer_id order by start_date, subscription_id
        ) as next_start_date
    from subscriptions
),

-- the period in force on each as_of_date decides whether the customer is
-- active then, so a customer who cancelled and came back later is inactive in
-- between and active again after (and a snapshot never changes afterwards)
periods_in_force as (
    select
        periods.customer_id,
        snapshot_dates.as_of_date,
        periods.cancellation_date
    from snapshot_dates
    inner join periods
        on periods.start_date < snapshot_dates.as_of_date
        and (periods.next_start_date is null or periods.next_start_date >= snapshot_dates.as_of_date)
),

-- active at as_of: signed up and subscribed before it, not cancelled on or before it
spined as (
    select
        customers.customer_id,
        periods_in_force.as_of_date,
        customers.signup_date,
        first_periods.first_subscribed_on
    from periods_in_force
    inner join customers
        on customers.customer_id = periods_in_force.customer_id
    inner join first_periods
        on first_periods.customer_id = periods_in_force.customer_id
    where customers.signup_date < periods_in_force.as_of_date
        and (
            periods_in_force.cancellation_date is null
            or periods_in_force.cancellation_date > periods_in_force.as_of_date
        )
),

final as (
    select * from spined
)

select * from final

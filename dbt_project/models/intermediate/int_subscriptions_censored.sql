with subscriptions as (
    select * from {{ ref('stg_saas__subscriptions') }}
),

-- time travel: periods not yet started are dropped; ends and cancellations
-- on or after as_of have not happened yet
censored as (
    select
        subscription_id,
        customer_id,
        plan,
        contract_type,
        monthly_price,
        start_date,
        {{ known_at_cutoff('end_date') }} as end_date,
        {{ known_at_cutoff('cancellation_date') }} as cancellation_date,
        case
            when {{ visible_before_cutoff('cancellation_date') }} then cancellation_reason
        end as cancellation_reason
    from subscriptions
    where {{ visible_before_cutoff('start_date') }}
),

sequenced as (
    select
        *,
        row_number() over customer_periods as period_number,
        lag(plan) over customer_periods as previous_plan,
        lag(monthly_price) over customer_periods as previous_monthly_price
    from censored
    window customer_periods as (partition by customer_id order by start_date, subscription_id)
),

final as (
    select
        *,
        coalesce(plan <> previous_plan, false) as is_plan_change,
        coalesce(monthly_price <> previous_monthly_price, false) as is_price_change
    from sequenced
)

select * from final

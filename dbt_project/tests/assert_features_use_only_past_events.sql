{#- Point-in-time proof for customer_features. Fails (returns rows) when
    1. any windowed model read an event dated on or after its as_of_date
       (audit column last_event_date_used), or
    2. key features of a fixed sample of customers differ from a naive,
       independent recomputation that reads only events strictly before
       as_of_date (plain range joins: slow, so only for the sample). -#}

with mart as (
    select * from {{ ref('customer_features') }}
),

customers as (
    select * from {{ ref('stg_saas__customers') }}
),

usage_events as (
    select * from {{ ref('stg_saas__usage_events') }}
    where {{ visible_before_cutoff('usage_date') }}
),

payments as (
    select * from {{ ref('stg_saas__payments') }}
    where {{ visible_before_cutoff('invoice_date') }}
),

tickets as (
    select * from {{ ref('stg_saas__support_tickets') }}
),

subscriptions as (
    select * from {{ ref('stg_saas__subscriptions') }}
    where {{ visible_before_cutoff('start_date') }}
),

audit_dates as (
    select 'int_usage_windowed' as model, customer_id, as_of_date, last_event_date_used
    from {{ ref('int_usage_windowed') }}
    union all
    select 'int_payments_windowed', customer_id, as_of_date, last_event_date_used
    from {{ ref('int_payments_windowed') }}
    union all
    select 'int_tickets_windowed', customer_id, as_of_date, last_event_date_used
    from {{ ref('int_tickets_windowed') }}
    union all
    select 'int_subscriptions_windowed', customer_id, as_of_date, last_event_date_used
    from {{ ref('int_subscriptions_windowed') }}
),

future_reads as (
    select
        customer_id,
        as_of_date,
        model || ' read an event dated ' || cast(last_event_date_used as {{ dbt.type_string() }}) as problem
    from audit_dates
    where last_event_date_used >= as_of_date
),

-- a fixed-size, scale-independent sample (md5: the same customers on every engine)
sampled_rows as (
    select mart.*
    from mart
    where customer_id in (
        select customer_id from customers order by md5(customer_id), customer_id limit 500
    )
),

usage_recomputed as (
    select
        sampled_rows.customer_id,
        sampled_rows.as_of_date,
        count(*) filter (where usage_events.usage_date >= sampled_rows.as_of_date - 30) as login_days_30d,
        coalesce(sum(usage_events.minutes_used) filter (
            where usage_events.usage_date >= sampled_rows.as_of_date - 90), 0) as usage_minutes_90d,
        max(usage_events.usage_date) as last_usage_date
    from sampled_rows
    left join usage_events
        on usage_events.customer_id = sampled_rows.customer_id
        and usage_events.usage_date < sampled_rows.as_of_date
    group by all
),

payments_recomputed as (
    select
        sampled_rows.customer_id,
        sampled_rows.as_of_date,
        count(payments.payment_id) filter (where payments.payment_status = 'failed') as failed_payments_90d
    from sampled_rows
    left join payments
        on payments.customer_id = sampled_rows.customer_id
        and payments.invoice_date < sampled_rows.as_of_date
        and payments.invoice_date >= sampled_rows.as_of_date - 90
    group by all
),

tickets_recomputed as (
    select
        sampled_rows.customer_id,
        sampled_rows.as_of_date,
        count(tickets.ticket_id) filter (
            where tickets.opened_at >= sampled_rows.as_of_date - 90
            and {{ visible_before_cutoff('tickets.opened_at') }}) as support_tickets_90d,
        avg(tickets.satisfaction_score) filter (
            where tickets.closed_at < sampled_rows.as_of_date
            and tickets.closed_at >= sampled_rows.as_of_date - 90
            and {{ visible_before_cutoff('tickets.closed_at') }}) as mean_satisfaction_90d
    from sampled_rows
    left join tickets
        on tickets.customer_id = sampled_rows.customer_id
        and tickets.opened_at < sampled_rows.as_of_date
    group by all
),

prices_recomputed as (
    select
        sampled_rows.customer_id,
        sampled_rows.as_of_date,
        max_by(subscriptions.monthly_price, subscriptions.start_date) as monthly_spend
    from sampled_rows
    left join subscriptions
        on subscriptions.customer_id = sampled_rows.customer_id
        and subscriptions.start_date < sampled_rows.as_of_date
    group by all
),

recomputed as (
    select
        sampled_rows.customer_id,
        sampled_rows.as_of_date,
        sampled_rows.login_days_30d as mart_login_days_30d,
        usage_recomputed.login_days_30d,
        sampled_rows.usage_minutes_90d as mart_usage_minutes_90d,
        usage_recomputed.usage_minutes_90d,
        sampled_rows.days_since_last_login as mart_days_since_last_login,
        {{ day_diff('coalesce(usage_recomputed.last_usage_date, customers.signup_date)', 'sampled_rows.as_of_date') }}
            as days_since_last_login,
        sampled_rows.failed_payments_90d as mart_failed_payments_90d,
        payments_recomputed.failed_payments_90d,
        sampled_rows.support_tickets_90d as mart_support_tickets_90d,
        tickets_recomputed.support_tickets_90d,
        sampled_rows.mean_satisfaction_90d as mart_mean_satisfaction_90d,
        tickets_recomputed.mean_satisfaction_90d,
        sampled_rows.monthly_spend as mart_monthly_spend,
        prices_recomputed.monthly_spend
    from sampled_rows
    inner join customers using (customer_id)
    inner join usage_recomputed using (customer_id, as_of_date)
    inner join payments_recomputed using (customer_id, as_of_date)
    inner join tickets_recomputed using (customer_id, as_of_date)
    inner join prices_recomputed using (customer_id, as_of_date)
),

mismatches as (
    select
        customer_id,
        as_of_date,
        'features differ from a recomputation on events before as_of_date: '
            || concat_ws(', ',
                case when mart_login_days_30d is distinct from login_days_30d then 'login_days_30d' end,
                case when abs(mart_usage_minutes_90d - usage_minutes_90d) > 1e-6 then 'usage_minutes_90d' end,
                case when mart_days_since_last_login is distinct from days_since_last_login then 'days_since_last_login' end,
                case when mart_failed_payments_90d is distinct from failed_payments_90d then 'failed_payments_90d' end,
                case when mart_support_tickets_90d is distinct from support_tickets_90d then 'support_tickets_90d' end,
                case when coalesce(abs(mart_mean_satisfaction_90d - mean_satisfaction_90d) > 1e-9,
                    (mart_mean_satisfaction_90d is null) <> (mean_satisfaction_90d is null))
                    then 'mean_satisfaction_90d' end,
                case when mart_monthly_spend is distinct from monthly_spend then 'monthly_spend' end
            ) as problem
    from recomputed
    where mart_login_days_30d is distinct from login_days_30d
        or abs(mart_usage_minutes_90d - usage_minutes_90d) > 1e-6
        or mart_days_since_last_login is distinct from days_since_last_login
        or mart_failed_payments_90d is distinct from failed_payments_90d
        or mart_support_tickets_90d is distinct from support_tickets_90d
        or coalesce(abs(mart_mean_satisfaction_90d - mean_satisfaction_90d) > 1e-9,
            (mart_mean_satisfaction_90d is null) <> (mean_satisfaction_90d is null))
        or mart_monthly_spend is distinct from monthly_spend
),

final as (
    select * from future_reads
    union all
    select * from mismatches
)

select * from final

{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}

with payments as (
    select
        customer_id,
        invoice_date as event_date,
        payment_status
    from {{ ref('stg_saas__payments') }}
    where {{ visible_before_cutoff('invoice_date') }}
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

final as (
    {{ trailing_window_totals('payments', 'snapshots', 'snapshot_dates', {
        'invoices': ['1', 'integer'],
        'failed_payments': ["(payment_status = 'failed')::integer", 'integer'],
    }, [30, 90], rebuild_from) }}
)

select * from final

with snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
),

payments as (
    select * from {{ ref('stg_saas__payments') }}
    where {{ visible_before_cutoff('invoice_date') }}
),

payment_days as (
    {{ daily_running_totals('payments', 'invoice_date', {
        'invoices': ['count(*)', 'integer'],
        'failed_payments': ["count(*) filter (where payment_status = 'failed')", 'integer'],
    }) }}
),

final as (
    {{ trailing_window_totals('snapshots', 'payment_days', ['invoices', 'failed_payments'], [30, 90]) }}
)

select * from final

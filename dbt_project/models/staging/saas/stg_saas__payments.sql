{{ event_staging_config(unique_key='payment_id', tonight_column='invoice_date') }}
{%- set since = staged_since('invoice_date', 'payments') %}

with source as (
    select * from {{ source('saas', 'payments') }}
    {%- if since is not none %}
    where cast(invoice_date as date) >= {{ since }}
    {%- endif %}
),

renamed as (
    select
        cast(trim(payment_id) as {{ dbt.type_string() }}) as payment_id,
        cast(trim(customer_id) as {{ dbt.type_string() }}) as customer_id,
        invoice_date::date as invoice_date,
        -- USD
        amount::double as amount,
        {{ clean_category('status') }} as payment_status
    from source
),

final as (
    select distinct * from renamed
)

select * from final

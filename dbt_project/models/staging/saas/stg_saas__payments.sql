{{ config(
    materialized='incremental',
    incremental_strategy='delete+insert',
    unique_key='payment_id',
    on_schema_change='fail',
    meta={'tonight_column': 'invoice_date'}
) }}
{%- set since = staged_since('invoice_date', 'payments') %}

with source as (
    select * from {{ source('saas', 'payments') }}
    {%- if since is not none %}
    where cast(invoice_date as date) >= {{ since }}
    {%- endif %}
),

renamed as (
    select
        trim(payment_id)::varchar as payment_id,
        trim(customer_id)::varchar as customer_id,
        invoice_date::date as invoice_date,
        -- USD
        amount::double as amount,
        {{ clean_category('status') }} as payment_status,
    from source
),

final as (
    select distinct * from renamed
)

select * from final

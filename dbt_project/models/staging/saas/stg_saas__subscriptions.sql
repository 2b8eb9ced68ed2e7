with source as (
    select * from {{ source('saas', 'subscriptions') }}
),

renamed as (
    select
        cast(trim(subscription_id) as {{ dbt.type_string() }}) as subscription_id,
        cast(trim(customer_id) as {{ dbt.type_string() }}) as customer_id,
        {{ clean_category('plan') }} as plan,
        {{ clean_category('contract_type') }} as contract_type,
        -- USD per month
        monthly_price::double as monthly_price,
        start_date::date as start_date,
        -- exclusive: the first day the period no longer runs
        end_date::date as end_date,
        cancellation_date::date as cancellation_date,
        {{ clean_category('cancellation_reason') }} as cancellation_reason
    from source
),

final as (
    select distinct * from renamed
)

select * from final

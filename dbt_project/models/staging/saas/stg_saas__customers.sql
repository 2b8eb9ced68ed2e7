with source as (
    select * from {{ source('saas', 'customers') }}
),

renamed as (
    select
        cast(trim(customer_id) as {{ dbt.type_string() }}) as customer_id,
        signup_date::date as signup_date,
        {{ clean_category('region') }} as region,
        {{ clean_category('acquisition_channel') }} as acquisition_channel,
        {{ clean_category('age_band') }} as age_band
    from source
),

final as (
    select distinct * from renamed
)

select * from final

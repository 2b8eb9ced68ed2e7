with source as (
    select * from {{ source('saas', 'usage_events') }}
),

renamed as (
    select
        trim(customer_id)::varchar as customer_id,
        event_date::date as usage_date,
        sessions::integer as sessions,
        -- minutes of use that day
        minutes::double as minutes_used,
    from source
),

final as (
    select distinct * from renamed
)

select * from final

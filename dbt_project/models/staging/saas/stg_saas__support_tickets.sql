with source as (
    select * from {{ source('saas', 'support_tickets') }}
),

renamed as (
    select
        trim(ticket_id)::varchar as ticket_id,
        trim(customer_id)::varchar as customer_id,
        opened_at::timestamp as opened_at,
        closed_at::timestamp as closed_at,
        {{ clean_category('category') }} as ticket_category,
        {{ clean_category('priority') }} as ticket_priority,
        -- 1 (worst) to 5 (best)
        satisfaction_score::integer as satisfaction_score,
    from source
),

final as (
    select distinct * from renamed
)

select * from final

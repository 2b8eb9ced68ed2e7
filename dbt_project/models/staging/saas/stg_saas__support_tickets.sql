with source as (
    select * from {{ source('saas', 'support_tickets') }}
),

renamed as (
    select
        cast(trim(ticket_id) as {{ dbt.type_string() }}) as ticket_id,
        cast(trim(customer_id) as {{ dbt.type_string() }}) as customer_id,
        opened_at::timestamp as opened_at,
        closed_at::timestamp as closed_at,
        {{ clean_category('category') }} as ticket_category,
        {{ clean_category('priority') }} as ticket_priority,
        -- 1 (worst) to 5 (best)
        satisfaction_score::integer as satisfaction_score
    from source
),

final as (
    select distinct * from renamed
)

select * from final

{{ event_staging_config(unique_key='ticket_id', tonight_column='opened_at') }}
{%- set since = staged_since('cast(opened_at as date)', 'support_tickets') %}

with source as (
    select * from {{ source('saas', 'support_tickets') }}
    {%- if since is not none %}
    where cast(opened_at as date) >= {{ since }}
    {%- endif %}
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

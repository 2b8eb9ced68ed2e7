{{ config(
    materialized='incremental',
    incremental_strategy='delete+insert',
    unique_key='ticket_id',
    on_schema_change='fail',
    meta={'tonight_column': 'opened_at'}
) }}
{%- set since = staged_since('cast(opened_at as date)', 'support_tickets') %}

with source as (
    select * from {{ source('saas', 'support_tickets') }}
    {%- if since is not none %}
    where cast(opened_at as date) >= {{ since }}
    {%- endif %}
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

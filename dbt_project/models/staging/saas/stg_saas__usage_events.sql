{{ event_staging_config(unique_key=['customer_id', 'usage_date'], tonight_column='usage_date') }}
{%- set since = staged_since('usage_date', 'usage_events') %}

with source as (
    select * from {{ source('saas', 'usage_events') }}
    {%- if since is not none %}
    where cast(event_date as date) >= {{ since }}
    {%- endif %}
),

renamed as (
    select
        cast(trim(customer_id) as {{ dbt.type_string() }}) as customer_id,
        event_date::date as usage_date,
        sessions::integer as sessions,
        -- minutes of use that day
        minutes::double as minutes_used
    from source
),

final as (
    select distinct * from renamed
)

select * from final

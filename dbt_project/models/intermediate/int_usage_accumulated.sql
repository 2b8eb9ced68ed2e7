with usage_events as (
    select * from {{ ref('stg_saas__usage_events') }}
    where {{ visible_before_cutoff('usage_date') }}
),

-- one row per customer and active day with running totals since the first day
final as (
    {{ daily_running_totals('usage_events', 'usage_date', {
        'sessions': ['sum(sessions)', 'integer'],
        'minutes': ['sum(minutes_used)', 'double'],
        'active_days': ['1', 'integer'],
    }) }}
)

select * from final

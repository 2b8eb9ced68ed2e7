with snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
),

tickets as (
    select * from {{ ref('stg_saas__support_tickets') }}
),

-- each fact dated by the day it became known: a ticket when opened, its
-- satisfaction score only once the ticket was closed and rated
ticket_facts as (
    select
        customer_id,
        opened_at::date as known_on,
        1 as opened,
        0 as rated,
        0 as satisfaction_points,
    from tickets
    where {{ visible_before_cutoff('opened_at') }}
    union all
    select
        customer_id,
        closed_at::date as known_on,
        0 as opened,
        1 as rated,
        satisfaction_score as satisfaction_points,
    from tickets
    where satisfaction_score is not null
        and closed_at is not null
        and {{ visible_before_cutoff('closed_at') }}
),

ticket_days as (
    {{ daily_running_totals('ticket_facts', 'known_on', {
        'tickets': ['sum(opened)', 'integer'],
        'rated_tickets': ['sum(rated)', 'integer'],
        'satisfaction_points': ['sum(satisfaction_points)', 'integer'],
    }) }}
),

final as (
    {{ trailing_window_totals('snapshots', 'ticket_days', ['tickets', 'rated_tickets', 'satisfaction_points'], [30, 90]) }}
)

select * from final

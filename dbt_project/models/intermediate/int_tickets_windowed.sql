{{ snapshot_model_config() }}
{%- set rebuild_from = snapshot_rebuild_from() %}

with tickets as (
    select * from {{ ref('stg_saas__support_tickets') }}
),

snapshots as (
    select customer_id, as_of_date from {{ ref('int_customer_snapshots_spined') }}
    {%- if rebuild_from is not none %}
    where as_of_date >= {{ rebuild_from }}
    {%- endif %}
),

snapshot_dates as (
    select * from {{ ref('int_snapshot_dates') }}
),

-- each fact dated by the day it became known: a ticket when opened, its
-- satisfaction score only once the ticket was closed and rated
ticket_facts as (
    select
        customer_id,
        opened_at::date as event_date,
        1 as opened,
        0 as rated,
        0 as satisfaction_points
    from tickets
    where {{ visible_before_cutoff('opened_at') }}
    union all
    select
        customer_id,
        closed_at::date as event_date,
        0 as opened,
        1 as rated,
        satisfaction_score as satisfaction_points
    from tickets
    where satisfaction_score is not null
        and closed_at is not null
        and {{ visible_before_cutoff('closed_at') }}
),

final as (
    {{ trailing_window_totals('ticket_facts', 'snapshots', 'snapshot_dates', {
        'tickets': ['opened', 'integer'],
        'rated_tickets': ['rated', 'integer'],
        'satisfaction_points': ['satisfaction_points', 'integer'],
    }, [30, 90], rebuild_from) }}
)

select * from final

with

customers as (

    select * from {{ ref('stg_telco__customers') }}

),

flags as (

    select
        customer_id,
        cast(churn = 'yes' as integer) as churned_within_30d,

        gender,
        senior_citizen as is_senior_citizen,
        cast(partner = 'yes' as integer) as has_partner,
        cast(dependents = 'yes' as integer) as has_dependents,

        tenure_months,
        contract_type,
        cast(paperless_billing = 'yes' as integer) as has_paperless_billing,
        payment_method,
        monthly_charges,
        total_charges,

        cast(phone_service = 'yes' as integer) as has_phone_service,
        multiple_lines,
        internet_service,
        online_security,
        online_backup,
        device_protection,
        tech_support,
        streaming_tv,
        streaming_movies,

        cast(online_security = 'yes' as integer)
        + cast(online_backup = 'yes' as integer)
        + cast(device_protection = 'yes' as integer)
        + cast(tech_support = 'yes' as integer)
        + cast(streaming_tv = 'yes' as integer)
        + cast(streaming_movies = 'yes' as integer) as add_on_service_count

    from customers

),

engineered as (

    select
        *,

        -- USD per month over the whole tenure; a customer in the first month
        -- (tenure 0, no charges yet) has paid the current monthly charge
        coalesce(total_charges / nullif(tenure_months, 0), monthly_charges) as avg_monthly_charges,

        -- phone line + internet line + add-ons
        has_phone_service + cast(internet_service != 'no' as integer) + add_on_service_count as service_count,

        case
            when tenure_months <= 12 then '0-12 months'
            when tenure_months <= 24 then '13-24 months'
            when tenure_months <= 48 then '25-48 months'
            else '49+ months'
        end as tenure_band,

        cast(internet_service = 'fiber optic' and tech_support = 'no' as integer)
            as has_fibre_without_tech_support,

        cast(payment_method like '%(automatic)' as integer) as has_automatic_payment

    from flags

),

final as (

    select
        customer_id,
        -- the data carries no dates: the whole file is one snapshot
        cast('{{ var("telco_snapshot_date") }}' as date) as as_of_date,
        churned_within_30d,

        gender,
        is_senior_citizen,
        has_partner,
        has_dependents,
        tenure_months,
        -- churn risk falls fastest in the first months, so tenure also on a log scale
        ln(1 + tenure_months) as log_tenure_months,
        tenure_band,
        contract_type,
        has_paperless_billing,
        payment_method,
        has_automatic_payment,
        monthly_charges,
        total_charges,
        avg_monthly_charges,
        -- USD: positive when today's bill is above the tenure average (a price rise)
        monthly_charges - avg_monthly_charges as monthly_charges_vs_average,
        -- USD per service held: what each service costs the customer
        monthly_charges / greatest(service_count, 1) as monthly_charges_per_service,
        has_phone_service,
        multiple_lines,
        internet_service,
        online_security,
        online_backup,
        device_protection,
        tech_support,
        streaming_tv,
        streaming_movies,
        add_on_service_count,
        service_count,
        has_fibre_without_tech_support

    from engineered

)

select * from final

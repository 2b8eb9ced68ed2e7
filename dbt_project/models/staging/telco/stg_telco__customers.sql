with

source as (

    select * from {{ source('telco', 'telco_customer_churn') }}

),

renamed as (

    select
        trim(customerID) as customer_id,

        -- demographics
        lower(trim(gender)) as gender,
        cast(trim(SeniorCitizen) as integer) as senior_citizen,
        lower(trim(Partner)) as partner,
        lower(trim(Dependents)) as dependents,

        -- account; tenure in whole months, 0 = joined this month
        cast(trim(tenure) as integer) as tenure_months,
        lower(trim(Contract)) as contract_type,
        lower(trim(PaperlessBilling)) as paperless_billing,
        lower(trim(PaymentMethod)) as payment_method,
        -- USD; TotalCharges is blank for the customers with tenure 0
        cast(trim(MonthlyCharges) as double) as monthly_charges,
        cast(nullif(trim(TotalCharges), '') as double) as total_charges,

        -- services
        lower(trim(PhoneService)) as phone_service,
        lower(trim(MultipleLines)) as multiple_lines,
        lower(trim(InternetService)) as internet_service,
        lower(trim(OnlineSecurity)) as online_security,
        lower(trim(OnlineBackup)) as online_backup,
        lower(trim(DeviceProtection)) as device_protection,
        lower(trim(TechSupport)) as tech_support,
        lower(trim(StreamingTV)) as streaming_tv,
        lower(trim(StreamingMovies)) as streaming_movies,

        -- yes = left within the last month before the snapshot
        lower(trim(Churn)) as churn

    from source

),

deduplicated as (

    select distinct * from renamed

)

select * from deduplicated

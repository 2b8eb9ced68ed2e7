"""Data: the raw tables a dataset lands (the demo generator) and the landing contract checked before dbt."""

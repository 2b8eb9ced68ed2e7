"""Features: running dbt, the feature contract read from its manifest, and checked reads of the feature mart."""

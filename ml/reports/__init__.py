"""Reports: the EDA profile of the feature mart and the nightly's closing summary."""

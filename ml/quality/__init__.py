"""Quality: Great Expectations audits of landing files, the feature mart and the scores."""

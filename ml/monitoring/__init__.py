"""Monitoring: drift, realized and estimated performance, and the retraining decision."""

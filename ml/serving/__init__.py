"""Serving: publishing the BI tables atomically, and the real-time scoring API."""

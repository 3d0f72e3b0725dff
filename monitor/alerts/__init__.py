"""Alerts: the durable outbox and one small file per sink."""

"""Accounts with Redis sessions and an event-sourced session audit trail."""

__version__ = "0.1.0"

"""Instant tools over finished runs: report, sweep, export, the methods table."""

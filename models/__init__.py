"""Run history in SQL: flow runs and their steps."""

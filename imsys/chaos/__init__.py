"""The chaos suite (`python -m imsys chaos`): adversarial scenarios against private Redis
and PostgreSQL servers it starts, real service processes and simulated routers; one row
per scenario (lost, overlapping, false statuses, stalls, measured, target, ok)."""

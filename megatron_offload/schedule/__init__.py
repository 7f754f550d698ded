"""Schedules as data. Pure Python: nothing in this package imports torch."""

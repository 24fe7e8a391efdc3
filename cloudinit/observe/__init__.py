"""Observing a running cluster from the operator's machine: the policies the
agents write their reports with, and reading those reports back."""

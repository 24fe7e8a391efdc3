"""Rendering: what an instance boots with, from the templates (see README.md)."""

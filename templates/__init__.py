"""Jinja2 templates rendered by tfcluster.cloudinit (package data, no code)."""

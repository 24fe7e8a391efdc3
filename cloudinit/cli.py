"""The tfcluster command line: a thin layer over library functions."""

import click


@click.group()
def main() -> None:
    """tfcluster: distributed TensorFlow on plain cloud machines."""

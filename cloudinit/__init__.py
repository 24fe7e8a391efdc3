"""The operator side: cluster config, user-data rendering, providers (EC2, local), the CLI."""

"""The instance agent: identity -> claim -> record -> DNS -> barrier -> TF_CONFIG -> server."""

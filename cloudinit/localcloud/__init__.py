"""The local cloud: `tfcluster up --local` boots the cluster's instances on this machine.

moto plays the EC2 API, each instance the API reports running becomes a
network namespace that runs its own user-data, and the one piece that
differs from an EC2 image is the service manager (see README.md).
"""

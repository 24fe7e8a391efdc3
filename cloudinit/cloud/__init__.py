"""The cloud seam: the node provider interface and its EC2 backend (see README.md)."""

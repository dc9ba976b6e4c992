"""Connections into a sandbox: the `Transport` seam, its kinds (ssh, http) and their clients."""

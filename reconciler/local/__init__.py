"""The local metro: an offline emulator of one UKC metro that runs real bubblewrap sandboxes.

The controller imports nothing from here except `reconciler.local.daemon` to start it.
"""

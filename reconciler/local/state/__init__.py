"""The local metro's instances: records and their wire format, what is accepted, the lifecycle
state machine with its restart and scale-to-zero policies, and `instances.json`."""

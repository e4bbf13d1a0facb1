"""Containers: OCI spec, lifecycle under conmon, exits, logs, stats, events."""

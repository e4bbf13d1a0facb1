"""The daemon's own life: the command line, serving, the root lock, live config, wipe."""

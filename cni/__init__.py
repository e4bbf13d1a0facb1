"""A CNI client library (like libcni): network configs, plugins, results. Knows nothing about pods."""

"""Image layers on disk: hardened layer extraction and the layer store keyed by chain ID."""

"""criopy: a Kubernetes container runtime (CRI runtime.v1 server)."""

__version__ = "0.1.0"

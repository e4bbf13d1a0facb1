"""RuntimeService servicer: validate, delegate, translate. Methods not here answer UNIMPLEMENTED.

The RPCs live in one module per group; this class puts them together (their
shared parts are set by RuntimeParts).
"""

from __future__ import annotations

from cri.services.containers import ContainerRpcs
from cri.services.runtime_info import RuntimeInfoRpcs
from cri.services.sandboxes import SandboxRpcs
from cri.services.stats import StatsRpcs
from cri.services.streams import StreamRpcs


class RuntimeService(RuntimeInfoRpcs, SandboxRpcs, ContainerRpcs, StreamRpcs, StatsRpcs):
    """Every RuntimeService RPC; constructed with RuntimeParts' arguments."""

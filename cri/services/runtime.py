"""RuntimeService servicer: validate, delegate, translate. Methods not here answer UNIMPLEMENTED.

The RPCs live in one module per group; this class puts them together and
hands them what they delegate to.
"""

from __future__ import annotations

from cni.readiness import NetworkWatcher
from cri.containers.execs import Execs
from cri.containers.manager import ContainerManager
from cri.daemon.live_config import LiveConfig
from cri.oci.handlers import RuntimeHandlers
from cri.services.container_convert import ListCache
from cri.services.containers import ContainerRpcs
from cri.services.runtime_info import RuntimeInfoRpcs
from cri.services.sandboxes import SandboxRpcs
from cri.services.stats import StatsRpcs
from cri.services.streams import StreamRpcs
from cri.state import Store
from cri.streaming.server import StreamingServer
from podsandbox.manager import SandboxManager


class RuntimeService(RuntimeInfoRpcs, SandboxRpcs, ContainerRpcs, StreamRpcs, StatsRpcs):
    def __init__(
        self,
        live: LiveConfig,
        *,
        handlers: RuntimeHandlers,
        network: NetworkWatcher,
        store: Store,
        sandboxes: SandboxManager,
        containers: ContainerManager,
        execs: Execs,
        streaming: StreamingServer,
    ) -> None:
        self._live = live
        self._handlers = handlers
        self._network = network
        self._store = store
        self._sandboxes = sandboxes
        self._containers = containers
        self._execs = execs
        self._streaming = streaming
        self._container_lists = ListCache()

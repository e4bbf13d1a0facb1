"""What the RuntimeService's RPC groups share: the managers and facilities they delegate to.

Each RPC group is a class of its own module (as cri-o keeps one file per RPC
group of its server); `RuntimeService` combines them; this base sets what they share, once.
"""

from __future__ import annotations

from cni.readiness import NetworkWatcher
from cri.containers.execs import Execs
from cri.containers.manager import ContainerManager
from cri.daemon.live_config import LiveConfig
from cri.oci.handlers import RuntimeHandlers
from cri.services.container_convert import ListCache
from cri.state import Store
from cri.streaming.server import StreamingServer
from podsandbox.manager import SandboxManager


class RuntimeParts:
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

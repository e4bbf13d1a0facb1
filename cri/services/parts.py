"""What the RuntimeService's RPC groups share: the managers and facilities they delegate to.

Each RPC group is a class of its own module (as cri-o keeps one file per RPC
group of its server); `RuntimeService` combines them and sets these once.
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
    _live: LiveConfig
    _handlers: RuntimeHandlers
    _network: NetworkWatcher
    _store: Store
    _sandboxes: SandboxManager
    _containers: ContainerManager
    _execs: Execs
    _streaming: StreamingServer
    _container_lists: ListCache

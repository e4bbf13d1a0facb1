"""The runtime itself: Version, Status (readiness, handlers, features), RuntimeConfig, UpdateRuntimeConfig."""

from __future__ import annotations

import ipaddress
import logging

from api.runtime.v1 import api_pb2 as pb
from cri import __version__
from cri.errors import InvalidArgument
from cri.log import event
from cri.oci.handlers import HandlerInfo
from cri.services.parts import RuntimeParts
from cri.services.readiness import runtime_readiness
from cri.system import offload
from cri.transport.grpcserver import Encoded

log = logging.getLogger(__name__)

RUNTIME_NAME = "criopy"
CRI_API_VERSION = "v1"
# What the kubelet's Version call reports as the CRI "version" (cri-o and containerd say the same).
KUBELET_API_VERSION = "0.1.0"
POD_CIDR_KEY = "pod_cidr"
# The same for the daemon's whole life: encoded once, not built and serialized at each of the kubelet's calls.
_VERSION = Encoded(
    pb.VersionResponse(
        version=KUBELET_API_VERSION,
        runtime_name=RUNTIME_NAME,
        runtime_version=__version__,
        runtime_api_version=CRI_API_VERSION,
    ).SerializeToString()
)


def _handler_message(name: str, info: HandlerInfo) -> pb.RuntimeHandler:
    return pb.RuntimeHandler(
        name=name,
        features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=info.recursive_read_only_mounts,
            user_namespaces=info.user_namespaces,
        ),
    )


class RuntimeInfoRpcs(RuntimeParts):
    async def Version(self, request: pb.VersionRequest) -> Encoded:
        return _VERSION

    async def Status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        config = self._live.current
        runtime = runtime_readiness(config, self._handlers)
        net = self._network.current(
            config.network.cni_config_dir, config.network.cni_plugin_dirs, config.network.cni_default_network
        )
        conditions = [
            pb.RuntimeCondition(
                type="RuntimeReady", status=runtime.ready, reason=runtime.reason, message=runtime.message
            ),
            pb.RuntimeCondition(type="NetworkReady", status=net.ready, reason=net.reason, message=net.message),
        ]
        handlers = self._handlers.handlers
        # The unnamed handler is the default one, as the kubelet looks it up.
        messages = (
            [_handler_message("", handlers[self._handlers.default])] if self._handlers.default in handlers else []
        )
        messages += [_handler_message(name, info) for name, info in sorted(handlers.items())]
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            runtime_handlers=messages,
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
            info={"config": config.to_json()} if request.verbose else {},
        )

    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest) -> pb.RuntimeConfigResponse:
        driver = pb.SYSTEMD if self._live.current.runtime.cgroup_manager == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest) -> pb.UpdateRuntimeConfigResponse:
        pod_cidr = request.runtime_config.network_config.pod_cidr
        for cidr in filter(None, (c.strip() for c in pod_cidr.split(","))):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise InvalidArgument(
                    "runtime_config.network_config.pod_cidr", f"{cidr!r} is not a CIDR: {exc}"
                ) from exc
        if pod_cidr:
            await offload.to_thread(self._store.put, POD_CIDR_KEY, pod_cidr)
            event(log, logging.INFO, "pod CIDR recorded", pod_cidr=pod_cidr)
        return pb.UpdateRuntimeConfigResponse()

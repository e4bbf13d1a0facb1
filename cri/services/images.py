"""ImageService servicer: validate, delegate to the image manager, translate."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

from api.runtime.v1 import api_pb2 as pb
from cri.errors import (
    CriError,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from cri.errors import DeadlineExceeded as CriDeadline
from cri.images import auth, reference
from cri.images.index import AmbiguousImage, ImageRecord
from cri.images.manager import BadImage, FsUsage, ImageInUse, ImageManager
from cri.images.registry import (
    ManifestUnknown,
    PlatformUnavailable,
    PullStalled,
    RegistryBlocked,
    RegistryError,
    RegistryUnauthorized,
    RegistryUnavailable,
    UnsupportedManifest,
)
from cri.storage.unpack import UnpackError
from cri.transport.rpc import chunks


@contextmanager
def _translated(field: str) -> Iterator[None]:
    """Image domain errors as the gRPC codes a kubelet acts on."""
    try:
        yield
    except CriError:
        raise
    except reference.ReferenceError as exc:
        raise InvalidArgument(field, str(exc)) from exc
    except AmbiguousImage as exc:
        raise InvalidArgument(field, str(exc)) from exc
    except RegistryUnauthorized as exc:
        raise Unauthenticated(str(exc)) from exc
    except (ManifestUnknown, PlatformUnavailable) as exc:
        raise NotFound(str(exc)) from exc
    except (RegistryBlocked, UnsupportedManifest, ImageInUse) as exc:
        raise FailedPrecondition(str(exc)) from exc
    except PullStalled as exc:
        raise CriDeadline(str(exc)) from exc
    except RegistryUnavailable as exc:
        raise Unavailable(str(exc)) from exc
    except (RegistryError, UnpackError, BadImage) as exc:
        raise Internal(str(exc)) from exc


def image_message(image: ImageRecord) -> pb.Image:
    uid, username = image.user()
    return pb.Image(
        id=image.id,
        repo_tags=sorted(image.repo_tags),
        repo_digests=sorted(image.repo_digests),
        size=image.size,
        uid=pb.Int64Value(value=uid) if uid is not None else None,
        username=username,
        spec=pb.ImageSpec(image=image.id, annotations=image.annotations),
        pinned=image.pinned,
    )


def _verbose(image: ImageRecord) -> dict[str, str]:
    info = {
        "imageSpec": image.config,
        "manifestDigest": image.manifest_digest,
        "manifestMediaType": image.manifest_media_type,
        "layers": [
            {
                "digest": layer.digest,
                "mediaType": layer.media_type,
                "size": layer.size,
                "diffID": layer.diff_id,
                "chainID": layer.chain_id,
            }
            for layer in image.layers
        ],
        "size": image.size,
    }
    return {"info": json.dumps(info)}


def _usage(fs: FsUsage) -> pb.FilesystemUsage:
    return pb.FilesystemUsage(
        timestamp=fs.timestamp,
        fs_id=pb.FilesystemIdentifier(mountpoint=fs.mountpoint),
        used_bytes=pb.UInt64Value(value=fs.used_bytes),
        inodes_used=pb.UInt64Value(value=fs.inodes_used),
    )


class ImageService:
    def __init__(self, images: ImageManager) -> None:
        self._images = images

    def _listed(self, request_filter: pb.ImageFilter | None) -> list[pb.Image]:
        if request_filter is not None and request_filter.image.image:
            with _translated("filter.image.image"):
                found = self._images.find(request_filter.image.image)
            return [image_message(found)] if found is not None else []
        return [image_message(i) for i in sorted(self._images.images(), key=lambda i: i.created_at)]

    async def ListImages(self, request: pb.ListImagesRequest) -> pb.ListImagesResponse:
        return pb.ListImagesResponse(images=self._listed(request.filter if request.HasField("filter") else None))

    async def StreamImages(self, request: pb.StreamImagesRequest) -> AsyncIterator[pb.StreamImagesResponse]:
        items = self._listed(request.filter if request.HasField("filter") else None)
        for chunk in chunks(items):
            yield pb.StreamImagesResponse(images=chunk)

    async def ImageStatus(self, request: pb.ImageStatusRequest) -> pb.ImageStatusResponse:
        if not request.image.image:
            raise InvalidArgument("image.image", "must not be empty")
        with _translated("image.image"):
            found = self._images.find(request.image.image)
        if found is None:
            return pb.ImageStatusResponse()
        return pb.ImageStatusResponse(image=image_message(found), info=_verbose(found) if request.verbose else {})

    async def PullImage(self, request: pb.PullImageRequest) -> pb.PullImageResponse:
        if not request.image.image:
            raise InvalidArgument("image.image", "must not be empty")
        a = request.auth
        try:
            credentials = auth.from_cri(
                username=a.username,
                password=a.password,
                auth=a.auth,
                server_address=a.server_address,
                identity_token=a.identity_token,
                registry_token=a.registry_token,
            )
        except ValueError as exc:
            raise InvalidArgument("auth", str(exc)) from exc
        with _translated("image.image"):
            image = await self._images.pull(request.image.image, credentials)
        return pb.PullImageResponse(image_ref=image.id)

    async def RemoveImage(self, request: pb.RemoveImageRequest) -> pb.RemoveImageResponse:
        if not request.image.image:
            raise InvalidArgument("image.image", "must not be empty")
        with _translated("image.image"):
            await self._images.remove(request.image.image)
        return pb.RemoveImageResponse()

    async def ImageFsInfo(self, request: pb.ImageFsInfoRequest) -> pb.ImageFsInfoResponse:
        usage = self._images.fs_usage()
        if usage is None:  # the first walk has not finished: report nothing rather than wait
            return pb.ImageFsInfoResponse()
        images, containers = usage
        return pb.ImageFsInfoResponse(image_filesystems=[_usage(images)], container_filesystems=[_usage(containers)])

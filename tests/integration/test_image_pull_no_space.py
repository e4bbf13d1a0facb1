"""A full layer store met at any step of a pull names the layer as the manifest does: by its blob digest."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cri.config import Config, RegistryConfig
from cri.errors import NoSpace
from cri.images.manager import ImageManager
from cri.state import Store
from cri.storage.layers import LayerStore
from tests.support import image_builder as ib
from tests.support.registry_harness import Registry


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, ib.Image]]:
    image = ib.busybox_image([ib.Layer([ib.File("/hello", b"hi\n")])])
    with Registry().start() as registry:
        ib.push(registry.url, "nospace/app", image, "v1")
        yield f"{registry.host}/nospace/app:v1", image


def _pull(tmp_path: Path, ref: str) -> None:
    config = Config()
    config.root = str(tmp_path / "root")
    config.image.registries = [RegistryConfig(prefix=ref.split("/", 1)[0], insecure=True)]
    store = Store.open(config.root)

    async def pull() -> None:
        images = ImageManager(config, store)
        images.index.load()
        try:
            await images.pull(ref, None)
        finally:
            await images.close()

    try:
        asyncio.run(pull())
    finally:
        store.close()


def _refuse(self: LayerStore, *args: Any, **kwargs: Any) -> Any:
    """The store's own NoSpace, as a full disk gives it: naming the layer by its chain ID."""
    chain_id = getattr(args[0], "chain_id", args[0])  # stage(chain_id, ...) or publish(staged, ...)
    raise NoSpace(self.root, f"unpacking layer {chain_id}")


@pytest.mark.parametrize("step", ["stage", "publish"])
def test_a_full_layer_store_names_the_layers_blob_digest(
    served: tuple[str, ib.Image], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers owned by root needs root")
    ref, image = served
    monkeypatch.setattr(LayerStore, step, _refuse)
    with pytest.raises(NoSpace) as full:
        _pull(tmp_path, ref)
    message = str(full.value)
    assert message.startswith(f"no space left on device in {tmp_path / 'root'}"), message
    assert any(f"unpacking layer {layer.digest}" in message for layer in image.layers), message

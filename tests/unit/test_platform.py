"""The host platform and choosing a manifest out of an index."""

from __future__ import annotations

import pytest

from cri.images.platform import NoMatchingPlatform, Platform, choose, host_platform, normalize_arch, parse_platform


@pytest.mark.parametrize(
    ("machine", "expected"),
    [
        ("x86_64", Platform("linux", "amd64")),
        ("aarch64", Platform("linux", "arm64", "v8")),
        ("arm64", Platform("linux", "arm64", "v8")),
        ("armv7l", Platform("linux", "arm", "v7")),
        ("armv6l", Platform("linux", "arm", "v6")),
        ("i686", Platform("linux", "386")),
        ("ppc64le", Platform("linux", "ppc64le")),
        ("s390x", Platform("linux", "s390x")),
        ("riscv64", Platform("linux", "riscv64")),
        ("sparc64", Platform("linux", "sparc64")),  # unknown: passed through
    ],
)
def test_host_platform(machine, expected):
    assert host_platform(machine, "Linux") == expected


def test_host_platform_of_this_machine_is_linux():
    assert host_platform().os == "linux"


def test_str_and_parse():
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"
    assert str(Platform("linux", "amd64")) == "linux/amd64"
    assert parse_platform("linux/arm/7") == Platform("linux", "arm", "v7")
    assert parse_platform("linux/x86_64") == Platform("linux", "amd64")
    with pytest.raises(ValueError, match="os/architecture"):
        parse_platform("linux")


def test_normalize_arch_keeps_goarch_without_variant():
    assert normalize_arch("arm64") == ("arm64", "")
    assert normalize_arch("aarch64") == ("arm64", "v8")
    assert normalize_arch("arm", "7") == ("arm", "v7")


def entry(arch, variant=None, os="linux", digest=None):
    platform = {"os": os, "architecture": arch}
    if variant is not None:
        platform["variant"] = variant
    return {"digest": digest or f"sha256:{arch}{variant or ''}", "size": 1, "platform": platform}


INDEX = {
    "schemaVersion": 2,
    "manifests": [
        entry("amd64"),
        entry("arm", "v6"),
        entry("arm", "v7"),
        entry("arm64", "v8"),
        entry("ppc64le"),
        entry("unknown", os="unknown", digest="sha256:attestation"),
    ],
}


@pytest.mark.parametrize(
    ("host", "digest"),
    [
        (Platform("linux", "amd64"), "sha256:amd64"),
        (Platform("linux", "arm64", "v8"), "sha256:arm64v8"),
        (Platform("linux", "arm", "v7"), "sha256:armv7"),
        (Platform("linux", "arm", "v6"), "sha256:armv6"),
        (Platform("linux", "ppc64le"), "sha256:ppc64le"),
    ],
)
def test_choose_exact(host, digest):
    assert choose(INDEX, host)["digest"] == digest


def test_exact_variant_beats_no_variant_and_no_variant_is_the_fallback():
    index = {"manifests": [entry("arm64"), entry("arm64", "v8", digest="sha256:exact")]}
    assert choose(index, Platform("linux", "arm64", "v8"))["digest"] == "sha256:exact"
    only_plain = {"manifests": [entry("amd64"), entry("arm64", digest="sha256:plain")]}
    assert choose(only_plain, Platform("linux", "arm64", "v8"))["digest"] == "sha256:plain"
    # An index saying v8 fits a host that did not say (arm64 means v8).
    assert choose(INDEX, Platform("linux", "arm64"))["digest"] == "sha256:arm64v8"


def test_arm_host_runs_older_variants_preferring_the_nearest():
    index = {"manifests": [entry("arm", "v5", digest="sha256:v5"), entry("arm", "v6", digest="sha256:v6")]}
    assert choose(index, Platform("linux", "arm", "v7"))["digest"] == "sha256:v6"
    newer_only = {"manifests": [entry("arm", "v7")]}
    with pytest.raises(NoMatchingPlatform):
        choose(newer_only, Platform("linux", "arm", "v6"))


def test_aliases_in_the_index_are_normalized():
    index = {"manifests": [entry("x86_64", digest="sha256:alias")]}
    assert choose(index, Platform("linux", "amd64"))["digest"] == "sha256:alias"


def test_no_match_lists_what_is_available():
    index = {"manifests": [entry("amd64"), entry("arm", "v7"), entry("unknown", os="unknown")]}
    with pytest.raises(NoMatchingPlatform) as info:
        choose(index, Platform("linux", "s390x"))
    message = str(info.value)
    assert "linux/s390x" in message
    assert "linux/amd64, linux/arm/v7" in message
    assert "unknown" not in message.split("available")[1]


def test_os_must_match():
    with pytest.raises(NoMatchingPlatform):
        choose({"manifests": [entry("amd64", os="windows")]}, Platform("linux", "amd64"))


def test_malformed_index():
    with pytest.raises(NoMatchingPlatform, match="no manifests"):
        choose({}, Platform("linux", "amd64"))
    assert choose({"manifests": ["junk", {"platform": 3}, entry("amd64")]}, Platform("linux", "amd64"))

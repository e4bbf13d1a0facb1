"""Image reference parsing and normalization (docker/distribution's ParseNormalizedNamed)."""

from __future__ import annotations

import pytest

from cri.images.reference import Reference, ReferenceError, is_image_id_like, parse

D = "sha256:" + "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/busybox", "docker.io/library/busybox:latest"),
        ("index.docker.io/user/repo:v1", "docker.io/user/repo:v1"),
        ("user/repo", "docker.io/user/repo:latest"),
        ("user/repo/sub", "docker.io/user/repo/sub:latest"),
        ("registry.k8s.io/pause:3.9", "registry.k8s.io/pause:3.9"),
        ("localhost/app", "localhost/app:latest"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost:5000/a/b:tag", "localhost:5000/a/b:tag"),
        ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b:latest"),
        ("[::1]:5000/a", "[::1]:5000/a:latest"),
        ("host:5000/a/b@" + D, "host:5000/a/b@" + D),
        ("busybox@" + D, "docker.io/library/busybox@" + D),
        ("busybox:1.36@" + D, "docker.io/library/busybox:1.36@" + D),
        ("Example.com/app", "Example.com/app:latest"),
        ("a.b-c/e.f_g--h__i", "a.b-c/e.f_g--h__i:latest"),
        ("localhost:5000", "docker.io/library/localhost:5000"),
        ("repo:" + "t" * 128, "docker.io/library/repo:" + "t" * 128),
        ("repo:_Tag.-1", "docker.io/library/repo:_Tag.-1"),
    ],
)
def test_normalization(text, canonical):
    assert parse(text).string() == canonical


def test_fields_and_forms():
    ref = parse("busybox:1.36@" + D)
    assert ref == Reference("docker.io", "library/busybox", "1.36", D)
    assert ref.name == "docker.io/library/busybox"
    assert ref.familiar() == "busybox:1.36@" + D
    assert ref.object == D  # pulled by digest when there is one
    assert str(ref) == ref.string()
    assert parse("user/repo:x").familiar() == "user/repo:x"
    assert parse("host:5000/a/b").familiar() == "host:5000/a/b:latest"
    assert parse("busybox").object == "latest"
    assert parse("busybox").with_digest(D).string() == "docker.io/library/busybox@" + D


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        (" busybox", "whitespace"),
        ("Busybox", "lowercase"),
        ("docker.io/Library/busybox", "lowercase"),
        ("busybox:", "invalid tag"),
        ("busybox:-tag", "invalid tag"),
        ("busybox:.tag", "invalid tag"),
        ("busybox:" + "t" * 129, "invalid tag"),
        ("busybox:ta g", "invalid tag"),
        ("busybox@sha256:abc", "64"),
        ("busybox@sha256:" + "A" * 64, "64"),
        ("busybox@md5:" + "a" * 32, "unsupported digest algorithm"),
        ("busybox@", "invalid digest"),
        ("busybox@@" + D, "invalid digest"),
        ("a//b", "empty path component"),
        ("host:5000/", "empty path component"),
        ("a/b/", "empty path component"),
        ("-busybox", "invalid path component"),
        ("busy..box", "invalid path component"),
        ("busy___box", "invalid path component"),
        ("busybox-", "invalid path component"),
        ("ho_st.com/a", "invalid registry domain"),
        ("host:port/a", "invalid registry domain"),
        (":tag", "missing repository name"),
        ("0123456789abcdef" * 4, "image ID"),
        ("example.com/" + "a" * 244, "longer than 255"),
        ("http://example.com/a", "invalid"),
    ],
)
def test_malformed(text, problem):
    with pytest.raises(ReferenceError) as info:
        parse(text)
    message = str(info.value)
    assert problem in message
    assert repr(text) in message  # the message names the reference
    assert isinstance(info.value, ValueError)


def test_name_of_exactly_255_characters_is_accepted():
    name = "example.com/" + "a" * (255 - len("example.com/"))
    assert parse(name).name == name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sha256:" + "a" * 64, True),
        ("sha256:abc", True),
        ("a" * 64, True),
        ("sha256:", False),
        ("sha256:XYZ", False),
        ("abc123", False),  # could be an image name
        ("a" * 63, False),
        ("busybox", False),
        ("sha512:" + "a" * 64, False),
    ],
)
def test_image_id_like(text, expected):
    assert is_image_id_like(text) is expected

"""Credentials (CRI AuthConfig, docker config.json), challenges and the token cache."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.parse

import httpx
import pytest

from cri.images.auth import (
    AuthFileError,
    Challenge,
    Credentials,
    TokenCache,
    TokenError,
    from_auth_file,
    from_cri,
    parse_challenges,
    pick_challenge,
)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- from_cri


def test_from_cri_fields():
    assert from_cri() is None
    assert from_cri(username="u", password="p") == Credentials("u", "p")
    assert from_cri(auth=b64("alice:s3:cret")) == Credentials("alice", "s3:cret")
    assert from_cri(username="x", auth=b64("alice:pw")) == Credentials("alice", "pw")  # auth wins
    assert from_cri(identity_token="id") == Credentials(identity_token="id")
    assert from_cri(registry_token="tok", server_address="r.example") == Credentials(registry_token="tok")
    assert from_cri(server_address="r.example") is None


@pytest.mark.parametrize("bad", ["not base64!", b64("no-colon"), b64(":nouser"), "//8="])
def test_from_cri_malformed_auth_names_the_field(bad):
    with pytest.raises(ValueError, match=r"^auth: "):
        from_cri(auth=bad)


def test_credentials_repr_hides_secrets():
    text = repr(Credentials("u", "hunter2", "idtok", "regtok"))
    assert "hunter2" not in text
    assert "idtok" not in text
    assert "regtok" not in text


# -- auth file


def write(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


def test_auth_file_missing_or_unset_means_none(tmp_path):
    assert from_auth_file(tmp_path / "nope.json", "r.example") is None
    assert from_auth_file("", "r.example") is None


@pytest.mark.parametrize(
    "key",
    [
        "r.example:5000",
        "https://r.example:5000",
        "http://r.example:5000",
        "https://r.example:5000/v1/",
        "R.Example:5000",
    ],
)
def test_auth_file_key_forms(tmp_path, key):
    path = write(tmp_path, {"auths": {key: {"auth": b64("u:p")}}})
    assert from_auth_file(path, "r.example:5000") == Credentials("u", "p")
    assert from_auth_file(path, "r.example") is None  # the port is part of the key


def test_auth_file_docker_hub_aliases(tmp_path):
    path = write(tmp_path, {"auths": {"https://index.docker.io/v1/": {"auth": b64("hub:pw")}}})
    assert from_auth_file(path, "docker.io", "library/busybox") == Credentials("hub", "pw")
    assert from_auth_file(path, "registry-1.docker.io") == Credentials("hub", "pw")


def test_auth_file_username_password_and_identity_token(tmp_path):
    path = write(
        tmp_path,
        {
            "auths": {
                "a.example": {"username": "ua", "password": "pa"},
                "b.example": {"identitytoken": "refresh-me", "auth": b64("<token>:")},
                "c.example": {},
            },
            "credsStore": "desktop",
        },
    )
    assert from_auth_file(path, "a.example") == Credentials("ua", "pa")
    assert from_auth_file(path, "b.example") == Credentials("<token>", "", "refresh-me")
    assert from_auth_file(path, "c.example") is None


def test_auth_file_most_specific_namespace_wins(tmp_path):
    path = write(
        tmp_path,
        {
            "auths": {
                "r.example": {"auth": b64("host:1")},
                "r.example/team": {"auth": b64("team:2")},
                "r.example/team/app": {"auth": b64("app:3")},
            }
        },
    )
    assert from_auth_file(path, "r.example", "team/app") == Credentials("app", "3")
    assert from_auth_file(path, "r.example", "team/other") == Credentials("team", "2")
    assert from_auth_file(path, "r.example", "teamx/app") == Credentials("host", "1")
    assert from_auth_file(path, "r.example") == Credentials("host", "1")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ({"auths": []}, "'auths'"),
        ({"auths": {"r.example": "x"}}, "must be an object"),
        ({"auths": {"r.example": {"auth": 5}}}, "auth must be a string"),
        ({"auths": {"r.example": {"auth": "%%%"}}}, "base64"),
    ],
)
def test_auth_file_malformed_names_the_file(tmp_path, content, problem):
    path = write(tmp_path, content)
    with pytest.raises(AuthFileError) as info:
        from_auth_file(path, "r.example")
    assert str(path) in str(info.value)
    assert problem in str(info.value)


def test_auth_file_unreadable_names_the_file(tmp_path):
    path = tmp_path / "dir.json"
    path.mkdir()
    with pytest.raises(AuthFileError, match=str(path)):
        from_auth_file(path, "r.example")


def test_empty_auth_file_is_no_credentials(tmp_path):
    assert from_auth_file(write(tmp_path, ""), "r.example") is None


# -- challenges


def test_parse_bearer_with_commas_inside_quotes():
    header = (
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:team/app:pull,push"'
    )
    [challenge] = parse_challenges(header)
    assert challenge.scheme == "bearer"
    assert challenge.realm == "https://auth.example/token"
    assert challenge.service == "registry.example"
    assert challenge.scope == "repository:team/app:pull,push"


def test_parse_several_challenges_spaces_escapes_and_unquoted():
    header = 'Basic realm="Registry \\"x\\"", Bearer  realm = https://a.example/t , service=svc,Error=x'
    basic, bearer = parse_challenges(header)
    assert basic == Challenge("basic", {"realm": 'Registry "x"'})
    assert bearer.realm == "https://a.example/t"
    assert bearer.service == "svc"
    assert bearer.params["error"] == "x"
    assert pick_challenge([basic, bearer]) is bearer
    assert pick_challenge([basic]) is basic
    assert pick_challenge(parse_challenges("Negotiate abc")) is None


def test_parse_multiple_header_values():
    challenges = parse_challenges(['Basic realm="r"', 'Bearer realm="https://a/t"'])
    assert [c.scheme for c in challenges] == ["basic", "bearer"]


# -- token cache


class TokenServer:
    def __init__(self, answer=None, status=200):
        self.requests: list[httpx.Request] = []
        self.answer = answer if answer is not None else {"token": "t1", "expires_in": 300}
        self.status = status

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answer(len(self.requests)) if callable(self.answer) else self.answer
        return httpx.Response(self.status, json=answer)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


CHALLENGE = Challenge("bearer", {"realm": "https://auth.example/token", "service": "reg"})
SCOPES = ["repository:library/busybox:pull"]


def fetch(cache, server, creds=None, *, challenge=CHALLENGE, scopes=SCOPES, refresh=False):
    async def run():
        async with httpx.AsyncClient(transport=httpx.MockTransport(server)) as client:
            return await cache.token(client, challenge, scopes, creds, refresh=refresh)

    return asyncio.run(run())


def test_token_fetch_get_with_basic_auth_and_params():
    server = TokenServer()
    cache = TokenCache()
    assert fetch(cache, server, Credentials("u", "p")) == "t1"
    [request] = server.requests
    assert request.method == "GET"
    query = urllib.parse.parse_qs(request.url.query.decode())
    assert query == {"service": ["reg"], "scope": ["repository:library/busybox:pull"]}
    assert request.headers["authorization"] == "Basic " + b64("u:p")


def test_anonymous_token_fetch_sends_no_authorization():
    server = TokenServer()
    fetch(TokenCache(), server)
    assert "authorization" not in server.requests[0].headers


def test_token_cached_until_expiry_minus_margin():
    clock = Clock()
    server = TokenServer(lambda n: {"token": f"t{n}", "expires_in": 60})
    cache = TokenCache(margin=10, clock=clock)
    assert fetch(cache, server) == "t1"
    clock.now += 49
    assert fetch(cache, server) == "t1"
    assert cache.fetches == 1
    clock.now += 2  # 51s: inside the 10s margin before expiry
    assert fetch(cache, server) == "t2"
    assert cache.fetches == 2


def test_token_default_lifetime_is_60s_and_access_token_is_accepted():
    clock = Clock()
    server = TokenServer(lambda n: {"access_token": f"a{n}"})
    cache = TokenCache(margin=5, clock=clock)
    assert fetch(cache, server) == "a1"
    clock.now += 54
    assert fetch(cache, server) == "a1"
    clock.now += 2
    assert fetch(cache, server) == "a2"


def test_issued_at_shortens_the_lifetime():
    clock = Clock()
    server = TokenServer(
        lambda n: {"token": f"t{n}", "expires_in": 100, "issued_at": "2024-01-01T00:00:00Z"},
    )
    # The token is already 80s old by our wall clock: 20s left, minus the margin (capped at half).
    cache = TokenCache(margin=10, clock=clock, wall_clock=lambda: 1704067280.0)
    fetch(cache, server)
    clock.now += 11
    fetch(cache, server)
    assert cache.fetches == 2


def test_tokens_are_per_scope_and_per_identity():
    server = TokenServer(lambda n: {"token": f"t{n}"})
    cache = TokenCache()
    fetch(cache, server)
    fetch(cache, server, scopes=["repository:other:pull"])
    fetch(cache, server, Credentials("u", "p"))
    fetch(cache, server, Credentials("u", "other"))
    assert cache.fetches == 4
    fetch(cache, server, Credentials("u", "p"))
    assert cache.fetches == 4
    fetch(cache, server, Credentials("u", "p"), refresh=True)
    assert cache.fetches == 5


def test_registry_token_is_used_directly():
    server = TokenServer()
    assert fetch(TokenCache(), server, Credentials(registry_token="kubelet-token")) == "kubelet-token"
    assert server.requests == []


def test_identity_token_uses_the_oauth_refresh_grant():
    server = TokenServer({"access_token": "oauth", "expires_in": 120})
    assert fetch(TokenCache(), server, Credentials("<token>", "", identity_token="refresh-me")) == "oauth"
    [request] = server.requests
    assert request.method == "POST"
    form = urllib.parse.parse_qs(request.content.decode())
    assert form["grant_type"] == ["refresh_token"]
    assert form["refresh_token"] == ["refresh-me"]
    assert form["service"] == ["reg"]
    assert form["scope"] == SCOPES
    assert form["client_id"] == ["criopy"]


@pytest.mark.parametrize(
    ("status", "answer", "problem"),
    [(401, {}, "answered 401"), (200, {"nothing": 1}, "no token"), (200, ["x"], "JSON object")],
)
def test_token_server_failures(status, answer, problem):
    server = TokenServer(answer, status=status)
    with pytest.raises(TokenError, match=problem) as info:
        fetch(TokenCache(), server)
    if status != 200:
        assert info.value.status == status


def test_challenge_without_realm():
    with pytest.raises(TokenError, match="realm"):
        fetch(TokenCache(), TokenServer(), challenge=Challenge("bearer", {"service": "x"}))

"""Secrets and access settings, without a stack: the admin token a production service accepts,
participant codes (the participants' only credential), and the browser-origin policy."""

from __future__ import annotations

import base64
import collections
import math
import secrets
import string

import pydantic
import pytest

from services.common.seats import KEY_LENGTH, new_key, well_formed
from services.common.settings import CommonSettings
from services.gateway.domain import OriginPolicy, origin_of
from services.gateway.settings import GatewaySettings
from services.store.domain import CreateSession, layout_session, new_participant_code
from services.store.settings import StoreSettings

STRONG = "Zx9-kq2LmPw7rT4vB8nY"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "changeme",
        "CHANGEME",
        "change-me",
        "secret",
        "admin",
        "token",
        "Zx9-kq2LmPw7rT4",  # 15 characters
        " " * 32,
        "\t\n" * 10,
        "changemechangeme",
        "SecretSecretSecretSecret",
        "admin" * 4,
        f" {STRONG}",
        f"{STRONG}\n",  # a secret file's newline
        f"{STRONG} with spaces",
        f"{STRONG}é",
        f"{STRONG}\x00",
    ],
)
def test_production_refuses_weak_tokens(token: str) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        CommonSettings(env="production", admin_token=token)
    message = str(refused.value)
    assert "CANOPY_ADMIN_TOKEN" in message
    if len(token.strip()) >= 12:
        assert token.strip() not in message  # the refusal never prints the token


@pytest.mark.parametrize(
    "token",
    # A readable phrase of 16 characters with 8 different ones is accepted; "x" * 32 is not
    # (tests/unit: fewer than 8 different characters).
    [STRONG, secrets.token_urlsafe(24), secrets.token_hex(16), "short-but-random"],
)
def test_production_accepts_random_tokens(token: str) -> None:
    settings = CommonSettings(env="production", admin_token=token)
    assert settings.admin_token.get_secret_value() == token
    assert token not in repr(settings) and token not in str(settings.model_dump())


def test_development_needs_a_token_too_but_any_will_do() -> None:
    assert CommonSettings(admin_token="dev").env == "development"
    with pytest.raises(pydantic.ValidationError):
        CommonSettings(admin_token="")
    with pytest.raises(pydantic.ValidationError):
        CommonSettings(admin_token="dev ")  # HTTP strips it: it could never match


def test_a_refused_setting_never_prints_the_token() -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        StoreSettings(admin_token=f"{STRONG}-secret", shards=0)
    assert "shards" in str(refused.value)
    assert STRONG not in str(refused.value)


def test_participant_codes_are_long_random_and_unique() -> None:
    codes = [new_participant_code() for _ in range(100_000)]
    assert len(set(codes)) == len(codes)
    assert all(len(code) == 20 and set(code) <= set(string.hexdigits.lower()) for code in codes)
    bits = 4 * len(codes[0])
    assert bits >= 64
    # Every hex digit equally likely at every position: a chi-square over all of them.
    counts = collections.Counter("".join(codes))
    expected = len(codes) * 20 / 16
    chi2 = sum((counts[d] - expected) ** 2 / expected for d in "0123456789abcdef")
    assert chi2 < 50, counts  # 15 degrees of freedom: p < 1e-5 for 50
    # Position by position, no digit is stuck (a broken generator padding or repeating).
    for position in range(20):
        seen = collections.Counter(code[position] for code in codes[:20_000])
        assert len(seen) == 16 and max(seen.values()) < 20_000 / 16 * 1.2


def test_codes_come_from_the_os_random_source(monkeypatch: pytest.MonkeyPatch) -> None:
    """Codes come from `secrets` (os.urandom), never from a seedable `random`."""
    calls: list[int] = []
    real = secrets.token_hex

    def spy(nbytes: int | None = None) -> str:
        calls.append(nbytes or 32)
        return real(nbytes)

    monkeypatch.setattr(secrets, "token_hex", spy)
    new_participant_code()
    assert calls and calls[0] * 8 >= 64


def test_a_session_layout_uses_fresh_codes_everywhere() -> None:
    request = CreateSession(
        experiment="decisions", num_participants=1000, group_size=10, period_length=1
    )
    secret = b"k" * 32
    layout = layout_session(request, "http://127.0.0.1:8000", secret)
    codes = [p["_id"] for p in layout["participants"]]
    keys = [p["key"] for p in layout["participants"]]
    assert len(set(codes)) == 1000 and len(set(keys)) == 1000
    # The link is the key's (PROTOCOL v2), never the code's; a code never passes as a key.
    assert all(p["url"] == f"http://127.0.0.1:8000/p/{p['key']}" for p in layout["participants"])
    assert all(well_formed(key, secret) and len(key) == KEY_LENGTH for key in keys)
    assert not any(well_formed(code, secret) for code in codes)
    assert not any(well_formed(key, b"x" * 32) for key in keys)  # another deployment's
    groups = {g["_id"] for g in layout["groups"]}
    assert len(groups) == 100 and not groups & set(codes)
    # Seat keys: 128 random bits each (the first 16 of their 24 bytes), base64url.
    raw = b"".join(base64.urlsafe_b64decode(k + "=" * (-len(k) % 4))[:16] for k in keys)
    ones = sum(bin(byte).count("1") for byte in raw)
    assert abs(ones / (len(raw) * 8) - 0.5) < 0.01
    # Entropy of the whole session's codes: ~4 bits per hex digit.
    counts = collections.Counter("".join(codes))
    entropy = -sum(n / 20_000 * math.log2(n / 20_000) for n in counts.values())
    assert entropy > 3.99


@pytest.mark.parametrize(
    ("url", "origin"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
        ("HTTP://Lab.Example.ORG:80/p/x", "http://lab.example.org"),
        ("https://lab.example.org:443", "https://lab.example.org"),
        ("https://lab.example.org:8443", "https://lab.example.org:8443"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("null", None),
        ("file://", None),
        ("ftp://x", None),
        ("http://x:99999", None),
        ("", None),
    ],
)
def test_origin_of(url: str, origin: str | None) -> None:
    assert origin_of(url) == origin


def test_default_origin_policy_is_the_public_url() -> None:
    policy = GatewaySettings(admin_token="t", public_url="https://lab.example.org/").origin_policy()
    assert policy.allows(None)  # scripts and bots send no Origin
    assert policy.allows("https://lab.example.org")
    assert policy.allows("https://LAB.example.org:443")
    for foreign in [
        "https://evil.example",
        "http://lab.example.org",  # another scheme is another origin
        "https://lab.example.org:8443",
        "https://lab.example.org.evil.example",
        "null",
        "",
        "garbage",
    ]:
        assert not policy.allows(foreign), foreign


def test_origin_policy_from_the_setting() -> None:
    policy = OriginPolicy.from_setting(" https://a.example , http://b.example:8080 ", "http://x")
    assert policy.allows("https://a.example") and policy.allows("http://b.example:8080")
    assert not policy.allows("http://x")  # the list replaces the default
    assert OriginPolicy.from_setting("*", "http://x").allows("https://anything.example")
    assert OriginPolicy.from_setting("https://a.example,*", "http://x").allow_all


def test_a_malformed_origin_setting_stops_the_gateway() -> None:
    with pytest.raises(pydantic.ValidationError):
        GatewaySettings(admin_token="t", allowed_origins="lab.example.org")


@pytest.mark.parametrize(
    "key",
    ["", "a" * 65, "../internal", "a/b", "a?b", "a#b", "a%2Fb", "a b", "é", "a\x00", "a" * 32],
)
def test_impossible_keys_are_refused_before_any_lookup(key: str) -> None:
    assert not well_formed(key, b"k" * 32)


def test_a_key_with_one_character_changed_is_refused() -> None:
    secret = b"k" * 32
    key = new_key(secret)
    for index in range(len(key)):
        other = "A" if key[index] != "A" else "B"
        assert not well_formed(key[:index] + other + key[index + 1 :], secret)

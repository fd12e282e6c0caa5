"""SASL decoding shared by POP3 and SMTP AUTH (gateway/proto/sasl.py), with property tests:
whatever a client sends, the decoders answer with credentials or a SaslError, nothing else."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proto import sasl


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def test_plain() -> None:
    credentials = sasl.decode_plain(b64(b"\0alice#phone\0s3cret p\xc3\xa4ss"))

    assert credentials == sasl.Credentials("alice#phone", "s3cret päss")
    assert "s3cret" not in repr(credentials)


def test_plain_with_the_user_as_authorization_identity() -> None:
    assert sasl.decode_plain(b64(b"alice\0alice\0pw")).user == "alice"


@pytest.mark.parametrize(
    ("response", "error"),
    [
        (b"*", sasl.Cancelled),
        (b"=", sasl.MalformedPlain),  # the empty response holds no credentials
        (b"not base64!", sasl.InvalidBase64),
        (b"YW=Jj", sasl.InvalidBase64),
        (b64(b"alice\0pw"), sasl.MalformedPlain),
        (b64(b"\0alice\0pw\0more"), sasl.MalformedPlain),
        (b64(b"\0alice\xff\0pw"), sasl.NotUtf8),
        (b64(b"bob\0alice\0pw"), sasl.ForeignIdentity),
    ],
)
def test_plain_refusals(response: bytes, error: type[sasl.SaslError]) -> None:
    with pytest.raises(error) as caught:
        sasl.decode_plain(response)
    assert str(caught.value) == error.text


def test_login_text() -> None:
    assert sasl.decode_text(b64("jürgen".encode())) == "jürgen"
    assert sasl.decode_text("=") == ""
    with pytest.raises(sasl.NotUtf8):
        sasl.decode_text(b64(b"\xff"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.binary(max_size=150).map(b64)))
def test_any_response_gives_credentials_or_a_sasl_error(response: bytes) -> None:
    try:
        credentials = sasl.decode_plain(response)
    except sasl.SaslError as e:
        assert e.text
    else:
        assert isinstance(credentials.user, str) and isinstance(credentials.password, str)
        assert "\0" not in credentials.user + credentials.password
    try:
        sasl.decode_text(response)
    except sasl.SaslError as e:
        assert e.text


@settings(max_examples=200, deadline=None)
@given(
    st.text(
        alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
    ),
    st.text(
        alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=40
    ),
    st.sampled_from(["", "same"]),
)
def test_plain_round_trip(user: str, password: str, authzid: str) -> None:
    authz = user if authzid == "same" else ""
    message = f"{authz}\0{user}\0{password}".encode()

    assert sasl.decode_plain(b64(message)) == sasl.Credentials(user, password)
    assert sasl.decode_plain(b64(message).decode()) == sasl.Credentials(user, password)

"""Fixtures of the OAuth tests; a test module loads them with
``pytest_plugins = ("tests.support.oauth_fixtures",)``.

``oauth_provider``
    a running :class:`~tests.support.oauth_provider.OAuthProvider` (client ``popgate-test``,
    no client secret, interval 0, access tokens live an hour), stopped at test end. Make one
    with other settings with ``OAuthProvider(...)`` as a context manager.

Helpers, in tests/support/oauth_provider.py: ``oauth2_section(provider, token_dir, key)`` is
an ``[oauth2]`` section for ``start_gateway(oauth2=...)``; ``store_grant(provider, token_dir,
key, user, device_password)`` stores a grant as ``popgate oauth login`` would, without the
device flow.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.oauth_provider import OAuthProvider


@pytest.fixture
def oauth_provider() -> Iterator[OAuthProvider]:
    """A running :class:`OAuthProvider` (client ``popgate-test``, no secret, interval 0),
    stopped at test end."""
    with OAuthProvider() as provider:
        yield provider

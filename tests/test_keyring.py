"""Credentials (server/keyring.py): derived from the service key, one role of one session each,
checked in constant time; the token only creates sessions."""

from __future__ import annotations

import pytest
from sessionkit import KEYRING

from server.keyring import CREATE, Credential, Grant, Keyring
from server.wire import Role

pytestmark = pytest.mark.timeout(30)


def test_credentials_are_derived_from_the_key_and_checked_per_session_and_role() -> None:
    src, tgt = KEYRING.new_session(b"\x07" * 16)
    assert src.session == tgt.session and len(src.session) == 22 and (src.role, tgt.role) == (Role.SOURCE, Role.TARGET)
    assert src.secret != tgt.secret and len(src.secret) == 32
    assert Credential.parse(f"  {src}\n") == src and str(src).startswith(f"rm1.{src.session}.source.")
    assert src.secret.hex() not in repr(src) and str(src).split(".")[-1] not in repr(src)
    other_key = Keyring(b"K" * 32, "the-token")
    assert other_key.credential(src.session, Role.SOURCE) != src          # the key is what makes it
    path = f"/sessions/{src.session}"
    assert KEYRING.authorize(path, f"Bearer {src}") == Grant(src.session, Role.SOURCE)
    assert KEYRING.authorize(path, f"bearer {tgt}") == Grant(src.session, Role.TARGET)
    forged = Credential(src.session, Role.TARGET, bytes(32))
    elsewhere = KEYRING.credential("someone-else", Role.SOURCE)
    for header in (f"Bearer {forged}", "Bearer the-token", f"Bearer {elsewhere}", f"Basic {src}", str(src), "",
                   "Bearer ", f"Bearer {str(src)[:-1]}", f"Bearer {src}x", "Bearer \udcff\ud800"):
        assert KEYRING.authorize(path, header) is None, header
    assert KEYRING.authorize("/sessions", "Bearer the-token") == CREATE
    for header in (f"Bearer {src}", "Bearer the-token2", "Bearer \ud800"):
        assert KEYRING.authorize("/sessions", header) is None, header
    assert Keyring(b"k" * 32, None).authorize("/sessions", "Bearer the-token") is None
    with pytest.raises(ValueError, match="at least 32"):
        Keyring(b"short", "t")

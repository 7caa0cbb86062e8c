from __future__ import annotations

from cryptography.fernet import Fernet

from kis_safe_token.crypto import Sealer, derive_key, fingerprint, key_id
from kis_safe_token.token import Token

TOKEN = Token("tok-" + "x" * 60, 2e9)


def test_key_depends_on_secret_and_app_key() -> None:
    assert derive_key("k1", "s1") != derive_key("k1", "s2")
    assert derive_key("k1", "s1") != derive_key("k2", "s1")
    Fernet(derive_key("k1", "s1"))  # a valid Fernet key


def test_fingerprint_is_keyed_by_the_secret() -> None:
    assert fingerprint("k", "s1") != fingerprint("k", "s2")
    assert "s1" not in fingerprint("k", "s1")
    assert len(key_id("k")) == 12


def test_sealed_token_opens_only_with_the_same_credentials() -> None:
    sealed = Sealer("k", "s").seal(TOKEN)
    assert TOKEN.access_token.encode() not in sealed
    assert Sealer("k", "s").open(sealed) == TOKEN
    assert Sealer("k", "wrong").open(sealed) is None
    assert Sealer("other", "s").open(sealed) is None
    assert Sealer("k", "s").open(sealed[:-5]) is None
    assert Sealer("k", "s").open(b"garbage") is None


def test_explicit_keys_rotate_and_fingerprint_still_guards() -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    sealed_old = Sealer("k", "s", [old]).seal(TOKEN)
    assert Sealer("k", "s", [new, old]).open(sealed_old) == TOKEN
    # Explicit key decrypts whatever the secret, so the fingerprint decides:
    assert Sealer("k", "wrong", [old]).open(sealed_old) is None
    # Entries sealed with the derived key stay readable once explicit keys are configured.
    assert Sealer("k", "s", [new]).open(Sealer("k", "s").seal(TOKEN)) == TOKEN

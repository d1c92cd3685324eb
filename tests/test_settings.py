"""Settings that touch the disk: the secret key a new data directory gets."""

from __future__ import annotations

from pathlib import Path

import pytest

from dashboard import settings


def test_it_keeps_the_key_of_a_process_that_wrote_it_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several processes start on a new data directory at once (web workers, bridges): one
    of them writes the key between another's look and its own write. That other one must
    use the key on disk, not fail (it did: `FileExistsError` in a two-worker test)."""
    data_dir = tmp_path / "data"
    real = settings.secrets.token_urlsafe

    def meanwhile_another_process_wins(size: int) -> str:
        (data_dir / "secret_key").write_text("the-first-process-key-" + "x" * 40)
        return real(size)

    monkeypatch.setattr(settings.secrets, "token_urlsafe", meanwhile_another_process_wins)

    assert settings._persistent_secret_key(data_dir) == "the-first-process-key-" + "x" * 40
    assert sorted(p.name for p in data_dir.iterdir()) == ["secret_key"]  # no draft left


def test_it_creates_a_key_only_its_owner_can_read(tmp_path: Path) -> None:
    key = settings._persistent_secret_key(tmp_path / "data")
    assert len(key) >= 50
    assert (tmp_path / "data" / "secret_key").stat().st_mode & 0o777 == 0o600
    assert settings._persistent_secret_key(tmp_path / "data") == key

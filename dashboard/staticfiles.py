"""Static files storage: WhiteNoise's compressed, content-hashed files, forgiving before
`collectstatic` has run (a fresh checkout, the test suite): then names stay as they are and
WhiteNoise serves them from the app directories (WHITENOISE_USE_FINDERS) with a short cache."""

from __future__ import annotations

from typing import Any

from whitenoise.storage import (
    CompressedManifestStaticFilesStorage,
)


class Storage(CompressedManifestStaticFilesStorage):  # type: ignore[misc]
    manifest_strict = False

    def stored_name(self, name: str) -> str:
        try:
            return str(super().stored_name(name))
        except ValueError:  # not collected yet: no manifest and no file to hash
            return name

    def url(self, name: Any, force: bool = False) -> str:
        return str(super().url(name, force))

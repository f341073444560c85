"""The process environment, read in this one place.

`config.load_settings` validates it into `Settings`. The entry points also read it here before
Settings exist, for the one thing that must not wait even for that: starting the model
prefetch at the first instant of init (`model_source.prefetch.start_early`), or llama-server's
child (`engine.llama_server.early`); `path_of_uri` is how all of them, and the model source,
read MODEL_URI as a local path.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import unquote, urlparse

DEFAULT_MODEL_PATH = "/opt/models/model.gguf"


def current(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ`, by default the process environment."""
    return dict(os.environ if environ is None else environ)


def path_of_uri(uri: str) -> Path | None:
    """MODEL_URI as a local path (a plain path or `file://` URI); None for another scheme
    (s3://, https://). A one-letter scheme is a Windows drive: a path."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme and len(parsed.scheme) > 1:
        return None
    return Path(uri)

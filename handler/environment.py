"""The process environment, read in this one place.

`config.load_settings` validates it into `Settings`. The entry points also read it here before
Settings exist, for the one thing that must not wait even for that: starting the model
prefetch at the first instant of init (`model_source.prefetch.start_early`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

DEFAULT_MODEL_PATH = "/opt/models/model.gguf"


def current(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `environ`, by default the process environment."""
    return dict(os.environ if environ is None else environ)

"""Turns MODEL_URI into a verified local GGUF file: in place when local, downloaded from S3.

Nothing here hands a partial or unverified file to the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from handler.model_source.local_file import resolve_local_file
from handler.model_source.resolved import Progress, ResolvedModel

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings


def resolve_model(settings: Settings, progress: Progress | None = None) -> ResolvedModel:
    """Return a verified local file for `settings.model_uri`, downloading it first if remote.

    `progress(bytes_done, bytes_total)` is called as a download advances.
    """
    if settings.model_uri.startswith("s3://"):
        # Imported here so that only an s3:// model pays for boto3 on the init path.
        from handler.model_source.s3_download import fetch_s3_model

        return fetch_s3_model(settings, progress)
    return resolve_local_file(settings)

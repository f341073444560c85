"""The model source: MODEL_URI in, a verified local GGUF file out (see `resolve_model`).

Importing the package is cheap: boto3 and the S3 modules load only when an s3:// model is resolved.
"""

from handler.model_source.gguf import check_gguf_file
from handler.model_source.local_file import local_path, sha256_file
from handler.model_source.resolve import resolve_model
from handler.model_source.resolved import ModelSourceError, Progress, ResolvedModel

__all__ = [
    "ModelSourceError",
    "Progress",
    "ResolvedModel",
    "check_gguf_file",
    "local_path",
    "resolve_model",
    "sha256_file",
]

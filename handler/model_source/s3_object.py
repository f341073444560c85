"""The S3 object a model URI names: where it is (`s3://bucket/key`) and what HeadObject said."""

from __future__ import annotations

from dataclasses import dataclass

from handler.model_source.resolved import ModelSourceError


@dataclass(frozen=True)
class S3Location:
    """A parsed `s3://bucket/key`."""

    bucket: str
    key: str

    @property
    def uri(self) -> str:
        """The URI as users wrote it."""
        return f"s3://{self.bucket}/{self.key}"


@dataclass(frozen=True)
class ObjectInfo:
    """What HeadObject says about the model object."""

    size: int
    etag: str
    version_id: str | None
    checksum_sha256: str | None  # base64, any "-N" part-count suffix removed
    composite: bool  # checksum of part checksums (multipart upload), not of the bytes


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/key` as an S3Location; anything else is a configuration error."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key or key.endswith("/"):
        raise ModelSourceError(f"model {uri}: expected s3://bucket/key")
    return S3Location(bucket, key)

"""The boto3 S3 client, tuned from Settings, and the HeadObject that starts every fetch.

S3's errors become one line that says what to fix (access denied, missing bucket or object).
boto3 is imported inside the functions, so a pinned cached copy is reused without paying for it.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from handler.model_source.resolved import ModelSourceError
from handler.model_source.s3_object import ObjectInfo, S3Location

if TYPE_CHECKING:  # annotations only
    from handler.config import Settings

# A stalled connection should fail over to a retry well before Lambda's timeout, not after
# botocore's 60 s default.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30


def make_client(settings: Settings) -> Any:
    """An S3 client with retries, timeouts and a connection per concurrent part."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"total_max_attempts": settings.s3_max_attempts, "mode": "standard"},
        # One pooled connection per concurrent part; botocore's default pool (10) would
        # make the extra transfer threads queue for a connection.
        max_pool_connections=settings.s3_concurrency,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        # Custom endpoints (MinIO, moto, VPC endpoints by IP) rarely resolve bucket subdomains.
        s3={"addressing_style": "path"} if settings.s3_endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    )


def head_object(client: Any, location: S3Location) -> ObjectInfo:
    """HeadObject with checksums; a failure is a one-line ModelSourceError."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        head = client.head_object(Bucket=location.bucket, Key=location.key, ChecksumMode="ENABLED")
    except ClientError as exc:
        raise _client_error(client, location, exc) from None
    except BotoCoreError as exc:
        raise ModelSourceError(f"model {location.uri}: cannot reach S3 ({exc})") from None
    checksum = head.get("ChecksumSHA256")
    etag = head.get("ETag", "")
    # S3 computes SHA-256 over the whole object only for single-part uploads; a multipart
    # upload (ETag "...-N") carries a checksum of its parts' checksums instead.
    composite = head.get("ChecksumType") == "COMPOSITE" or bool(re.search(r"-\d+\"?$", etag))
    return ObjectInfo(
        size=int(head["ContentLength"]),
        etag=etag,
        version_id=head.get("VersionId"),
        checksum_sha256=checksum.split("-")[0] if checksum else None,
        composite=composite,
    )


def _client_error(client: Any, location: S3Location, exc: Any) -> ModelSourceError:
    from botocore.exceptions import BotoCoreError, ClientError

    uri = location.uri
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code", "")
    if status == 403 or code == "AccessDenied":
        return ModelSourceError(
            f"model {uri}: access denied (the role needs s3:GetObject on the object, "
            "and s3:ListBucket to tell a missing object apart)"
        )
    if status == 404:
        # HEAD responses have no body, so a 404 does not say whether the bucket exists.
        try:
            client.head_bucket(Bucket=location.bucket)
        except ClientError as bucket_exc:
            if bucket_exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return ModelSourceError(f"model {uri}: bucket {location.bucket!r} does not exist")
        except BotoCoreError:
            pass  # the object is missing either way; the first answer is the one to report
        return ModelSourceError(f"model {uri}: object not found in bucket {location.bucket!r}")
    return ModelSourceError(f"model {uri}: S3 error {code or status}: {exc}")

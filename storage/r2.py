"""The R2 mirror: whole files in an S3-compatible bucket, keyed by their CID.

An object's key is ``prefix + str(cid)`` (base32 CIDv1, e.g. ``ipfs/bafy...``) and its
body is the file's bytes, so any S3 client can read it back. Every download is
re-imported while it streams and refused unless it hashes to the CID in its key, so a
tampered or truncated object is never taken for the file.

Client settings are the ones R2 needs (SigV4, path-style addressing, ``x-amz-checksum-*``
only where the API requires them, region ``auto``); they work against other S3 servers
too (moto and SeaweedFS in the tests). Connect and read timeouts plus bounded retries
mean a dead endpoint fails in seconds with :class:`MirrorUnavailable`, never hangs.

Errors::

    StorageError
    └── MirrorError          any other refusal from the server (names the S3 error code)
        ├── MirrorUnavailable  cannot reach the endpoint (down, refused, timed out)
        ├── MirrorAuthError    the server rejected our key or signature
        └── MirrorCorrupt      the object does not hash to its CID

Synchronous (boto3): the node calls it through ``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import builtins
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Final

import boto3
import botocore.exceptions as bx
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from teammesh.protocols.errors import (
    MirrorAuthError,
    MirrorCorrupt,
    MirrorError,
    MirrorUnavailable,
    StorageError,
)

from .cid import Cid
from .unixfs import FileImporter, over_limit

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import BinaryIO

    from botocore.response import StreamingBody
    from mypy_boto3_s3 import S3Client

__all__ = [
    "MirrorAuthError",
    "MirrorCorrupt",
    "MirrorError",
    "MirrorUnavailable",
    "R2Mirror",
]

logger = logging.getLogger(__name__)

MIB: Final = 1024 * 1024
PART_SIZE_BYTES: Final = 8 * MIB  # R2: parts >= 5 MiB, all equal but the last, <= 10,000
CONNECT_TIMEOUT_S: Final = 5.0
READ_TIMEOUT_S: Final = 60.0
CLIENT_ATTEMPTS: Final = 3  # botocore's own tries per request (standard retry mode)
TRANSFER_ATTEMPTS: Final = 3  # our tries of a whole upload / resumed download
BACKOFF_S: Final = 0.5  # first pause between our tries; doubles each time
DOWNLOAD_PIECE_BYTES: Final = 1 * MIB
_AUTH_CODES: Final = frozenset(
    # HEAD responses have no body, so only the status says it: "403".
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "403"}
)
_NOT_FOUND_CODES: Final = frozenset({"404", "NoSuchKey", "NotFound"})
_UNREACHABLE: Final = (
    bx.EndpointConnectionError,
    bx.ConnectTimeoutError,
    bx.ReadTimeoutError,
    bx.ConnectionClosedError,
    bx.ResponseStreamingError,
    # the server (or a proxy's idle timeout, or a restart) closed the connection in an
    # orderly way before the whole body: as transient as a reset, and resumed the same way
    bx.IncompleteReadError,
)


def _code(e: bx.ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", "?"))


class R2Mirror:
    """Files in one bucket of an S3-compatible server, named by CID.

    Args:
        endpoint_url: e.g. ``https://<account>.r2.cloudflarestorage.com``.
        bucket: the bucket's name.
        access_key: the S3 access key id.
        secret_key: the S3 secret.
        region: ``"auto"`` for R2; some servers want ``"us-east-1"``.
        prefix: prepended to every key.
        max_concurrency: parallel part uploads of one file.
        part_size: multipart part size in bytes (and the size above which uploads are
            multipart); at least 5 MiB.
    """

    def __init__(
        self,
        endpoint_url: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        region: str = "auto",
        prefix: str = "ipfs/",
        max_concurrency: int = 4,
        part_size: int = PART_SIZE_BYTES,
    ) -> None:
        if part_size < 5 * MIB:
            raise ValueError(f"part_size must be at least 5 MiB (R2's minimum), got {part_size}")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.prefix = prefix
        config = Config(
            region_name=region,
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"total_max_attempts": CLIENT_ATTEMPTS, "mode": "standard"},
            max_pool_connections=max_concurrency + 2,
        )
        self._s3: S3Client = boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            config=config,
        )
        self._transfer = TransferConfig(
            multipart_threshold=part_size,
            multipart_chunksize=part_size,
            max_concurrency=max_concurrency,
            use_threads=max_concurrency > 1,
        )

    def key(self, cid: Cid) -> str:
        """The object key of ``cid``."""
        return self.prefix + str(cid.to_v1())

    # -- errors -------------------------------------------------------------------------

    def _translate(self, e: Exception, what: str) -> MirrorError:
        """Turn a boto3/botocore error into one of ours, with a one-line message."""
        cause: BaseException = e
        if isinstance(e, S3UploadFailedError) and e.__cause__ is not None:
            cause = e.__cause__
        if isinstance(cause, _UNREACHABLE):
            return MirrorUnavailable(
                f"R2 mirror {self.endpoint_url} is unreachable ({what}): {cause}; "
                "check the endpoint URL and the network, uploads stay queued"
            )
        code = _code(cause) if isinstance(cause, bx.ClientError) else ""
        if not code and isinstance(e, S3UploadFailedError):
            code = next((c for c in _AUTH_CODES if c in str(e)), "")
        if code in _AUTH_CODES:
            return MirrorAuthError(
                f"R2 mirror {self.endpoint_url} rejected our credentials ({code}) on "
                f"{what}: check the access key id and secret"
            )
        if code == "NoSuchBucket":
            return MirrorError(
                f"bucket {self.bucket!r} does not exist at {self.endpoint_url}: "
                "create it (R2Mirror.ensure_bucket) or fix the bucket name"
            )
        return MirrorError(f"R2 mirror {self.endpoint_url} refused {what}: {e}")

    # -- queries ------------------------------------------------------------------------

    def size_of(self, cid: Cid) -> int | None:
        """The stored object's size, or ``None`` if there is no object for ``cid``.

        Raises:
            MirrorUnavailable, MirrorAuthError, MirrorError.
        """
        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self.key(cid))
        except bx.ClientError as e:
            if _code(e) in _NOT_FOUND_CODES:
                return None
            raise self._translate(e, f"HEAD {self.key(cid)}") from None
        except _UNREACHABLE as e:
            raise self._translate(e, f"HEAD {self.key(cid)}") from None
        return int(head["ContentLength"])

    def exists(self, cid: Cid) -> bool:
        """Whether the bucket holds an object for ``cid`` (its content is not checked)."""
        return self.size_of(cid) is not None

    def list(self) -> builtins.list[tuple[Cid, int]]:
        """Every ``(cid, size)`` under the prefix; keys that are not CIDs are skipped."""
        out: builtins.list[tuple[Cid, int]] = []
        try:
            for page in self._s3.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            ):
                for obj in page.get("Contents", []):
                    with contextlib.suppress(StorageError):
                        out.append((Cid.parse(obj["Key"][len(self.prefix) :]), obj["Size"]))
        except (bx.ClientError, *_UNREACHABLE) as e:
            raise self._translate(e, f"LIST {self.bucket}") from None
        return out

    def ensure_bucket(self) -> bool:
        """Create the bucket if it is missing; True if it was created."""
        try:
            self._s3.head_bucket(Bucket=self.bucket)
            return False
        except bx.ClientError as e:
            if _code(e) not in (*_NOT_FOUND_CODES, "NoSuchBucket"):
                raise self._translate(e, f"HEAD bucket {self.bucket}") from None
        except _UNREACHABLE as e:
            raise self._translate(e, f"HEAD bucket {self.bucket}") from None
        try:
            self._s3.create_bucket(Bucket=self.bucket)
        except bx.ClientError as e:
            if _code(e) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return False
            raise self._translate(e, f"CREATE bucket {self.bucket}") from None
        except _UNREACHABLE as e:
            raise self._translate(e, f"CREATE bucket {self.bucket}") from None
        return True

    # -- transfers ----------------------------------------------------------------------

    def upload_file(
        self,
        cid: Cid,
        path: Path,
        progress: Callable[[int], None] | None = None,
    ) -> bool:
        """Upload the file at ``path`` as the object for ``cid``; False if already there.

        An object of the same size under the key counts as done (the key is the file's
        hash, so only a tampered object differs, and downloads catch that). Files over
        ``part_size`` go up in parts, ``max_concurrency`` at a time. Connection failures
        are retried :data:`TRANSFER_ATTEMPTS` times with doubling pauses.
        ``progress(n)`` gets the bytes sent since its last call. The caller vouches
        that ``path`` is the file named by ``cid``.

        Raises:
            MirrorUnavailable, MirrorAuthError, MirrorError.
        """
        size = os.stat(path).st_size
        if self.size_of(cid) == size:
            return False
        key = self.key(cid)
        for attempt in range(TRANSFER_ATTEMPTS):
            try:
                self._s3.upload_file(
                    str(path), self.bucket, key, Config=self._transfer, Callback=progress
                )
                return True
            except (S3UploadFailedError, bx.ClientError, *_UNREACHABLE) as e:
                err = self._translate(e, f"upload of {key}")
                if not isinstance(err, MirrorUnavailable) or attempt + 1 == TRANSFER_ATTEMPTS:
                    raise err from None
                logger.warning("upload of %s failed, retrying: %s", key, err)
                time.sleep(BACKOFF_S * 2**attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    def download(
        self,
        cid: Cid,
        dest: Path,
        progress: Callable[[int], None] | None = None,
        *,
        max_bytes: int | None = None,
    ) -> int:
        """Download the object for ``cid`` to ``dest``, checking it hashes to ``cid``.

        Streams into ``dest + ".partial"`` while re-computing the UnixFS CID, and
        renames to ``dest`` only if it matches. A dropped connection resumes from the
        last byte received (a ranged GET pinned to the same ETag), up to
        :data:`TRANSFER_ATTEMPTS` times. ``progress(n)`` gets the bytes received since
        its last call. Returns the file size.

        ``max_bytes`` refuses an object that is (or turns out to be) larger.

        Raises:
            MirrorCorrupt: the object does not hash to ``cid`` (nothing is left behind).
            MirrorUnavailable, MirrorAuthError, MirrorError: also for a missing object.
            FileTooLarge: the object is over ``max_bytes`` (nothing is left behind).
        """
        dest = Path(dest)
        partial = dest.with_name(dest.name + ".partial")
        key = self.key(cid)
        imp = FileImporter(cid_version=cid.version, keep_blocks=False)
        etag: str | None = None
        done = False
        try:
            with open(partial, "wb") as f:
                for attempt in range(TRANSFER_ATTEMPTS):
                    try:
                        if imp.bytes_fed and etag:  # resume, and only from the same object
                            resp = self._s3.get_object(
                                Bucket=self.bucket,
                                Key=key,
                                Range=f"bytes={imp.bytes_fed}-",
                                IfMatch=etag,
                            )
                        elif imp.bytes_fed:
                            raise MirrorError(f"cannot resume {key}: the server sent no ETag")
                        else:
                            resp = self._s3.get_object(Bucket=self.bucket, Key=key)
                        etag = resp.get("ETag")
                        length = imp.bytes_fed + int(resp.get("ContentLength") or 0)
                        if max_bytes is not None and length > max_bytes:
                            resp["Body"].close()
                            raise over_limit(cid, length, max_bytes)
                        self._copy(resp["Body"], imp, f, progress, cid, max_bytes)
                        break
                    except (bx.ClientError, *_UNREACHABLE) as e:
                        err = self._translate(e, f"download of {key}")
                        if (
                            not isinstance(err, MirrorUnavailable)
                            or attempt + 1 == TRANSFER_ATTEMPTS
                        ):
                            raise err from None
                        logger.warning("download of %s broke off, resuming: %s", key, err)
                        time.sleep(BACKOFF_S * 2**attempt)
                got, _ = imp.finish()
                if got != cid:
                    raise MirrorCorrupt(
                        f"object {key} in {self.endpoint_url} is not the file {cid} "
                        f"(it hashes to {got}): it was altered or truncated; not using it"
                    )
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, dest)
            done = True
        finally:
            if not done:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
        return imp.bytes_fed

    @staticmethod
    def _copy(
        body: StreamingBody,
        imp: FileImporter,
        f: BinaryIO,
        progress: Callable[[int], None] | None,
        cid: Cid,
        max_bytes: int | None,
    ) -> None:
        """Feed ``body`` to ``imp`` and ``f`` piece by piece, up to ``max_bytes`` in all."""
        try:
            for piece in body.iter_chunks(DOWNLOAD_PIECE_BYTES):
                imp.feed(piece)
                if max_bytes is not None and imp.bytes_fed > max_bytes:
                    raise over_limit(cid, imp.bytes_fed, max_bytes)
                f.write(piece)
                if progress is not None:
                    progress(len(piece))
        finally:
            body.close()

"""An S3-compatible model store (AWS S3, MinIO, Ceph RGW, ...): `pip install 'veil[s3]'` (boto3).

Objects are laid out like the local store, `<prefix>models/<model_id>/v<version>.veilm`, so a
bucket and a directory can be mirrored with ordinary tools. Uploads are S3 multipart uploads,
invisible until `commit` completes them (a file smaller than one part is a single PUT at commit),
so an aborted or refused upload leaves nothing. Reads are streamed GETs resumed with byte ranges
bound to the object's ETag (`IfMatch`), like the HTTP store.

The runtime does not import this module (boto3 is not in its measured code): runtimes read an S3
store through `veil store serve --backend s3://bucket/prefix`, which the gateway may write to
directly or through the same service.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, BinaryIO

from veil.crypto.envelope import check_identifier
from veil.errors import NotFound, Unavailable, VeilError
from veil.store.base import SUFFIX, BlobInfo, TalliedUpload, Tally, check_version, copy_into
from veil.store.stream import ResumableBlob

try:
    import boto3
    from botocore.config import Config
    from botocore.exceptions import BotoCoreError, ClientError
    from urllib3.exceptions import HTTPError as Urllib3Error
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the S3 model store needs boto3: pip install 'veil[s3]'") from exc

PART_SIZE = 8 << 20  # S3 wants >= 5 MiB for every part but the last
_VERSION_KEY = re.compile(r"/v([0-9]{1,15})\.veilm$")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


class S3ModelStore:
    """Sealed models in `bucket` under `prefix`. `client` is a boto3 S3 client (made from
    `client_options`, e.g. `endpoint_url=`, `region_name=`, when not given). The bucket must exist
    (`Unavailable(no_store)` otherwise) unless `create=True`."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: Any = None,
        create: bool = False,
        part_size: int = PART_SIZE,
        resumes: int = 3,
        **client_options: Any,
    ) -> None:
        if not bucket:
            raise ValueError("S3 model store: bucket name is empty")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.part_size = part_size
        self.resumes = resumes
        if client is None:
            style = "path" if client_options.get("endpoint_url") else "auto"
            config = Config(retries={"max_attempts": 3, "mode": "standard"}, s3={"addressing_style": style})
            client = boto3.client("s3", config=config, **client_options)
        self.client = client
        self._check_bucket(create)

    @classmethod
    def from_url(cls, url: str, **options: Any) -> S3ModelStore:
        """`s3://bucket[/prefix]`."""
        if not url.startswith("s3://"):
            raise ValueError(f"S3 model store URL must be s3://bucket[/prefix], got {url!r}")
        bucket, _, prefix = url[len("s3://") :].partition("/")
        return cls(bucket, prefix, **options)

    def __repr__(self) -> str:
        return f"S3ModelStore('s3://{self.bucket}/{self.prefix}')"

    def unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"S3 model store s3://{self.bucket}: {type(exc).__name__}", code="store_unavailable")

    def _check_bucket(self, create: bool) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _status(exc) != 404 and _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise Unavailable(f"S3 model store s3://{self.bucket}: {_code(exc)}", code="no_store") from None
        except BotoCoreError as exc:
            raise Unavailable(
                f"S3 model store s3://{self.bucket} unreachable: {type(exc).__name__}", code="no_store"
            ) from None
        if not create:
            raise Unavailable(f"S3 model store: bucket {self.bucket!r} does not exist", code="no_store")
        self.client.create_bucket(Bucket=self.bucket)

    def key(self, model_id: str, version: int) -> str:
        return f"{self.prefix}models/{check_identifier(model_id, 'model')}/v{check_version(version)}{SUFFIX}"

    def _missing(self, model_id: str, version: int) -> NotFound:
        return NotFound(f"model {model_id!r} version {version} is not in the model store", code="unknown_model")

    # -- ModelReader -------------------------------------------------------------------------
    def open(self, model_id: str, version: int, *, offset: int = 0) -> BinaryIO:
        return S3Blob(self, self.key(model_id, version), self._missing(model_id, version), offset)

    def stat(self, model_id: str, version: int) -> BlobInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(model_id, version))
        except ClientError as exc:
            if _status(exc) == 404:
                raise self._missing(model_id, version) from None
            raise self.unreachable(exc) from None
        except BotoCoreError as exc:
            raise self.unreachable(exc) from None
        return BlobInfo(size=int(head["ContentLength"]), etag=str(head["ETag"]))

    def exists(self, model_id: str, version: int) -> bool:
        try:
            self.stat(model_id, version)
        except NotFound:
            return False
        return True

    def versions(self, model_id: str) -> list[int]:
        folder = f"{self.prefix}models/{check_identifier(model_id, 'model')}/"
        found: list[int] = []
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=folder):
                for item in page.get("Contents", []):
                    match = _VERSION_KEY.search(item["Key"])
                    if match and item["Key"] == folder + match.group(0)[1:]:
                        found.append(int(match.group(1)))
        except (ClientError, BotoCoreError) as exc:
            raise self.unreachable(exc) from None
        return sorted(found)

    # -- writes ------------------------------------------------------------------------------
    def put(self, model_id: str, version: int, source: BinaryIO, *, max_bytes: int | None = None) -> int:
        return copy_into(self.begin_upload(model_id, version, max_bytes=max_bytes), source)

    def begin_upload(self, model_id: str, version: int, *, max_bytes: int | None = None) -> S3Upload:
        return S3Upload(self, self.key(model_id, version), max_bytes)

    def delete(self, model_id: str, version: int) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(model_id, version))
        except (ClientError, BotoCoreError) as exc:
            raise self.unreachable(exc) from None


class S3Upload(TalliedUpload):
    """A multipart upload, parts sent as they fill; invisible until `commit` completes it."""

    def __init__(self, store: S3ModelStore, key: str, max_bytes: int | None) -> None:
        self._store = store
        self._key = key
        self._tally = Tally(max_bytes)
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def _send_part(self, data: bytes) -> None:
        s = self._store
        if self._upload_id is None:
            self._upload_id = s.client.create_multipart_upload(Bucket=s.bucket, Key=self._key)["UploadId"]
        number = len(self._parts) + 1
        answer = s.client.upload_part(
            Bucket=s.bucket, Key=self._key, UploadId=self._upload_id, PartNumber=number, Body=data
        )
        self._parts.append({"PartNumber": number, "ETag": answer["ETag"]})

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError("upload is already finished")
        try:
            self._tally.add(chunk)
            self._buffer += chunk
            while len(self._buffer) >= self._store.part_size:
                part = bytes(self._buffer[: self._store.part_size])
                del self._buffer[: self._store.part_size]
                self._send_part(part)
        except (ClientError, BotoCoreError) as exc:
            self.abort()
            raise self._store.unreachable(exc) from None
        except Exception:
            self.abort()
            raise

    def commit(self) -> int:
        if self._done:
            raise ValueError("upload is already finished")
        s = self._store
        try:
            if self._upload_id is None:
                s.client.put_object(Bucket=s.bucket, Key=self._key, Body=bytes(self._buffer))
            else:
                if self._buffer:
                    self._send_part(bytes(self._buffer))
                s.client.complete_multipart_upload(
                    Bucket=s.bucket, Key=self._key, UploadId=self._upload_id, MultipartUpload={"Parts": self._parts}
                )
        except (ClientError, BotoCoreError) as exc:
            self.abort()
            raise s.unreachable(exc) from None
        self._done = True
        self._buffer.clear()
        return self.size

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._buffer.clear()
        if self._upload_id is not None:
            s = self._store
            # an incomplete multipart upload is invisible; a bucket lifecycle rule reaps a leftover
            with contextlib.suppress(ClientError, BotoCoreError):
                s.client.abort_multipart_upload(Bucket=s.bucket, Key=self._key, UploadId=self._upload_id)


class S3Blob(ResumableBlob):
    """One object streamed from S3, resumed by range (bound to its ETag) if the stream breaks."""

    _STREAM_ERRORS = (OSError, BotoCoreError, Urllib3Error, ValueError)

    def __init__(self, store: S3ModelStore, key: str, missing: NotFound, offset: int = 0) -> None:
        super().__init__(f"S3 model store: {key}", store.resumes, offset)
        self._store, self._key, self._missing = store, key, missing
        self._request()

    def _request(self) -> None:
        s = self._store
        args: dict[str, Any] = {"Bucket": s.bucket, "Key": self._key}
        if self._pos:
            args["Range"] = f"bytes={self._pos}-"
        if self._etag:
            args["IfMatch"] = self._etag
        self._drop()
        try:
            answer = s.client.get_object(**args)
        except ClientError as exc:
            code, status = _code(exc), _status(exc)
            if status == 404 or code in ("NoSuchKey", "404"):
                raise self._missing from None
            if status == 416 and self._size is not None and self._pos >= self._size:
                return
            if status == 412 or code == "PreconditionFailed":
                raise self._changed() from None
            if status == 416 or code == "InvalidRange":
                raise VeilError(
                    f"{self._key}: offset {self._pos} is past the end", code="bad_range", status=416
                ) from None
            raise s.unreachable(exc) from None
        except BotoCoreError as exc:
            raise s.unreachable(exc) from None
        length = int(answer["ContentLength"])
        content_range = answer.get("ContentRange") or ""
        size = int(content_range.rsplit("/", 1)[1]) if "/" in content_range else self._pos + length
        if self._size is not None and size != self._size:
            answer["Body"].close()
            raise self._changed()
        self._size, self._etag, self._stream = size, self._etag or answer.get("ETag"), answer["Body"]

"""Where runs, checkpoints and data live: a local folder or `s3://bucket/prefix`, through pyarrow.fs.

One resolver serves Ray Train's and Tune's storage, the Parquet shards and checkpoint files, so a
path that works for one works for all. For S3 the usual AWS environment applies (credentials,
region, and AWS_ENDPOINT_URL for an S3-compatible endpoint). Transient S3 errors (503 SlowDown,
500, throttling, timeouts) are retried with the AWS SDK's standard exponential back-off, up to
S3_ATTEMPTS attempts per request (FMM_S3_ATTEMPTS); a permanent one (access denied, no such bucket)
fails at once with its reason.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

S3_ATTEMPTS = int(os.environ.get("FMM_S3_ATTEMPTS", "10"))


CREDENTIAL_QUERY_KEYS = ("access_key", "secret_key", "session_token", "token", "password")


def refuse_credentials(uri: str | None, key: str) -> None:
    """A URI that carries credentials (user:password@host, or pyarrow's ?access_key=...&secret_key=...)
    would be copied into MLflow params, run records and checkpoints: refuse it, naming the key."""
    if not isinstance(uri, str) or "://" not in uri:
        return
    parts = urlsplit(uri)
    if "@" in parts.netloc or any(k.lower() in CREDENTIAL_QUERY_KEYS for k in parse_qs(parts.query)):
        raise ValueError(f"{key} carries credentials in its URI; give them through the environment instead "
                         f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3; MLFLOW_TRACKING_USERNAME and "
                         f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, for an MLflow server), so that they "
                         f"never reach MLflow, run records, checkpoints or logs.")


MLFLOW_SCHEMES = ("runs:/", "models:/")  # a run's artifact, a registered model: resolved by MLflow, not paths


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (Tune and Ray workers change directory); remote and MLflow URIs unchanged."""
    if uri.startswith(MLFLOW_SCHEMES):
        return uri
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    uri = absolute(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    try:
        if uri.startswith("s3://"):
            path = uri[len("s3://"):].rstrip("/")
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
            return _s3(path.split("/", 1)[0], endpoint, region), path
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises several types; the user needs the URI and the cause
        raise ValueError(f"cannot open storage {uri!r}: {err}") from None


class RetryingS3(pafs.S3FileSystem):
    """pyarrow's S3 filesystem retrying transient errors S3_ATTEMPTS times (pyarrow's default is 3). It
    pickles as its own arguments: pyarrow's pickling would drop the retry strategy, and Ray sends the
    filesystem to its train controller and workers."""

    def __init__(self, bucket: str, endpoint: str | None, region: str | None, attempts: int):
        self.arguments = (bucket, endpoint, region, attempts)
        options = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                   "connect_timeout": 10.0, "request_timeout": 60.0}
        if endpoint:
            parts = urlsplit(endpoint)
            options.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
            region = region or "us-east-1"
        super().__init__(region=region or pafs.resolve_s3_region(bucket), **options)

    def __reduce__(self):
        return _s3, self.arguments


@functools.lru_cache(maxsize=None)
def _s3(bucket: str, endpoint: str | None, region: str | None, attempts: int = S3_ATTEMPTS) -> RetryingS3:
    return RetryingS3(bucket, endpoint, region, attempts)


def ray_storage(uri: str) -> dict:
    """RunConfig keywords for Ray Train and Tune: a local folder as it is; a remote URI as a path inside
    this module's filesystem (so that Ray's checkpoint uploads retry as ours do)."""
    uri = absolute(uri)
    if not is_remote(uri):
        return {"storage_path": uri}
    fs, path = filesystem(uri)
    return {"storage_path": path, "storage_filesystem": fs}


def uri_of(uri_root: str, path: str) -> str:
    """The URI of `path`, a path inside the filesystem of `uri_root` (as Ray reports checkpoint paths)."""
    root = absolute(uri_root)
    return f"{root.split('://', 1)[0]}://{path}" if is_remote(root) and "://" not in path else path


def join(uri: str, *parts: str) -> str:
    return "/".join([absolute(uri).rstrip("/"), *parts])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise ValueError(f"no file at {uri!r}")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def read_json(uri: str, missing: str):
    """The JSON document at `uri`; `missing` is the error message when there is no file there."""
    try:
        data = read_bytes(uri)
    except ValueError:
        raise ValueError(missing) from None
    return json.loads(data)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: to a temporary name then moved into place locally; one PUT on S3."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as out:
            out.write(data)


def check_writable(uri: str, what: str) -> None:
    """Write and delete a marker under `uri`, so a bad path or refused credentials fail before any work.
    Local folders the check had to create are removed again: a refused run leaves nothing behind."""
    marker = join(uri, f".fmm-write-check-{uuid.uuid4().hex[:8]}")
    fs, path = filesystem(marker)
    created = None
    if isinstance(fs, pafs.LocalFileSystem):
        folder = os.path.dirname(path)
        while not os.path.exists(folder) and os.path.dirname(folder) != folder:
            created, folder = folder, os.path.dirname(folder)
    try:
        write_bytes(marker, b"ok")
        fs.delete_file(path)
    except Exception as err:
        reason = (str(err).splitlines()[0] if str(err) else type(err).__name__).rstrip(".")
        raise ValueError(f"{what} {uri!r} cannot be written: {reason}. Give a folder you can write to, or an "
                         f"s3://bucket/prefix with valid credentials (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                         f"AWS_ENDPOINT_URL for an S3-compatible server).") from None
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)

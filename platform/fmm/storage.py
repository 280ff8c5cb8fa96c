"""Where runs, checkpoints and data live: a local folder or `s3://bucket/prefix`, through pyarrow.fs.

One resolver serves Ray Train's storage_path, the Parquet shards and checkpoint files, so a path
that works for one works for all. For S3 the usual AWS environment applies (credentials, region,
and AWS_ENDPOINT_URL for an S3-compatible endpoint, which pyarrow honours).
"""

from __future__ import annotations

import os
import uuid

import pyarrow.fs as pafs


CREDENTIAL_QUERY_KEYS = ("access_key", "secret_key", "session_token", "token", "password")


def refuse_credentials(uri: str | None, key: str) -> None:
    """A URI that carries credentials (user:password@host, or pyarrow's ?access_key=...&secret_key=...)
    would be copied into MLflow params, run records and checkpoints: refuse it, naming the key."""
    if not isinstance(uri, str) or "://" not in uri:
        return
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    if "@" in parts.netloc or any(k.lower() in CREDENTIAL_QUERY_KEYS for k in parse_qs(parts.query)):
        raise ValueError(f"{key} carries credentials in its URI; give them through the environment instead "
                         f"(AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for S3; MLFLOW_TRACKING_USERNAME and "
                         f"MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, for an MLflow server), so that they "
                         f"never reach MLflow, run records, checkpoints or logs.")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def absolute(uri: str) -> str:
    """A local path made absolute (Tune and Ray workers change directory); remote URIs unchanged."""
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return uri if is_remote(uri) else os.path.abspath(os.path.expanduser(uri))


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI such as s3://bucket/prefix."""
    uri = absolute(uri)
    if not is_remote(uri):
        return pafs.LocalFileSystem(), uri
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as err:  # pyarrow raises several types; the user needs the URI and the cause
        raise ValueError(f"cannot open storage {uri!r}: {err}") from None


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
    import json

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
            import shutil

            shutil.rmtree(created, ignore_errors=True)

"""One storage layer for every read and write: local paths, ``file://`` and ``s3://bucket/prefix``.

S3-compatible stores are reached through pyarrow's S3 filesystem (Ray Data and Ray Train take it
directly). Endpoint and credentials come from the standard AWS environment variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_REGION``) or, for the endpoint and region only, from ``StorageConfig``. Credentials are never
written to logs, manifests or outputs: ``redact`` scrubs them from any text that leaves the process.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

import pyarrow.fs as pafs

from sarjepa_dist.errors import SarjepaError

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")

# Retries of every S3 request (the AWS SDK's "standard" strategy: exponential backoff with jitter,
# capped at 20 s a wait): 10 attempts ride out an endpoint that refuses or stalls for ~30-45 s;
# then the request fails and the caller raises StorageError. A stalled request is abandoned after
# S3_REQUEST_TIMEOUT_S (and retried), so a dead connection never hangs a run. Environment
# overrides: SARJEPA_S3_RETRY_ATTEMPTS, SARJEPA_S3_REQUEST_TIMEOUT_S, SARJEPA_S3_CONNECT_TIMEOUT_S.
S3_RETRY_ATTEMPTS = 10
S3_REQUEST_TIMEOUT_S = 30.0
S3_CONNECT_TIMEOUT_S = 5.0


class StorageError(SarjepaError, OSError):
    """A storage location cannot be read or written; the message names the URI."""


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint_url: str | None = None, region: str | None = None) -> "S3Settings":
        return cls(
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


_settings_override: S3Settings | None = None


def configure(endpoint_url: str | None = None, region: str | None = None) -> None:
    """Set endpoint/region from config for this process (environment still wins when unset here).

    Also exported to the environment so Ray workers started from this process see the same store.
    """
    global _settings_override
    _settings_override = S3Settings.from_env(endpoint_url, region)
    if endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = endpoint_url
    if region:
        os.environ["AWS_REGION"] = region


def s3_settings() -> S3Settings:
    return _settings_override or S3Settings.from_env()


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _strip_file_scheme(uri: str) -> str:
    if uri.startswith("file://"):
        return urlparse(uri).path
    return uri


def s3_filesystem(settings: S3Settings | None = None) -> pafs.S3FileSystem:
    """One S3 filesystem per (endpoint, region, credentials, retry switches) in this process:
    building one is not free."""
    settings = settings or s3_settings()
    key = (settings, _retry_options(), os.environ.get("AWS_ACCESS_KEY_ID"),
           os.environ.get("AWS_SECRET_ACCESS_KEY"), os.environ.get("AWS_SESSION_TOKEN"))
    fs = _fs_cache.get(key)
    if fs is None:
        fs = _fs_cache[key] = _make_s3_filesystem(settings)
    return fs


_fs_cache: dict[tuple, pafs.S3FileSystem] = {}


def _retry_options() -> tuple[int, float, float]:
    """(attempts, request timeout s, connect timeout s): the defaults above or SARJEPA_S3_* overrides."""
    return (int(os.environ.get("SARJEPA_S3_RETRY_ATTEMPTS", S3_RETRY_ATTEMPTS)),
            float(os.environ.get("SARJEPA_S3_REQUEST_TIMEOUT_S", S3_REQUEST_TIMEOUT_S)),
            float(os.environ.get("SARJEPA_S3_CONNECT_TIMEOUT_S", S3_CONNECT_TIMEOUT_S)))


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem with our retry strategy, which survives pickling.

    pyarrow pickles an S3FileSystem without its retry strategy, so the copy Ray Train sends to its
    workers and controller (``RunConfig.storage_filesystem``, which uploads every checkpoint) would
    fall back to pyarrow's default of 3 attempts: a few seconds of outage would fail a checkpoint.
    """

    def __init__(self, max_attempts: int, **options: Any):
        super().__init__(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts), **options)
        self._rebuild_args = (max_attempts, options)

    def __reduce__(self):
        max_attempts, options = self._rebuild_args
        return _rebuild_s3_filesystem, (max_attempts, options)


def _rebuild_s3_filesystem(max_attempts: int, options: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


def _make_s3_filesystem(settings: S3Settings) -> pafs.S3FileSystem:
    attempts, request_timeout, connect_timeout = _retry_options()
    kwargs: dict = {"region": settings.region, "request_timeout": request_timeout,
                    "connect_timeout": connect_timeout}
    if settings.endpoint_url:
        parsed = urlparse(settings.endpoint_url)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
        # S3-compatible stores (MinIO, moto, Ceph) generally want path-style addressing.
        kwargs["force_virtual_addressing"] = False
    # Credentials: pyarrow reads the standard AWS chain (env, profile, instance role) itself, in the
    # process that uses the filesystem, so none are held here or travel in a pickle.
    return RetryingS3FileSystem(attempts, **kwargs)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it (``bucket/key`` for S3, absolute for local)."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise StorageError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(_strip_file_scheme(uri)).expanduser().resolve())


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    return f"s3://{path}" if isinstance(fs, pafs.S3FileSystem) else path


def _file_info(fs: pafs.FileSystem, what: str | pafs.FileSelector, uri: str):
    """``fs.get_file_info(what)``; a store that cannot be reached or refuses access names ``uri``."""
    try:
        return fs.get_file_info(what)
    except OSError as exc:
        raise StorageError(f"{redact(str(uri))}: cannot read: {redact(str(exc))}") from exc


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return _file_info(fs, path, uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = resolve(uri)
    return _file_info(fs, path, uri).type == pafs.FileType.Directory


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise StorageError(f"{uri}: no such file") from exc
    except OSError as exc:
        raise StorageError(f"{uri}: cannot read: {redact(str(exc))}") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object atomically: readers see the old content or the new, never a part.

    S3 PUTs are atomic per object; locally we write a temporary sibling and rename it.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            parent = os.path.dirname(path)
            os.makedirs(parent, exist_ok=True)
            tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:
                # a failed write must not leave a partial temporary file beside the target
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as exc:
        raise StorageError(f"{uri}: cannot write: {redact(str(exc))}") from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def makedirs(uri: str) -> None:
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(path, exist_ok=True)
    # S3 has no directories: keys appear when written.


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """URIs of the files under ``uri`` (empty when it does not exist)."""
    fs, path = resolve(uri)
    info = _file_info(fs, path, uri)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [to_uri(fs, path)]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    return sorted(to_uri(fs, i.path) for i in _file_info(fs, selector, uri) if i.type == pafs.FileType.File)


def list_dirs(uri: str) -> list[str]:
    fs, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return sorted(to_uri(fs, i.path) for i in _file_info(fs, selector, uri) if i.type == pafs.FileType.Directory)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_file(path)


def download_file(uri: str, path: str | os.PathLike) -> Path:
    """Copy one file (local or s3://) to the local ``path``, making its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(read_bytes(uri))
    return path


def download_dir(uri: str, dest: str | os.PathLike) -> Path:
    """Copy every file under ``uri`` (local or s3://) into ``dest``, keeping relative paths."""
    files = list_files(uri, recursive=True)
    if not files:
        raise FileNotFoundError(f"{redact(uri)}: no files here (is it a checkpoint folder?)")
    _, root = resolve(uri)
    for f in files:
        download_file(f, Path(dest) / os.path.relpath(resolve(f)[1], root))
    return Path(dest)


def download_named(folder_uri: str, names: Iterable[str], dest: str | os.PathLike) -> list[str]:
    """Copy the files ``<folder_uri>/<name>`` that exist into the local folder ``dest``; return the
    names copied (a loader that reads a few files of a large remote folder fetches only those)."""
    copied = []
    for name in names:
        uri = join(folder_uri, name)
        if exists(uri):
            download_file(uri, Path(dest) / name)
            copied.append(name)
    return copied


def upload_dir(src: str | os.PathLike, uri: str, last: tuple[str, ...] = ()) -> None:
    """Copy the files of local folder ``src`` to ``uri``; names in ``last`` are written after the rest."""
    src = Path(src)
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name in last)
    for p in files:
        write_bytes(join(uri, *p.relative_to(src).parts), p.read_bytes())


_URI_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\s@]+@")


def redact(text: str, extra_secrets: Iterable[str] = ()) -> str:
    """Remove credential values (from the environment), key=secret pairs and the user:password
    part of URIs (``s3://KEY:SECRET@bucket``, ``http://user:pass@host``) from ``text``."""
    secrets = [os.environ.get(k) for k in _SECRET_ENV] + list(extra_secrets)
    for s in secrets:
        if s and len(s) >= 4:
            text = text.replace(s, "***")
    text = _URI_USERINFO.sub(r"\1***@", text)
    return re.sub(r"(?i)(secret|token|password|access_key)(\w*)=([^\s&,]+)", r"\1\2=***", text)


def redact_tree(obj: Any) -> Any:
    """``obj`` (JSON-like: dicts, lists, strings) with ``redact`` applied to every string in it;
    for configs and results written to files."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_tree(v) for v in obj]
    return obj

"""Where a store lives: a folder on local disk or a prefix in an S3 bucket, behind one small interface.

Every store (volume store, pretraining and task patch stores) is a tree of named objects. The stores need
little of a filesystem, and an object store offers exactly that little:

- read an object whole or a byte range of it; write one whole, atomically (a reader sees the old or the
  new object, never a mix): on disk a temporary file and `os.replace`, in a bucket a single PUT;
- create one only if absent (`create`: `os.link` on disk, `If-None-Match: *` in a bucket), and replace
  one only if it is still the version read (`replace`: compare-and-swap on the entity tag; leases);
- list everything under a prefix; delete; and open a prefix as a Zarr v3 store (`zarr_store`:
  `zarr.storage.LocalStore` or `zarr.storage.ObjectStore`).

No rename: a bucket has none. Stores publish by writing their data first and a small commit object last
(`pipeline.storage.commits`).

Why obstore (through Zarr's own `zarr.storage.ObjectStore`) and not fsspec/s3fs: its conditional PUT
(`mode="create"`, `mode={"e_tag": ...}`) is what leases need, and s3fs offers no compare-and-swap; its
client is Rust with concurrent range reads (`get_ranges`), so a shard's inner chunks come in one call;
and measured against the local S3 server (`benchmarks/object_backends.py`) it reads shards faster.

Credentials and endpoint come from the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION` / `AWS_DEFAULT_REGION`) or, when the keys are
not in the environment, from botocore's chain (`~/.aws/credentials`, `AWS_PROFILE`, ...). They are held in
the client only: `Tree.url` and every message name the bucket and prefix, never a key.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.runtime.errors import UsageError

__all__ = ["Tree", "LocalTree", "S3Tree", "ObjectInfo", "StorageError", "open_tree", "is_remote", "split_url",
           "SCHEMES"]

SCHEMES = ("s3",)
"""Schemes besides plain paths (and file://)."""


class StorageError(UsageError):
    """A store location that cannot be used: unknown scheme, no bucket, missing or rejected credentials, an
    endpoint that does not answer, a bucket that does not exist. One line, exit 2, before anything is written."""


@dataclass(frozen=True)
class ObjectInfo:
    """One object under a tree: its path relative to the tree, its size and entity tag (None on disk)."""

    path: str
    size: int
    etag: str | None = None


def is_remote(url: str | os.PathLike) -> bool:
    """Whether `url` names an object store (s3://...) rather than a local path."""
    return isinstance(url, str) and "://" in url and not url.startswith("file://")


def split_url(url: str) -> tuple[str, str, str]:
    """(scheme, bucket, prefix) of an object-store URL; StorageError for an unknown scheme or no bucket."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise StorageError(f"{url}: unknown scheme {scheme + '://'!r}; a store is a local path or "
                           f"s3://BUCKET/PREFIX")
    if "@" in parts.netloc:  # keys written into the URL: never echoed, never used
        raise StorageError(f"{scheme}://...@{parts.netloc.rsplit('@', 1)[1]}: credentials do not go in a store URL; "
                           "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead")
    bucket = parts.netloc
    if not bucket:
        raise StorageError(f"{url}: no bucket name; write s3://BUCKET/PREFIX")
    return scheme, bucket, parts.path.strip("/")


def open_tree(url: str | os.PathLike) -> "Tree":
    """The tree at `url`: a local path (or file://) or s3://BUCKET/PREFIX. Opening checks nothing remote;
    `Tree.check()` does (credentials, endpoint, bucket), in seconds."""
    if isinstance(url, Tree):
        return url
    if isinstance(url, os.PathLike) or not is_remote(url):
        text = os.fspath(url)
        return LocalTree(Path(text[len("file://"):] if text.startswith("file://") else text))
    _scheme, bucket, prefix = split_url(url)
    return S3Tree(bucket, prefix)


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


class Tree:
    """A folder of objects addressed by relative '/'-separated paths. Subclasses: LocalTree, S3Tree."""

    url: str
    """The location as the user gave it, normalised (never holds a credential)."""

    # ---- navigation
    def child(self, rel: str) -> "Tree":
        raise NotImplementedError

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def local(self) -> Path | None:
        """The folder on disk (None in a bucket): for code that must hand a path to a library."""
        return None

    def check(self) -> None:
        """Fail fast (StorageError) when the tree cannot be reached; a no-op on disk."""

    # ---- objects
    def read(self, rel: str) -> bytes:
        """The object's bytes; FileNotFoundError when absent."""
        raise NotImplementedError

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        raise NotImplementedError

    def stat(self, rel: str) -> ObjectInfo | None:
        raise NotImplementedError

    def exists(self, rel: str) -> bool:
        return self.stat(rel) is not None

    def write(self, rel: str, data: bytes) -> None:
        """Write the whole object atomically (replacing any)."""
        raise NotImplementedError

    def create(self, rel: str, data: bytes) -> str | None:
        """Write only if absent; its entity tag when written, None when something was there."""
        raise NotImplementedError

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        """Write only if the object is still version `etag`; the new tag, or None when it changed or went."""
        raise NotImplementedError

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        """(bytes, entity tag) of the object, None when absent: what `replace` compares against."""
        raise NotImplementedError

    def delete(self, rel: str) -> None:
        """Remove the object (absent: nothing to do)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object under `prefix` (recursive), sorted by path."""
        raise NotImplementedError

    def listdir(self, prefix: str = "") -> list[str]:
        """Names one level below `prefix` (objects and 'folders'), sorted."""
        raise NotImplementedError

    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under `prefix`; how many."""
        raise NotImplementedError

    def zarr_store(self, rel: str = "", read_only: bool = True):
        """A Zarr v3 store over the objects under `rel`."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and type(other) is type(self) and other.url == self.url

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.url))


class LocalTree(Tree):
    """A folder on local (or shared POSIX) disk."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.url = str(self.root)

    def __reduce__(self):
        return (LocalTree, (self.url,))

    @property
    def local(self) -> Path:
        return self.root

    @property
    def name(self) -> str:
        return self.root.name

    def child(self, rel: str) -> "LocalTree":
        return LocalTree(self.root / rel) if rel else self

    def _p(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def read(self, rel: str) -> bytes:
        p = self._p(rel)
        if p.is_dir():
            raise FileNotFoundError(str(p))
        return p.read_bytes()

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with open(self._p(rel), "rb") as fh:
            fh.seek(start)
            return fh.read(end - start)

    def stat(self, rel: str) -> ObjectInfo | None:
        try:
            st = self._p(rel).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        if not os.path.isfile(self._p(rel)):
            return None
        return ObjectInfo(rel, st.st_size, f"{st.st_mtime_ns}-{st.st_size}-{st.st_ino}")

    def write(self, rel: str, data: bytes) -> None:
        p = self._p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            os.replace(tmp, p)
        finally:
            tmp.unlink(missing_ok=True)

    def create(self, rel: str, data: bytes) -> str | None:
        p = self._p(rel)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        try:
            os.link(tmp, p)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        info = self.stat(rel)
        return info.etag if info else None

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        info = self.stat(rel)
        if info is None:
            return None
        try:
            data = self.read(rel)
        except FileNotFoundError:
            return None
        return data, info.etag

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        """Compare-and-swap on disk: best effort (a check then a rename). Local stores lock with flock
        (`pipeline.storage.locks`), so nothing relies on this being exact across processes."""
        info = self.stat(rel)
        if info is None or info.etag != etag:
            return None
        self.write(rel, data)
        info = self.stat(rel)
        return info.etag if info else None

    def delete(self, rel: str) -> None:
        self._p(rel).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self._p(prefix)
        if base.is_file():
            return [ObjectInfo(prefix, base.stat().st_size)]
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for f in files:
                full = os.path.join(dirpath, f)
                try:
                    size = os.path.getsize(full)
                except OSError:
                    continue
                out.append(ObjectInfo(os.path.relpath(full, self.root).replace(os.sep, "/"), size))
        return sorted(out, key=lambda o: o.path)

    def listdir(self, prefix: str = "") -> list[str]:
        try:
            return sorted(os.listdir(self._p(prefix)))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete_prefix(self, prefix: str) -> int:
        import shutil

        base = self._p(prefix)
        if base.is_file():
            base.unlink()
            return 1
        if not base.exists():
            return 0
        n = sum(len(files) for _, _, files in os.walk(base))
        shutil.rmtree(base, ignore_errors=True)
        return n

    def zarr_store(self, rel: str = "", read_only: bool = True):
        from zarr.storage import LocalStore

        return LocalStore(self._p(rel), read_only=read_only)


def _retry_config() -> dict:
    """Few, short retries: a dead endpoint or a wrong key is said in seconds, not after minutes."""
    return {"max_retries": 3, "retry_timeout": timedelta(seconds=10),
            "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=2),
                        "base": 2}}


def s3_endpoint() -> str | None:
    """AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL, checked (http or https, a host, a port that is a number):
    StorageError otherwise - the S3 client would panic on it."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not endpoint:
        return None
    name = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    parts = urlsplit(endpoint)
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise StorageError(f"{name}={endpoint!r}: the port is not a number") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StorageError(f"{name}={endpoint!r}: write the endpoint as http://HOST:PORT or https://HOST")
    return endpoint


def s3_settings() -> dict:
    """The S3 client's settings from the standard AWS environment: endpoint, region, and the keys when the
    environment holds them (`s3_credentials` says where they come from otherwise). Never logged."""
    conf: dict = {}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if not region:
        try:
            import botocore.session

            region = botocore.session.get_session().get_config_variable("region")
        except Exception:  # noqa: BLE001 - no config: the default region
            pass
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        conf.update(access_key_id=key, secret_access_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            conf["token"] = os.environ["AWS_SESSION_TOKEN"]
    conf["region"] = region or "us-east-1"
    endpoint = s3_endpoint()
    if endpoint:
        conf["endpoint"] = endpoint
    return conf


def s3_credentials():
    """A refreshing credential provider from boto3's chain (a profile in ~/.aws, SSO, assume-role, EKS's web
    identity, an instance role) when the keys are not in the environment; None when they are, or when the chain
    finds none. Temporary credentials are renewed before they expire, so a long conversion or a lease held for
    hours keeps working."""
    if os.environ.get("AWS_ACCESS_KEY_ID") and os.environ.get("AWS_SECRET_ACCESS_KEY"):
        return None
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider

        session = boto3.Session()
        if session.get_credentials() is None:
            return None
        return Boto3CredentialProvider(session)
    except Exception:  # noqa: BLE001 - no boto3 or no chain: no credentials (check() says so)
        return None


class S3Tree(Tree):
    """A prefix in an S3 (or S3-compatible: MinIO, Ceph, moto) bucket, through obstore."""

    def __init__(self, bucket: str, prefix: str = ""):
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._client = None

    def __reduce__(self):
        return (S3Tree, (self.bucket, self.prefix))

    def child(self, rel: str) -> "S3Tree":
        return S3Tree(self.bucket, _join(self.prefix, rel)) if rel else self

    @property
    def client(self):
        """The bucket-wide obstore client (made once per process, credentials from the environment)."""
        if self._client is None:
            self._client = _client(self.bucket)
        return self._client

    def _k(self, rel: str) -> str:
        return _join(self.prefix, rel)

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    def check(self) -> None:
        """List one object: credentials, endpoint and bucket are proven (or refused) in seconds."""
        import obstore
        from obstore.exceptions import (GenericError, NotFoundError, PermissionDeniedError,
                                        UnauthenticatedError)

        conf = s3_settings()
        if "access_key_id" not in conf and os.environ.get("AWS_SKIP_SIGNATURE", "").lower() not in ("1", "true") \
                and s3_credentials() is None:
            raise StorageError(f"{self.url}: no S3 credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                               "(or a profile in ~/.aws/credentials)")
        try:
            stream = obstore.list(self.client, prefix=self.prefix or None, chunk_size=1)
            next(iter(stream), None)
        except (UnauthenticatedError, PermissionDeniedError) as exc:
            raise StorageError(f"{self.url}: the S3 credentials were refused ({_reason(exc)})") from None
        except (NotFoundError, FileNotFoundError):
            raise StorageError(f"{self.url}: bucket {self.bucket!r} does not exist") from None
        except (GenericError, OSError) as exc:
            text = str(exc)
            status = re.search(r"status code: (\d{3})", text)  # the HTTP status, not digits of a name or a time
            code = status.group(1) if status else None
            if code is None and any(s in text for s in ("error sending request", "tcp connect error", "timed out",
                                                        "Connection refused", "dns error")):
                where = conf.get("endpoint", "the AWS endpoint")
                raise StorageError(f"{self.url}: {where} does not answer ({_reason(exc)})") from None
            if "NoSuchBucket" in text or code == "404":
                raise StorageError(f"{self.url}: bucket {self.bucket!r} does not exist") from None
            if code in ("401", "403") or any(s in text for s in ("InvalidAccessKeyId", "SignatureDoesNotMatch",
                                                                 "AccessDenied")):
                raise StorageError(f"{self.url}: the S3 credentials were refused ({_reason(exc)})") from None
            if code in ("301", "400") or any(s in text for s in ("PermanentRedirect", "AuthorizationHeaderMalformed",
                                                                 "IllegalLocationConstraint")):
                raise StorageError(f"{self.url}: bucket {self.bucket!r} is not in region {conf['region']!r}; set "
                                   f"AWS_REGION to the bucket's region ({_reason(exc)})") from None
            where = conf.get("endpoint", "the AWS endpoint")
            raise StorageError(f"{self.url}: {where} does not answer ({_reason(exc)})") from None

    def read(self, rel: str) -> bytes:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return bytes(obstore.get(self.client, self._k(rel)).bytes())
        except (NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{self.url}/{rel}") from None

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            return bytes(obstore.get_range(self.client, self._k(rel), start=start, end=end))
        except (NotFoundError, FileNotFoundError):
            raise FileNotFoundError(f"{self.url}/{rel}") from None

    def stat(self, rel: str) -> ObjectInfo | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            meta = obstore.head(self.client, self._k(rel))
        except (NotFoundError, FileNotFoundError):
            return None
        return ObjectInfo(rel, int(meta["size"]), meta.get("e_tag"))

    def write(self, rel: str, data: bytes) -> None:
        import obstore

        obstore.put(self.client, self._k(rel), data)

    def create(self, rel: str, data: bytes) -> str | None:
        import obstore
        from obstore.exceptions import (AlreadyExistsError, PermissionDeniedError, PreconditionError,
                                        UnauthenticatedError)

        try:
            return obstore.put(self.client, self._k(rel), data, mode="create")["e_tag"] or ""
        except (AlreadyExistsError, PreconditionError):
            return None
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageError(f"{self.url}/{rel}: the S3 credentials may not write here ({_reason(exc)})") from None

    def replace(self, rel: str, data: bytes, etag: str) -> str | None:
        import obstore
        from obstore.exceptions import NotFoundError, PermissionDeniedError, PreconditionError, UnauthenticatedError

        try:
            return obstore.put(self.client, self._k(rel), data, mode={"e_tag": etag})["e_tag"] or ""
        except (PreconditionError, NotFoundError, FileNotFoundError):
            return None
        except (PermissionDeniedError, UnauthenticatedError) as exc:
            raise StorageError(f"{self.url}/{rel}: the S3 credentials may not write here ({_reason(exc)})") from None

    def read_versioned(self, rel: str) -> tuple[bytes, str] | None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            res = obstore.get(self.client, self._k(rel))
        except (NotFoundError, FileNotFoundError):
            return None
        return bytes(res.bytes()), res.meta.get("e_tag") or ""

    def delete(self, rel: str) -> None:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            obstore.delete(self.client, self._k(rel))
        except (NotFoundError, FileNotFoundError):
            pass

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        import obstore

        base = self._k(prefix)
        out = []
        for chunk in obstore.list(self.client, prefix=base or None):
            for m in chunk:
                key = m["path"]
                if base and not (key == base or key.startswith(base + "/")):
                    continue  # "scans/a" must not list "scans/ab"
                out.append(ObjectInfo(self._rel(key), int(m["size"]), m.get("e_tag")))
        return sorted(out, key=lambda o: o.path)

    def listdir(self, prefix: str = "") -> list[str]:
        import obstore

        base = self._k(prefix)
        res = obstore.list_with_delimiter(self.client, prefix=(base + "/") if base else None)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in res["common_prefixes"]]
        names += [m["path"].rsplit("/", 1)[-1] for m in res["objects"]]
        return sorted(set(names))

    def delete_prefix(self, prefix: str) -> int:
        import obstore

        keys = [self._k(o.path) for o in self.list(prefix)]
        for i in range(0, len(keys), 1000):
            obstore.delete(self.client, keys[i:i + 1000])
        return len(keys)

    def zarr_store(self, rel: str = "", read_only: bool = True):
        return bucket_zarr_store(self.bucket, self._k(rel), read_only)


_clients: dict[tuple, object] = {}
_prefixed: "OrderedDict[tuple, object]" = OrderedDict()
PREFIXED_CLIENTS = 32
"""Clients over a prefix (one per scan or patch store a process opens) kept for reuse; older ones are dropped, so
opening thousands of scans costs no more memory than opening 32."""


def _client(bucket: str, prefix: str = ""):
    """The obstore S3Store of `bucket` (and `prefix`) in this process: one bucket-wide client made once; prefixed
    ones in a small LRU. Keys are not part of the cache key and never leave the client."""
    from obstore.store import S3Store

    conf = s3_settings()
    ident = (bucket, prefix, os.getpid(), conf.get("endpoint"), conf["region"], conf.get("access_key_id"))
    cache = _prefixed if prefix else _clients
    if ident in cache:
        if prefix:
            _prefixed.move_to_end(ident)
        return cache[ident]
    options = {"connect_timeout": "5s", "timeout": "120s"}
    if str(conf.get("endpoint", "")).startswith("http://"):
        options["allow_http"] = True
    provider = None if "access_key_id" in conf else s3_credentials()
    try:
        client = S3Store(bucket, prefix=prefix or None, config=conf, client_options=options,
                         retry_config=_retry_config(), credential_provider=provider)
    except BaseException as exc:  # obstore raises a Rust panic (a BaseException) on some bad settings
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise StorageError(f"s3://{bucket}: the S3 client refused its settings ({_reason(exc)})") from None
    cache[ident] = client
    if prefix and len(_prefixed) > PREFIXED_CLIENTS:
        _prefixed.popitem(last=False)
    return client


def _reopen(bucket: str, prefix: str, read_only: bool):
    return bucket_zarr_store(bucket, prefix, read_only)


_store_class = None


def bucket_zarr_store(bucket: str, prefix: str, read_only: bool = True):
    """zarr's ObjectStore over `prefix` of `bucket`. It pickles as (bucket, prefix, read_only) and is rebuilt from
    the environment where it is unpickled: zarr's own ObjectStore pickles its obstore client, keys included, into
    every Dask or Ray payload that holds an open array."""
    global _store_class
    if _store_class is None:
        from zarr.storage import ObjectStore

        class BucketStore(ObjectStore):
            def __init__(self, store, *, read_only: bool = False, where: tuple[str, str] = ("", "")):
                super().__init__(store, read_only=read_only)
                self.where = where

            def with_read_only(self, read_only: bool = False):
                return bucket_zarr_store(*self.where, read_only)

            def __reduce__(self):
                return (_reopen, (*self.where, self.read_only))

        _store_class = BucketStore
    return _store_class(_client(bucket, prefix), read_only=read_only, where=(bucket, prefix))


def _reason(exc: BaseException) -> str:
    """The first line of an obstore error, without its debug dump."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return first[:200]

"""Where artifact bytes live: content-addressed by sha256, written once, never changed.

`BlobStore` is the interface; `VolumeBlobStore` keeps blobs on a volume as
`<root>/sha256/<hex>`. An S3-compatible store implements the same four operations
(a multipart upload for `BlobUpload`, `GetObject` for `read`).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from pathlib import Path

CHUNK = 256 * 1024


class TooLargeError(Exception):
    """An upload went past the store's size limit; nothing of it is kept."""


class BlobUpload(ABC):
    """One upload in progress: bytes are hashed as they arrive and kept nowhere but the store."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            raise TooLargeError(f"upload is larger than the {self.limit}-byte limit")
        self._hash.update(chunk)
        self._write(chunk)

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    @abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    async def commit(self) -> str:
        """Make the blob durable under its digest (a no-op if those bytes exist); the digest."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written."""


class BlobStore(ABC):
    @abstractmethod
    def upload(self, limit: int) -> BlobUpload: ...

    @abstractmethod
    def read(self, digest: str) -> AsyncIterator[bytes]:
        """The blob's bytes in chunks; FileNotFoundError if absent."""

    @abstractmethod
    async def exists(self, digest: str) -> bool: ...

    @abstractmethod
    async def delete(self, digest: str) -> None: ...


class _VolumeUpload(BlobUpload):
    def __init__(self, store: VolumeBlobStore, limit: int) -> None:
        super().__init__(limit)
        self._store = store
        descriptor, name = tempfile.mkstemp(dir=store.incoming, prefix="upload-")
        self._path = Path(name)
        self._file = os.fdopen(descriptor, "wb")

    def _write(self, chunk: bytes) -> None:
        # Page-cache writes of a chunk are fast; the one slow step, fsync, is in commit().
        self._file.write(chunk)

    async def commit(self) -> str:
        digest = self.digest
        target = self._store.path(digest)

        def finish() -> None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            if target.exists():
                self._path.unlink()
                return
            os.chmod(self._path, 0o444)
            os.replace(self._path, target)
            # The rename itself survives a crash only once the directory is synced.
            directory = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)

        await asyncio.to_thread(finish)
        return digest

    def abort(self) -> None:
        self._file.close()
        self._path.unlink(missing_ok=True)


class VolumeBlobStore(BlobStore):
    """Blobs as read-only files under `root/sha256/`; uploads land in `root/incoming/` first,
    so a crash mid-upload never leaves a partial blob under a real digest."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        (root / "sha256").mkdir(parents=True, exist_ok=True)
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Uploads interrupted by a crash are garbage; nothing refers to them.
        for leftover in self.incoming.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / "sha256" / digest.removeprefix("sha256:")

    def upload(self, limit: int) -> BlobUpload:
        return _VolumeUpload(self, limit)

    async def read(self, digest: str) -> AsyncIterator[bytes]:
        file = await asyncio.to_thread(open, self.path(digest), "rb")
        try:
            while chunk := await asyncio.to_thread(file.read, CHUNK):
                yield chunk
        finally:
            file.close()

    async def exists(self, digest: str) -> bool:
        return await asyncio.to_thread(self.path(digest).exists)

    async def delete(self, digest: str) -> None:
        await asyncio.to_thread(self.path(digest).unlink, True)

"""One GGUF file, written tensor by tensor, that appears only when complete.

The ``gguf`` package's ``GGUFWriter`` writes the header, the metadata and the
tensor table; the table is planned up front from names, shapes and types
(``plan``), so each tensor's bytes can be written as soon as they exist and
then dropped: memory stays bounded by one tensor.

The file is written to ``.<name>.<pid>-<random>.incomplete`` beside OUT,
fsynced, and renamed over OUT only when every tensor is in. On any error,
Ctrl-C included, the temp file is removed and OUT is untouched. A full disk
becomes a ``StorageError`` (exit 7).

>>> with GGUFFile(out, "llama") as f:                        # doctest: +SKIP
...     f.writer.add_block_count(2)
...     f.plan([OutTensor("token_embd.weight", (512, 64), T.F16)])
...     f.write("token_embd.weight", data)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterhub.errors import ConflictError, InvalidArtifactError
from adapterhub.fsutil import fsync_dir, remove_stale_staging, staging_path, storage_error

from adapterhub.converters.formats.gguf_arch import tensor_nbytes

if TYPE_CHECKING:
    import numpy as np
    from gguf import GGMLQuantizationType


@dataclass(frozen=True)
class OutTensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order ([out, in])
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def _with_errno(e: OSError, where: Path, nbytes: int) -> OSError:
    """numpy's ``tofile`` reports a short write ("N requested and M written") without an errno; on a
    filesystem that has no room left for the tensor that is a full disk."""
    import errno

    if e.errno is None:
        try:
            st = os.statvfs(where)
            if st.f_bavail * st.f_frsize < nbytes:
                return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            pass
    return e


class GGUFFile:
    """A context manager around ``GGUFWriter`` for one atomically written file."""

    def __init__(self, out: str | os.PathLike, arch: str, *, force: bool = False) -> None:
        import gguf

        self.out = Path(out)
        if self.out.exists() and not force:
            raise ConflictError(f"{self.out} already exists", hint="pass --force to replace it")
        if self.out.is_dir():
            raise ConflictError(f"{self.out} is a directory; a GGUF output is one file")
        self.writer = gguf.GGUFWriter(None, arch)
        self._tmp: Path | None = None
        self._order: list[OutTensor] = []
        self._next = 0
        self.bytes_written = 0

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self._commit()
        else:
            self._abort()

    def plan(self, tensors: Sequence[OutTensor]) -> None:
        """Declare every tensor, in the order they will be written; then open the file and write the header."""
        import numpy as np
        from gguf import GGMLQuantizationType as T

        for t in tensors:
            if t.qtype in (T.F32, T.F16):
                dtype = np.float32 if t.qtype == T.F32 else np.float16
                self.writer.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.nbytes, raw_dtype=t.qtype)
            else:
                from gguf.quants import quant_shape_to_byte_shape

                byte_shape = quant_shape_to_byte_shape(t.shape, t.qtype)
                self.writer.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        self._order = list(tensors)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_staging(self.out)  # left by a killed run
            self._tmp = staging_path(self.out)
            self.writer.write_header_to_file(path=self._tmp)
            self.writer.write_kv_data_to_file()
            self.writer.write_ti_data_to_file()
        except OSError as e:
            raise storage_error(e, str(self.out)) from e

    def write(self, name: str, data: np.ndarray) -> None:
        """Write the next tensor's bytes (in planned order)."""
        if self._next >= len(self._order) or self._order[self._next].name != name:
            expected = self._order[self._next].name if self._next < len(self._order) else "nothing"
            raise InvalidArtifactError(f"internal: GGUF tensor {name} written out of order (expected {expected})")
        spec = self._order[self._next]
        if data.nbytes != spec.nbytes:
            raise InvalidArtifactError(f"internal: GGUF tensor {name} has {data.nbytes} bytes, planned {spec.nbytes}")
        try:
            self.writer.write_tensor_data(data)
        except OSError as e:
            raise storage_error(_with_errno(e, self.out.parent, data.nbytes), str(self.out)) from e
        self._next += 1
        self.bytes_written += data.nbytes

    def _commit(self) -> None:
        if self._next != len(self._order):
            self._abort()
            raise InvalidArtifactError(f"internal: {len(self._order) - self._next} GGUF tensors were never written")
        fout = self.writer.fout
        try:
            assert fout is not None and self._tmp is not None
            for f in fout:
                f.flush()
                os.fsync(f.fileno())
            self.writer.close()
            os.replace(self._tmp, self.out)
            fsync_dir(self.out.parent)
        except OSError as e:
            self._abort()
            raise storage_error(e, str(self.out)) from e
        self._tmp = None

    def _abort(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

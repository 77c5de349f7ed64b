"""Packages whose base weights are not rewritten: shared in place, or copied by byte range.

* **Shared base** (``extract_adapters(..., share_base=True)``; the default when ``out_dir`` is
  the folder holding the source's external-data file): the package is written *beside* the
  exported model, and its graph references the source's data file where it is; nothing of the
  base is read or written. The source graph, if it is that folder's ``model.onnx``, is kept as
  ``source.onnx``. The LoRA bytes in the shared file are simply not referenced. The manifest
  records every shared file with its size and a fingerprint of its first and last MiB
  (:func:`file_record`); loading a package whose shared file changed raises
  :class:`~graph_tools.errors.SharedBaseChangedError` (:func:`check_shared`)::

      export/                          export/
        model.onnx  (LoRA graph)         model.onnx         package graph ──┐
        model.onnx.data       ──>        model.onnx.data    shared, as is <─┘
                                         source.onnx        the LoRA graph, as exported
                                         adapters/  manifest.json

* **Copied base** (any other ``out_dir``): when every base tensor lives in external-data files of
  the source's folder, each file is copied whole by the kernel (``os.copy_file_range``, what ``cp``
  does; no bytes pass through Python) in a background thread (:class:`FileCopy`) while the graph
  is rewritten and the adapters are written. The package graph keeps the tensors' offsets, so the
  copy needs no index; once the rewrite tells which tensors the package still references, every
  other byte range of the copy (the LoRA tensors, padding) is punched out (``fallocate``
  ``PUNCH_HOLE``, or overwritten with zeros where the file system cannot), so no adapter bytes ship
  with the base (the copy holds exactly the referenced ranges, at their offsets). Nothing about it
  needs recording in the manifest: the package owns the file. Otherwise the graph is saved the
  ordinary onnx-ir way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from graph_tools.errors import PackageError, SharedBaseChangedError, first_line

__all__ = ["external_files", "file_record", "check_shared", "FileCopy", "clear_unreferenced",
           "shared_folder", "SOURCE_GRAPH"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
#: the source graph's new name when the package graph takes its place
SOURCE_GRAPH = "source.onnx"


def external_files(model: ir.Model) -> dict[Path, list[ir.ExternalTensor]] | None:
    """Every external-data file the model's initializers reference, with their tensors; ``None``
    when some initializer of more than 1 MiB is held in memory (it would have to be written)."""
    found: dict[Path, list[ir.ExternalTensor]] = {}
    resolved: dict[tuple[str, str], Path] = {}  # (base_dir, location) -> file: one resolve per file
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                key = (str(tensor.base_dir), tensor.location)
                path = resolved.get(key)
                if path is None:
                    path = resolved[key] = (Path(tensor.base_dir) / tensor.location).resolve()
                found.setdefault(path, []).append(tensor)
            elif tensor is not None and tensor.nbytes > MiB:
                return None
    return found


def file_record(folder: Path, path: Path) -> dict:
    """``{"file", "size", "fingerprint"}``: sha256 of the first and the last MiB and the size."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(MiB))
        if size > MiB:
            f.seek(max(MiB, size - MiB))
            digest.update(f.read(MiB))
    return {"file": path.relative_to(folder).as_posix(), "size": size, "fingerprint": "sha256:" + digest.hexdigest()}


def check_shared(folder: Path, records: list[dict]) -> None:
    """Refuse a package whose shared base file is missing or changed since extraction."""
    for record in records:
        path = folder / record["file"]
        if not path.is_file():
            raise SharedBaseChangedError(f"{folder}: shared base file {record['file']!r} is missing")
        current = file_record(folder, path)
        if current["size"] != record["size"] or current["fingerprint"] != record["fingerprint"]:
            raise SharedBaseChangedError(
                f"{folder}: shared base file {record['file']!r} changed since the package was made "
                f"(size {current['size']} vs {record['size']}, or its first/last MiB differ); extract the package again"
            )


def _spans(tensors: list[ir.ExternalTensor]) -> list[list[int]]:
    """The byte ranges ``tensors`` occupy in their file, sorted and merged."""
    spans = sorted(((t.offset or 0), (t.offset or 0) + (t.length if t.length is not None else t.nbytes)) for t in tensors)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


#: bytes per ``copy_file_range`` call of :class:`FileCopy` (a cancel is seen between calls)
CHUNK = 256 * MiB


def _copy_span(fin, fout, start: int, end: int, stop: threading.Event | None = None) -> int:
    offset = start
    while offset < end:
        if stop is not None and stop.is_set():
            raise InterruptedError("copy cancelled")
        try:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), min(end - offset, CHUNK), offset, offset)
        except OSError:  # e.g. across file systems on old kernels: plain read/write
            n = 0
        if n == 0:
            fin.seek(offset)
            fout.seek(offset)
            chunk = fin.read(min(end - offset, 64 * MiB))
            if not chunk:
                raise PackageError(f"{fin.name}: ends before byte {end}")
            fout.write(chunk)
            n = len(chunk)
        offset += n
    return end - start


class FileCopy:
    """Copy whole files (``{source: destination}``) in a background thread, by the kernel.

    The thread holds no lock Python code needs (``copy_file_range`` releases the GIL), so the
    caller keeps working meanwhile. :meth:`finish` waits for it, then keeps only the referenced
    ranges (:func:`clear_unreferenced`); :meth:`cancel` (always call it, e.g. in ``finally``)
    stops it between chunks and waits."""

    def __init__(self, pairs: dict[Path, Path]):
        self.pairs = dict(pairs)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="lora-onnx-copy", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for src, dst in self.pairs.items():
                dst.parent.mkdir(parents=True, exist_ok=True)
                with open(src, "rb") as fin, open(dst, "wb") as fout:
                    _copy_span(fin, fout, 0, os.fstat(fin.fileno()).st_size, self._stop)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller by finish()
            self._error = exc

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join()

    def finish(self, kept: dict[Path, list[ir.ExternalTensor]]) -> int:
        """Wait for the copy; clear what ``kept`` (file -> tensors the package references) does
        not reference, and delete copies of files it does not reference at all. Returns the bytes
        cleared."""
        self._thread.join()
        if self._error is not None:
            raise PackageError(f"could not copy the base weights ({type(self._error).__name__}: {first_line(self._error)})")
        cleared = 0
        for src, dst in self.pairs.items():
            if src in kept:
                cleared += clear_unreferenced(dst, kept[src])
            else:
                cleared += dst.stat().st_size
                dst.unlink()
        return cleared


_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02
_fallocate = None


def _punch(fd: int, start: int, length: int) -> bool:
    """``fallocate(PUNCH_HOLE)``: the range reads as zeros and frees its blocks; False where the
    OS or file system has no such call."""
    global _fallocate
    if _fallocate is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.fallocate
            func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            func.restype = ctypes.c_int
            _fallocate = func
        except (OSError, AttributeError):
            _fallocate = False
    if not _fallocate:
        return False
    return _fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, start, length) == 0


def clear_unreferenced(path: Path, tensors: list[ir.ExternalTensor]) -> int:
    """Zero every byte of ``path`` outside the ranges of ``tensors`` (punched out where the file
    system can, else overwritten with zeros); returns the bytes cleared."""
    size = path.stat().st_size
    gaps, at = [], 0
    for start, end in _spans(tensors):
        if start > at:
            gaps.append((at, min(start, size)))
        at = max(at, end)
    if at < size:
        gaps.append((at, size))
    cleared = 0
    with open(path, "r+b") as f:
        fd = f.fileno()
        for start, end in gaps:
            if end <= start:
                continue
            cleared += end - start
            if _punch(fd, start, end - start):
                continue
            f.seek(start)
            left = end - start
            while left:
                n = min(left, 16 * MiB)
                f.write(bytes(n))
                left -= n
    return cleared


@contextlib.contextmanager
def shared_folder(folder: Path, names: list[str], *, source_graph: Path | None) -> Iterator[Path]:
    """Stage package parts in a temp folder inside ``folder``; on success move each of ``names``
    into ``folder`` (the manifest last), after renaming ``source_graph`` (when it is about to be
    replaced) to :data:`SOURCE_GRAPH`. Nothing is moved when the body fails."""
    tmp = Path(tempfile.mkdtemp(prefix=".package.tmp-", dir=folder))
    try:
        yield tmp
        if source_graph is not None and source_graph.parent == folder and source_graph.name in names:
            os.replace(source_graph, folder / SOURCE_GRAPH)
        for name in names:
            target = folder / name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(tmp / name, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

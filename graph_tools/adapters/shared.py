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
  the source's folder, each file is copied range by range (``os.copy_file_range``: the kernel
  copies, no bytes pass through Python) to the same offsets in the package; only the ranges the
  package graph references are copied, so the LoRA ranges are holes (zeros) in the copy and no
  adapter bytes ship with the base. Otherwise the graph is saved the ordinary onnx-ir way.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import onnx_ir as ir

from graph_tools.errors import PackageError, SharedBaseChangedError

__all__ = ["external_files", "file_record", "check_shared", "copy_ranges", "shared_folder", "SOURCE_GRAPH"]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
#: the source graph's new name when the package graph takes its place
SOURCE_GRAPH = "source.onnx"


def external_files(model: ir.Model) -> dict[Path, list[ir.ExternalTensor]] | None:
    """Every external-data file the model's initializers reference, with their tensors; ``None``
    when some initializer of more than 1 MiB is held in memory (it would have to be written)."""
    found: dict[Path, list[ir.ExternalTensor]] = {}
    for graph in model.graphs():
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor):
                found.setdefault((Path(tensor.base_dir) / tensor.location).resolve(), []).append(tensor)
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


def copy_ranges(src: Path, dst: Path, tensors: list[ir.ExternalTensor]) -> int:
    """Copy the byte ranges of ``tensors`` from ``src`` to the same offsets of ``dst`` (a sparse
    file of ``src``'s size); returns the bytes copied."""
    spans = sorted(((t.offset or 0), (t.offset or 0) + (t.length if t.length is not None else t.nbytes)) for t in tensors)
    merged: list[list[int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    copied = 0
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        fout.truncate(src.stat().st_size)
        for start, end in merged:
            copied += _copy_span(fin, fout, start, end)
    return copied


def _copy_span(fin, fout, start: int, end: int) -> int:
    offset = start
    while offset < end:
        try:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), end - offset, offset, offset)
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

"""The supervisor's side of weight sharing: ONNX models read once into one read-only shared segment.

Segment layout (all offsets from the start of the segment)::

    [0, 64)           header: magic, catalog offset, catalog length
    [64, ...)         tensor data, each tensor aligned to 64 bytes
    [catalog, end)    the pickled catalog: for every model, its *skeleton* (the ModelProto with the
                      bytes of every shared tensor removed) and where each tensor lies

A worker needs nothing but the segment's descriptor: it reads the catalog from the segment and
builds its sessions from it (``sessions.py``). In the skeleton every shared tensor is EXTERNAL
data at its true offset in the segment's file in ``/dev/shm``: the session gets the bytes as
zero-copy initializers, and the graph optimizers, which read initializers by path, find them too. Small tensors (shape constants and the like) stay
inside the skeleton, where ONNX Runtime's constant folding wants them; sharing them would save
nothing.

Every check on the model files (paths that escape the model directory, shapes that do not fit
their data, unsupported tensor types) runs before the segment is allocated.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import pickle
import struct
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, TensorProto, numpy_helper

from shmengine.errors import ModelLoadError
from shmengine.runtime.sharedmem import ALIGNMENT, SharedSegment, align_up

__all__ = [
    "ModelSource",
    "TensorEntry",
    "TensorSpec",
    "ModelEntry",
    "WeightStore",
    "read_catalog",
    "resolve_model_file",
    "storage_dtype",
]

logger = logging.getLogger("shmengine")


# Tensors up to this size stay in the skeleton.
INLINE_LIMIT = 4096
# Tensors from this size on are stored once when several graphs of the store hold the same bytes.
DEDUPLICATE_FROM = 1 << 20
# Nothing this engine can load is larger; a shape claiming more is corrupt or hostile.
MAX_TENSOR_BYTES = 1 << 40

_MAGIC = b"SHMENGW1"
_HEADER = struct.Struct("<8sQQ")

# ONNX element type -> numpy dtype the bytes are stored as. bfloat16 and float8 have no numpy
# dtype: they are stored as raw integers and handed to ORT with their ONNX type.
_STORAGE = {
    TensorProto.FLOAT: np.float32,
    TensorProto.FLOAT16: np.float16,
    TensorProto.DOUBLE: np.float64,
    TensorProto.INT8: np.int8,
    TensorProto.INT16: np.int16,
    TensorProto.INT32: np.int32,
    TensorProto.INT64: np.int64,
    TensorProto.UINT8: np.uint8,
    TensorProto.UINT16: np.uint16,
    TensorProto.UINT32: np.uint32,
    TensorProto.UINT64: np.uint64,
    TensorProto.BOOL: np.bool_,
    TensorProto.BFLOAT16: np.uint16,
    TensorProto.FLOAT8E4M3FN: np.uint8,
    TensorProto.FLOAT8E4M3FNUZ: np.uint8,
    TensorProto.FLOAT8E5M2: np.uint8,
    TensorProto.FLOAT8E5M2FNUZ: np.uint8,
}
RAW_ONNX_TYPES = frozenset(
    {
        TensorProto.BFLOAT16,
        TensorProto.FLOAT8E4M3FN,
        TensorProto.FLOAT8E4M3FNUZ,
        TensorProto.FLOAT8E5M2,
        TensorProto.FLOAT8E5M2FNUZ,
    }
)


def storage_dtype(elem_type: int) -> np.dtype | None:
    """The numpy dtype a tensor of this ONNX type is stored as, or None if it cannot be shared."""
    dtype = _STORAGE.get(elem_type)
    return np.dtype(dtype) if dtype is not None else None


@dataclass(frozen=True)
class TensorEntry:
    """Where one shared tensor lies in the segment."""

    name: str
    elem_type: int
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output as the model declares it; dims are ints, names, or None."""

    name: str
    elem_type: int
    shape: tuple[int | str | None, ...] | None
    optional: bool = False

    @property
    def dtype(self) -> np.dtype | None:
        if self.elem_type == TensorProto.STRING:
            return np.dtype(object)
        return storage_dtype(self.elem_type)

    @property
    def type_name(self) -> str:
        return TensorProto.DataType.Name(self.elem_type).lower()


@dataclass
class ModelEntry:
    """One ONNX model of the store."""

    key: str
    source: str
    skeleton: bytes
    tensors: list[TensorEntry]
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def shared_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The ``.onnx`` file a path names: the file itself, or the one model file of a directory."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist")
    if p.is_dir():
        if (p / "model.onnx").is_file():
            return p / "model.onnx"
        candidates = sorted(p.glob("*.onnx"))
        if len(candidates) == 1:
            return candidates[0]
        if not candidates:
            raise ModelLoadError(f"model directory {str(p)!r} holds no .onnx file")
        names = ", ".join(c.name for c in candidates)
        raise ModelLoadError(
            f"model directory {str(p)!r} holds several .onnx files ({names}); name the file to load"
        )
    return p


def _subgraphs(graph: GraphProto) -> Iterator[GraphProto]:
    """Every graph nested in ``graph``'s nodes (If/Loop/Scan bodies), depth first."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield attr.g
                yield from _subgraphs(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield g
                    yield from _subgraphs(g)


def _value_specs(values, initializer_names: set[str]) -> list[TensorSpec]:
    specs = []
    for v in values:
        if v.name in initializer_names:
            optional = True  # IR < 4: an input with an initializer is an overridable default
        else:
            optional = False
        t = v.type.tensor_type
        shape = None
        if t.HasField("shape"):
            shape = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim
            )
        specs.append(TensorSpec(v.name, t.elem_type, shape, optional))
    return specs


@dataclass
class _Planned:
    """A tensor to be shared: where its bytes come from now, and where they go."""

    proto: TensorProto
    dtype: np.dtype
    shape: tuple[int, ...]
    nbytes: int
    external: tuple[Path, int] | None  # (file, offset) when the bytes live in an external file
    offset: int = 0
    duplicate: bool = False  # the same bytes are stored for an earlier tensor, at ``offset``

    def digest(self) -> bytes:
        """A hash of the tensor's bytes (read from its file, or from the proto)."""
        h = hashlib.blake2b(digest_size=20)
        if self.external is not None:
            file, start = self.external
            with open(file, "rb", buffering=0) as f:
                f.seek(start)
                left = self.nbytes
                while left:
                    chunk = f.read(min(left, 1 << 24))
                    if not chunk:
                        break
                    h.update(chunk)
                    left -= len(chunk)
        elif self.proto.HasField("raw_data"):
            h.update(self.proto.raw_data)
        else:
            h.update(np.ascontiguousarray(numpy_helper.to_array(self.proto)).view(np.uint8).reshape(-1).data)
        return h.digest()


@dataclass
class ModelSource:
    """One graph for the store: its file, and optionally the file already parsed (without its
    external data) and edited in memory (``transforms.py``), so it is not read twice."""

    path: Path
    model: onnx.ModelProto | None = None


class _ModelReader:
    """Reads one ONNX file, checks it, and plans which tensors go to the shared segment."""

    def __init__(self, key: str, path: Path, model: onnx.ModelProto | None = None):
        self.key = key
        self.path = path
        self.directory = path.parent.resolve()
        try:
            self.model = model if model is not None else onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError, or an OSError
            raise ModelLoadError(
                f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                "expected a file written by onnx.save or an exporter such as optimum-cli"
            ) from exc
        if not self.model.graph.node and not self.model.graph.output:
            raise ModelLoadError(f"{str(path)!r} parsed as protobuf but holds no ONNX graph")
        self.planned: list[_Planned] = []
        self._file_sizes: dict[Path, int] = {}
        self._plan()

    # -- checks -------------------------------------------------------------------------------

    def _external_file(self, tensor: TensorProto, location: str) -> Path:
        where = f"tensor {tensor.name!r} of {str(self.path)!r}"
        if not location:
            raise ModelLoadError(f"{where} has external data without a location")
        if os.path.isabs(location):
            raise ModelLoadError(
                f"{where} points its external data at an absolute path {location!r}; external "
                "data must lie inside the model directory"
            )
        resolved = (self.directory / location).resolve()
        if os.path.commonpath([resolved, self.directory]) != str(self.directory):
            raise ModelLoadError(
                f"{where} points its external data at {location!r}, which resolves to "
                f"{str(resolved)!r}, outside the model directory {str(self.directory)!r} "
                "(through '..' or a symbolic link); refusing to read it"
            )
        if not resolved.is_file():
            raise ModelLoadError(f"{where} needs external data file {str(resolved)!r}, which is missing")
        return resolved

    def _file_size(self, file: Path) -> int:
        if file not in self._file_sizes:
            self._file_sizes[file] = file.stat().st_size
        return self._file_sizes[file]

    def _check_shape(self, tensor: TensorProto, itemsize: int) -> tuple[tuple[int, ...], int]:
        shape = tuple(int(d) for d in tensor.dims)
        if any(d < 0 for d in shape):
            raise ModelLoadError(f"tensor {tensor.name!r} of {str(self.path)!r} has a negative dimension {shape}")
        count = 1
        for d in shape:
            count *= d
        nbytes = count * itemsize
        if nbytes > MAX_TENSOR_BYTES:
            raise ModelLoadError(
                f"tensor {tensor.name!r} of {str(self.path)!r} declares shape {shape} "
                f"({nbytes} bytes), beyond anything loadable; the file is corrupt"
            )
        return shape, nbytes

    # -- planning -----------------------------------------------------------------------------

    def _plan(self) -> None:
        graph = self.model.graph
        subgraphs = list(_subgraphs(graph))
        # Names defined anywhere in the model: a subgraph initializer whose name is defined only
        # once can move to the main graph (the subgraph then reads it from the outer scope),
        # which is where ORT takes initializers supplied through the session options.
        definitions: Counter[str] = Counter()
        for g in [graph, *subgraphs]:
            definitions.update(t.name for t in g.initializer)
            definitions.update(v.name for v in g.input)
            definitions.update(o for n in g.node for o in n.output)

        for tensor in list(graph.initializer):
            self._plan_tensor(tensor)
        for sub in subgraphs:
            for tensor in list(sub.initializer):
                if self._plan_tensor(tensor, dry_run=True) and definitions[tensor.name] == 1:
                    graph.initializer.append(tensor)
                    sub.initializer.remove(tensor)
                    self._plan_tensor(graph.initializer[-1])
                else:
                    self._plan_tensor(tensor, share=False)

    def _plan_tensor(self, tensor: TensorProto, *, dry_run: bool = False, share: bool = True) -> bool:
        """Decide whether ``tensor`` is shared; check it; return True if it would be."""
        dtype = storage_dtype(tensor.data_type)
        is_external = tensor.data_location == TensorProto.EXTERNAL
        if dtype is None:
            if is_external and not dry_run:
                self._inline_external(tensor)
            return False
        shape, nbytes = self._check_shape(tensor, dtype.itemsize)
        source = None
        if is_external:
            info = {e.key: e.value for e in tensor.external_data}
            file = self._external_file(tensor, info.get("location", ""))
            try:
                offset = int(info.get("offset", 0))
                length = int(info.get("length", nbytes))
            except ValueError as exc:
                raise ModelLoadError(f"tensor {tensor.name!r}: malformed external data offset/length") from exc
            if length != nbytes or offset < 0:
                raise ModelLoadError(
                    f"tensor {tensor.name!r} of {str(self.path)!r} declares shape {shape} "
                    f"({nbytes} bytes) but its external data holds {length} bytes at offset {offset}"
                )
            if offset + nbytes > self._file_size(file):
                raise ModelLoadError(
                    f"tensor {tensor.name!r} of {str(self.path)!r} needs bytes [{offset}, {offset + nbytes}) "
                    f"of {str(file)!r}, which has only {self._file_size(file)} bytes; the data file is "
                    "truncated or does not belong to this model"
                )
            source = (file, offset)
        elif tensor.HasField("raw_data"):
            if len(tensor.raw_data) != nbytes:
                raise ModelLoadError(
                    f"tensor {tensor.name!r} of {str(self.path)!r} declares shape {shape} ({nbytes} bytes) "
                    f"but holds {len(tensor.raw_data)} bytes"
                )
        elif _typed_count(tensor) != nbytes // dtype.itemsize:
            raise ModelLoadError(
                f"tensor {tensor.name!r} of {str(self.path)!r} declares shape {shape} "
                f"({nbytes // dtype.itemsize} values) but holds {_typed_count(tensor)} values"
            )
        if dry_run:
            return nbytes > INLINE_LIMIT
        if share and nbytes > INLINE_LIMIT:
            self.planned.append(_Planned(tensor, dtype, shape, nbytes, source))
            return True
        if is_external:
            self._inline_external(tensor, source, nbytes)
        return False

    def _inline_external(self, tensor: TensorProto, source=None, nbytes=None) -> None:
        """Bring a small (or unshareable) external tensor's bytes into the skeleton."""
        if source is None:
            info = {e.key: e.value for e in tensor.external_data}
            file = self._external_file(tensor, info.get("location", ""))
            offset, length = int(info.get("offset", 0)), info.get("length")
            with open(file, "rb") as f:
                f.seek(offset)
                data = f.read(int(length)) if length is not None else f.read()
        else:
            with open(source[0], "rb") as f:
                f.seek(source[1])
                data = f.read(nbytes)
        tensor.raw_data = data
        tensor.data_location = TensorProto.DEFAULT
        del tensor.external_data[:]

    # -- writing ------------------------------------------------------------------------------

    def copy_into(self, buffer: memoryview) -> None:
        """Copy every planned tensor's bytes to its place in ``buffer``."""
        for item in self.planned:
            if item.duplicate:
                release_proto_data(item.proto)
                continue
            dest = buffer[item.offset : item.offset + item.nbytes]
            if item.external is not None:
                file, offset = item.external
                with open(file, "rb", buffering=0) as f:
                    f.seek(offset)
                    filled = 0
                    while filled < item.nbytes:
                        n = f.readinto(dest[filled:])
                        if not n:
                            raise ModelLoadError(f"{str(file)!r} ended early while reading {item.proto.name!r}")
                        filled += n
            elif item.proto.HasField("raw_data"):
                dest[:] = item.proto.raw_data
            else:  # typed fields (float_data, int64_data, ...): let onnx decode them
                array = np.ascontiguousarray(numpy_helper.to_array(item.proto))
                dest[:] = array.view(np.uint8).reshape(-1)
            release_proto_data(item.proto)

    def entry(self, segment_name: str) -> ModelEntry:
        for item in self.planned:
            point_at_segment(item.proto, segment_name, item.offset, item.nbytes)
        graph = self.model.graph
        initializer_names = {t.name for t in graph.initializer}
        inputs = _value_specs(graph.input, initializer_names)
        metadata = {p.key: p.value for p in self.model.metadata_props}
        return ModelEntry(
            key=self.key,
            source=str(self.path),
            skeleton=self.model.SerializeToString(),
            tensors=[
                TensorEntry(i.proto.name, i.proto.data_type, i.shape, i.offset, i.nbytes) for i in self.planned
            ],
            inputs=inputs,
            outputs=_value_specs(graph.output, set()),
            metadata=metadata,
        )


_TYPED_FIELDS = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")


def _typed_count(tensor: TensorProto) -> int:
    """Values stored in a tensor's typed fields (the one of them its data type uses)."""
    return max(len(getattr(tensor, name)) for name in _TYPED_FIELDS)


def release_proto_data(tensor: TensorProto) -> None:
    """Drop a tensor's bytes from the proto (they now live in the segment)."""
    for name in ("raw_data", *_TYPED_FIELDS):
        tensor.ClearField(name)


def point_at_segment(tensor: TensorProto, segment_name: str, offset: int, nbytes: int) -> None:
    """Make ``tensor`` external data at ``offset`` of the segment file (relative to ``/dev/shm``)."""
    release_proto_data(tensor)
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", segment_name), ("offset", str(offset)), ("length", str(nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def check_model_file(path: str | os.PathLike) -> None:
    """Run the store's checks on one model file (external data inside its directory, shapes that
    fit their data) without packing anything; raises :class:`ModelLoadError`."""
    _ModelReader("check", resolve_model_file(path))


class WeightStore:
    """All weights of one or several ONNX models, packed once into one read-only shared segment.

    >>> store = WeightStore.load({"model": "path/to/model.onnx"})   # doctest: +SKIP
    >>> store.nbytes, store.catalog["model"].inputs                  # doctest: +SKIP

    The segment's descriptor (``store.segment.fd``) is all a worker needs: see
    :func:`read_catalog` and ``sessions.py``. ``close()`` drops this process's mapping and removes
    the segment's name; the memory goes back to the system when the last worker holding it is gone.
    """

    def __init__(self, segment: SharedSegment, catalog: dict[str, ModelEntry]):
        self.segment = segment
        self.catalog = catalog

    @classmethod
    def load(
        cls,
        models: Mapping[str, str | os.PathLike | ModelSource],
        graph_edits: Mapping[str, Callable[[onnx.ModelProto], object]] | None = None,
    ) -> "WeightStore":
        """Read each ``key -> path`` ONNX model (or :class:`ModelSource`, prepared by
        ``transforms.prepare_models``); every tensor larger than 4 KiB is shared.

        ``graph_edits`` (key -> function) may change a model's graph, not its weights, before
        its weights are packed, so that every worker builds its session on the edited graph.
        Edits that change weights are transforms (``transforms.py``), made before this.
        """
        readers = []
        for key, source in models.items():
            if isinstance(source, ModelSource):
                readers.append(_ModelReader(key, resolve_model_file(source.path), source.model))
            else:
                readers.append(_ModelReader(key, resolve_model_file(source)))
            edit = (graph_edits or {}).get(key)
            if edit is not None:
                edit(readers[-1].model)
        offset = ALIGNMENT  # the header occupies the first 64 bytes
        # The graphs of one model often hold the same tensor twice (a seq2seq export's encoder
        # and decoder each carry the shared embedding: 114 MiB twice on Marian-base): identical
        # bytes are stored once and every graph points at them.
        stored: dict[tuple, int] = {}
        for reader in readers:
            for item in reader.planned:
                key = None
                if item.nbytes >= DEDUPLICATE_FROM:
                    key = (item.proto.data_type, item.shape, item.digest())
                    if key in stored:
                        item.offset, item.duplicate = stored[key], True
                        continue
                item.offset = offset
                offset = align_up(offset + item.nbytes)
                if key is not None:
                    stored[key] = item.offset
        data_end = offset
        # Writing the data first lets each proto drop its bytes before the skeleton is serialised.
        segment = SharedSegment.create(data_end)
        try:
            for reader in readers:
                reader.copy_into(segment.buffer)
            catalog = {reader.key: reader.entry(segment.name) for reader in readers}
            blob = pickle.dumps(catalog, protocol=5)
            segment.resize(data_end + len(blob))
            segment.buffer[data_end:] = blob
            segment.buffer[: _HEADER.size] = _HEADER.pack(_MAGIC, data_end, len(blob))
            segment.freeze()
        except BaseException:
            segment.close()
            segment.unlink()
            raise
        del readers  # the parsed protos (as large as the weights for inline models) go now...
        _return_heap_to_os()  # ...and their pages back to the system, not to malloc's free lists
        store = cls(segment, catalog)
        logger.info(
            "weight store: %d model(s), %d shared tensors, %.1f MiB in one shared segment",
            len(catalog),
            sum(len(e.tensors) for e in catalog.values()),
            store.nbytes / 2**20,
        )
        return store

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in the segment (a tensor several graphs share counts once)."""
        return sum(n for _, n in {(t.offset, t.nbytes) for e in self.catalog.values() for t in e.tensors})

    def discard_tensor_data(self) -> None:
        """Free the tensor pages once every worker loads its weights from elsewhere (prepacked
        model files); the catalog stays."""
        _, catalog_offset, _ = _HEADER.unpack_from(self.segment.buffer, 0)
        self.segment.discard(ALIGNMENT, catalog_offset // 4096 * 4096)

    def close(self) -> None:
        self.segment.close()
        self.segment.unlink()


def _return_heap_to_os() -> None:
    """glibc keeps freed heap memory for reuse; after parsing a large model that is hundreds of
    MiB the supervisor would hold for nothing. ``malloc_trim`` gives it back (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_catalog(segment: SharedSegment) -> dict[str, ModelEntry]:
    """Worker side: the catalog written by :meth:`WeightStore.load` into ``segment``."""
    magic, offset, length = _HEADER.unpack_from(segment.buffer, 0)
    if magic != _MAGIC:
        raise ModelLoadError("the shared segment does not hold a shmengine weight store")
    return pickle.loads(segment.buffer[offset : offset + length])

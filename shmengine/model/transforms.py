"""Model transforms: what is done to a model's graphs before the weight store packs their weights.

::

    model files ─▶ parse once ─▶ compute_type resolved (CTranslate2's rules, per device)
                       │
                       ├─ only graph edits chosen ──▶ edited in memory ──────────────────┐
                       │                                                                  ▼
                       └─ a weight transform chosen ─▶ cache hit? ── yes ─▶ cached file ─▶ WeightStore
                                (quantize, cast)            │ no                          (one segment,
                                                            ▼                              every worker)
                                    load weights, run every chosen transform in order,
                                    save file + key (under a file lock), then as above

A :class:`Transform` is chosen by a :class:`TransformTarget` — the device, the resolved compute
type and (for tensor parallelism, later) the rank and world size — and the graph's *role*
(``"decoder"`` for a Generator's graph, ``"seq2seq_encoder"``, ``"seq2seq_decoder"``,
``"encoder"``, ``"graph"`` for an Engine's). Transforms run in registration order. One that
changes weights (``needs_weights``) makes the whole chain run on the loaded model and its
result is cached on disk, keyed by the model files (size + mtime), ONNX Runtime's and onnx's
versions and the transforms with their options: the second start reads the cached file and
quantizes nothing. The cache lives beside the model (``<model dir>/.shmengine-cache``) when that
directory is writable, else in ``$XDG_CACHE_HOME/shmengine`` (``~/.cache/shmengine``);
``SHMENGINE_CACHE_DIR`` overrides both.

``get_supported_compute_types(device)`` is read from the registry: a compute type is supported
on a device when a registered transform produces it there (float32 always is). A tensor-parallel
shard transform is one more :func:`register` call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
from onnx import ModelProto, TensorProto

from shmengine.errors import ModelLoadError

if TYPE_CHECKING:
    from shmengine.model.weights import ModelSource

__all__ = [
    "COMPUTE_TYPES",
    "Transform",
    "TransformTarget",
    "PreparedModels",
    "NotApplicableError",
    "register",
    "registered",
    "supported_compute_types",
    "check_compute_type",
    "resolve_compute_type",
    "model_compute_type",
    "prepare_models",
    "cache_root",
    "all_graphs",
]

logger = logging.getLogger("shmengine")

# CTranslate2's names, with CTranslate2's meanings (its docs/quantization.md).
COMPUTE_TYPES = (
    "default",
    "auto",
    "float32",
    "int8",
    "int8_float32",
    "int8_float16",
    "int8_bfloat16",
    "int16",
    "float16",
    "bfloat16",
)
_FLOAT_PART = {
    "float32": "float32",
    "int8_float32": "float32",
    "int16": "float32",
    "int8_float16": "float16",
    "float16": "float16",
    "int8_bfloat16": "bfloat16",
    "bfloat16": "bfloat16",
}


class NotApplicableError(ValueError):
    """Raised by a transform that cannot do its work on this graph (it says why); the model then
    runs without it, at the compute type the graph has, and the reason is logged."""


@dataclass(frozen=True)
class TransformTarget:
    """What a model is being prepared for (decided before any worker starts)."""

    device: str  # "cpu" or "cuda" (already resolved from "auto")
    compute_type: str  # a resolved compute type: float32, int8_float32, float16, ...
    rank: int = 0
    world_size: int = 1
    runner: str = "host"  # how the workers hold tensors between steps: runtime.target.RUNNER_KINDS


@dataclass(frozen=True)
class Transform:
    """One registered model transform.

    ``apply(model, target)`` edits ``model`` in place; it raises :class:`NotApplicableError`
    when the graph does not allow it. ``compute_types`` are the types it produces (empty for a
    transform that keeps the precision, such as a graph edit); ``needs_weights``: whether it
    reads or changes weight bytes (its output is then cached on disk). ``version`` is part of
    the cache key: bump it whenever the output of ``apply`` changes.
    """

    name: str
    apply: Callable[[ModelProto, TransformTarget], object]
    devices: frozenset[str] = frozenset({"cpu", "cuda"})
    roles: frozenset[str] | None = None  # None: every role
    compute_types: frozenset[str] = frozenset()
    needs_weights: bool = False
    version: int = 1
    options: Mapping[str, object] = field(default_factory=dict)  # part of the cache key
    # a cheap test on the graph without its weights: raises NotApplicableError before any load
    check: Callable[[ModelProto, TransformTarget], object] | None = None
    # whether a graph needs it at all (a widening to float32 of a graph that is float32 does not)
    wanted: Callable[[ModelProto], bool] | None = None
    # the compute types it makes a device able to run (get_supported_compute_types); default:
    # compute_types. A step of another type's chain (the widening before int8) provides less.
    provides: frozenset[str] | None = None
    # the runners it serves (None: every one); a graph edit for the bound runner's IOBinding
    # path would only cost the host runner time
    runners: frozenset[str] | None = None

    def selected(self, role: str, target: TransformTarget) -> bool:
        if target.device not in self.devices or (self.roles is not None and role not in self.roles):
            return False
        if self.runners is not None and target.runner not in self.runners:
            return False
        return not self.compute_types or target.compute_type in self.compute_types


_REGISTRY: list[Transform] = []


def register(transform: Transform) -> Transform:
    """Add a transform (after the ones registered before it); returns it."""
    if any(t.name == transform.name for t in _REGISTRY):
        raise ValueError(f"a transform named {transform.name!r} is registered already")
    _REGISTRY.append(transform)
    return transform


def registered() -> list[Transform]:
    _load_builtin()
    return list(_REGISTRY)


def supported_compute_types(device: str) -> set[str]:
    """Concrete compute types this engine can run on ``device`` (``"cpu"`` or ``"cuda"``)."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    types = {"float32"}
    for t in registered():
        if device in t.devices:
            types |= t.compute_types if t.provides is None else t.provides
    if "int8_float32" in types or "int8_float16" in types:
        types.add("int8")  # CTranslate2 lists the plain name beside the variants
    return types


def check_compute_type(compute_type) -> str:
    """The compute_type argument, checked: one of CTranslate2's names, else a ValueError listing them."""
    if not isinstance(compute_type, str) or compute_type not in COMPUTE_TYPES:
        raise ValueError(f"invalid compute_type {compute_type!r}; valid values: {', '.join(COMPUTE_TYPES)}")
    return compute_type


def model_compute_type(model: ModelProto) -> str:
    """The compute type a graph already has: its weight products' (MatMul, Gemm, Conv) weight
    type, ``int8_<float>`` when it is quantized. Weights stored in float16 behind a ``Cast`` to
    float32 compute in float32."""
    initializers = {t.name: t.data_type for g in all_graphs(model.graph) for t in g.initializer}
    counts: dict[int, int] = {}
    quantized = False
    for node in _all_nodes(model.graph):
        if node.op_type in _QUANTIZED_OPS:
            quantized = True
        elif node.op_type in ("MatMul", "Gemm", "Conv") and len(node.input) > 1 and node.input[1] in initializers:
            kind = initializers[node.input[1]]
            counts[kind] = counts.get(kind, 0) + 1
    main = max(counts, key=counts.get) if counts else TensorProto.FLOAT
    float_part = {TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16"}.get(main, "float32")
    return "int8_" + float_part if quantized else float_part


_QUANTIZED_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "MatMulNBits", "QLinearMatMul", "MatMulIntegerToFloat"})


def _available(device: str) -> set[str]:
    return supported_compute_types(device) - {"int8"}


def resolve_compute_type(requested: str, model_type: str, device: str, *, fallback: bool = False) -> str:
    """CTranslate2's ``resolve_compute_type`` (src/types.cc) over what is registered here.

    An explicit type the device cannot run raises ``ValueError`` (CTranslate2 does the same);
    ``default`` (the graph's own type), ``auto`` and ``int8`` fall back along CTranslate2's order.
    """
    have = _available(device)
    requested = check_compute_type(requested)

    def unsupported(name: str):
        raise ValueError(
            f"compute_type={name!r} is not supported on {device}: the device or this engine has no "
            f"efficient {name} path. Supported on {device}: {', '.join(sorted(supported_compute_types(device)))}"
        )

    def first(name: str, chain: list[str]) -> str:
        if name in have:
            return name
        if not fallback:
            unsupported(name)
        return next((c for c in chain if c in have), "float32")

    if requested == "default":
        return resolve_compute_type(model_type, model_type, device, fallback=True)
    if requested == "auto":
        chain = ["int8_float16", "int8_float32", "float16"] if device == "cuda" else ["int8_float32", "int16"]
        return next((c for c in chain if c in have), "float32")
    if requested == "float32":
        return "float32"
    if requested in ("float16", "bfloat16"):
        return first(requested, [])
    if requested == "int16":
        return first("int16", ["int8_float32"] if device == "cpu" else ["float16"])
    if requested == "int8":
        wanted = "int8_" + _FLOAT_PART.get(model_type, "float32")
        resolved = resolve_compute_type(wanted, model_type, device, fallback=True)
        if not resolved.startswith("int8"):
            # CTranslate2 runs int8_float32 on CUDA too; here the int8 weights a device has
            # come with another float type (int8_float16 on CUDA): the nearest int8 it runs
            resolved = next((c for c in ("int8_float32", "int8_float16", "int8_bfloat16") if c in have), None)
            if resolved is None:
                unsupported("int8")
        return resolved
    if requested == "int8_float32":
        return first("int8_float32", ["int16"] if device == "cpu" else ["float16"])
    if requested == "int8_float16":
        return first("int8_float16", ["int8_float32", "float16", "int16"])
    return first("int8_bfloat16", ["int8_float32", "bfloat16"])  # int8_bfloat16


# -- preparing a model's graphs -------------------------------------------------------------------


@dataclass
class PreparedModels:
    """What :func:`prepare_models` hands the weight store: per graph key, the model parsed and
    edited in memory (its weights still in its files) or the path of a transformed file; the
    compute type that runs; and which transforms ran on each graph."""

    models: dict[str, ModelSource]
    compute_type: str
    applied: dict[str, list[str]]


def cache_root(model_file: Path) -> Path:
    """Where transformed models of ``model_file`` are cached (see the module docstring)."""
    override = os.environ.get("SHMENGINE_CACHE_DIR")
    if override:
        return Path(override)
    beside = model_file.parent / ".shmengine-cache"
    # Decided without creating anything: a model that needs no transformed file leaves no
    # directory behind (the directory is made when the first transformed file is written).
    if os.access(beside if beside.is_dir() else model_file.parent, os.W_OK):
        return beside
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shmengine"


def _source_files(path: Path, model: ModelProto) -> list[Path]:
    files = {path}
    for g in all_graphs(model.graph):
        for t in g.initializer:
            if t.data_location == TensorProto.EXTERNAL:
                for e in t.external_data:
                    if e.key == "location":
                        files.add(path.parent / e.value)
    return sorted(files)


def _stats(files) -> list[list]:
    out = []
    for f in files:
        try:
            st = Path(f).stat()
            out.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
        except OSError:  # a missing data file: the weight store's checks say so, clearly
            out.append([str(f), -1, -1])
    return out


@dataclass
class _GraphInfo:
    """What the choice of transforms needs to know of a graph, read without its weights; kept in
    the cache beside the transformed files, so that a start that finds its transformed model
    there does not parse the source model at all (for an inline 650 MB export, a parse holds as
    much memory again while it lasts)."""

    own_type: str
    wanted: dict[str, bool]
    not_applicable: dict[str, str | None]
    files: list[list]  # [path, size, mtime_ns] of the model file and its external data files

    @classmethod
    def of(cls, path: Path, model: ModelProto) -> "_GraphInfo":
        wanted, refused = {}, {}
        for t in registered():
            wanted[t.name] = t.wanted is None or bool(t.wanted(model))
            refused[t.name] = None
            if t.check is not None:
                try:
                    t.check(model, TransformTarget("cpu", "float32"))
                except NotApplicableError as exc:
                    refused[t.name] = str(exc)
        return cls(model_compute_type(model), wanted, refused, _stats(_source_files(path, model)))


def _info_file(path: Path) -> Path:
    st = path.stat()
    tag = hashlib.sha256(json.dumps([str(path.resolve()), st.st_size, st.st_mtime_ns, _code_digest(registered())])
                         .encode()).hexdigest()[:24]
    return cache_root(path) / f"info-{path.stem}-{tag}.json"


def _read_info(path: Path) -> _GraphInfo | None:
    try:
        info = _GraphInfo(**json.loads(_info_file(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None
    if _stats(f for f, _, _ in info.files) != info.files:
        return None  # an external data file changed
    return info


def _write_info(path: Path, info: _GraphInfo) -> None:
    try:
        target = _info_file(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(info.__dict__))
        os.replace(temporary, target)
    except OSError as exc:  # a read-only cache costs a parse per start, nothing else
        logger.info("could not record %s in the transform cache: %s", path, exc)


def _ort_version() -> str:
    """ONNX Runtime's version without importing it (an import costs the supervisor ~20 MiB)."""
    from importlib import metadata

    for name in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    import onnxruntime

    return onnxruntime.__version__


def _code_digest(chain: list[Transform]) -> str:
    """A digest of the source of the modules the chain's functions live in: a changed transform
    must not be answered from a cache made by the old code, version bump forgotten or not."""
    import inspect
    import sys

    digest = hashlib.sha256()
    for name in sorted({t.apply.__module__ for t in chain} | {"shmengine.model.quantize", "shmengine.model.precision",
                                                             "shmengine.model.graph_edits", "shmengine.model.builtin_transforms",
                                                             "shmengine.model.attention"}):
        module = sys.modules.get(name)
        try:
            digest.update(inspect.getsource(module).encode() if module else name.encode())
        except (OSError, TypeError):
            digest.update(name.encode())
    return digest.hexdigest()[:16]


def _cache_key(info: _GraphInfo, chain: list[Transform], target: TransformTarget) -> str:
    from shmengine import __version__

    key = {
        "files": info.files,
        "onnxruntime": _ort_version(),
        "onnx": onnx.__version__,
        "shmengine": __version__,
        "code": _code_digest(chain),
        "target": [target.device, target.compute_type, target.rank, target.world_size],
        "transforms": [[t.name, t.version, {k: repr(v) for k, v in sorted(t.options.items())}] for t in chain],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _transformed_file(path: Path, info: _GraphInfo, chain: list[Transform], target: TransformTarget) -> Path:
    """The cached result of ``chain`` on ``path``: made now (under a lock) unless it exists."""
    from filelock import FileLock

    key = _cache_key(info, chain, target)
    root = cache_root(path)
    root.mkdir(parents=True, exist_ok=True)
    entry = root / f"{path.stem}-{key}"
    result = entry / "model.onnx"
    with FileLock(str(entry) + ".lock"):
        if (entry / "DONE").is_file():
            logger.info("compute type %s: using the cached transformed model %s", target.compute_type, result)
            return result
        from shmengine.model.weights import check_model_file

        check_model_file(path)  # the store's checks on paths and sizes, before onnx reads any data
        full = onnx.load(str(path))  # with its external data: the transforms read the weights
        for t in chain:
            t.apply(full, target)
        work = Path(tempfile.mkdtemp(prefix=entry.name + ".", dir=root))
        try:
            onnx.save(full, str(work / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                      size_threshold=1024)
            (work / "key.json").write_text(json.dumps({"source": str(path), "transforms": [t.name for t in chain]}))
            (work / "DONE").write_text("ok")
            if entry.exists():
                shutil.rmtree(entry)  # a half-written entry of a process that died
            os.rename(work, entry)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        logger.info("compute type %s: transformed %s (%s), cached in %s", target.compute_type, path,
                    ", ".join(t.name for t in chain), entry)
    return result


def prepare_models(
    graphs: Mapping[str, str | os.PathLike],
    roles: Mapping[str, str],
    device: str,
    compute_type: str,
    runner: str = "host",
) -> PreparedModels:
    """Resolve ``compute_type`` for ``device`` and run the chosen transforms on every graph.

    Raises ``ValueError`` for an unknown compute type or one the device cannot run. A weight
    transform that cannot work on a graph (nothing to quantize, say) is dropped with a logged
    reason, and the model runs at its own compute type.
    """
    from shmengine.model.weights import ModelSource, resolve_model_file

    check_compute_type(compute_type)

    def parse(path: Path) -> ModelProto:
        try:
            return onnx.load(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's DecodeError, or an OSError
            raise ModelLoadError(
                f"{str(path)!r} is not a readable ONNX model ({type(exc).__name__}: {exc}); "
                "expected a file written by onnx.save or an exporter such as optimum-cli"
            ) from exc

    paths = {key: resolve_model_file(p) for key, p in graphs.items()}
    models: dict[str, ModelProto] = {}
    infos: dict[str, _GraphInfo] = {}
    for key, path in paths.items():
        info = _read_info(path)
        if info is None:
            models[key] = parse(path)
            info = _GraphInfo.of(path, models[key])
        infos[key] = info
    model_types = {info.own_type for info in infos.values()}
    model_type = "float32" if len(model_types) != 1 else model_types.pop()
    resolved = resolve_compute_type(compute_type, model_type, device)
    if compute_type == "default" and resolved != model_type:
        logger.warning("compute_type='default': the graph is %s, which %s cannot run efficiently; running %s",
                       model_type, device, resolved)
    elif compute_type != resolved:
        logger.info("compute_type=%r on %s: running %s", compute_type, device, resolved)
    target = TransformTarget(device, resolved, runner=runner)
    out: dict[str, ModelSource] = {}
    applied: dict[str, list[str]] = {}
    final = resolved
    for key, path in paths.items():
        info = infos[key]
        # transforms that change the precision only run when the graph is not in that precision already
        chain = [
            t for t in registered()
            if t.selected(roles.get(key, "graph"), target)
            and (not t.compute_types or info.own_type != resolved)
            and info.wanted.get(t.name, True)
        ]
        if any(t.needs_weights for t in chain):
            refused = next((info.not_applicable.get(t.name) for t in chain if info.not_applicable.get(t.name)), None)
            if refused is None:
                if key in models:  # described just now: the next start need not parse it for this
                    _write_info(path, info)
                out[key] = ModelSource(_transformed_file(path, info, chain, target))
                applied[key] = [t.name for t in chain]
                continue
            logger.warning("compute_type %s cannot be applied to %s: %s; running it as %s", resolved, path, refused,
                           info.own_type)
            final = info.own_type
            chain = [t for t in chain if not t.needs_weights]
        model = models.get(key) or parse(path)
        for t in chain:
            try:
                t.apply(model, target)
            except NotApplicableError as exc:
                logger.info("%s: transform %s skipped: %s", path, t.name, exc)
        out[key] = ModelSource(path, model)
        applied[key] = [t.name for t in chain]
    return PreparedModels(out, final, applied)


def all_graphs(graph):
    """``graph`` and every graph nested in it (``If``/``Loop``/``Scan`` bodies, at any depth),
    outer before inner: Optimum's merged decoders keep their two branches in an ``If``."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from all_graphs(g)


def _all_nodes(graph):
    for g in all_graphs(graph):
        yield from g.node


_BUILTIN_LOADED = False


def _load_builtin() -> None:
    """Register the built-in transforms once (lazily: importing them pulls in numpy helpers)."""
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from shmengine.model import builtin_transforms  # noqa: F401  (registers on import)

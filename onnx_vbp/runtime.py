"""The ONNX Runtime every stage runs models with: one CPU session factory, the errors it raises,
and the cores and memory this process may use."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from onnx_vbp.errors import VbpError

# ORT's exceptions derive from Exception only; these are the ones a bad model or input raises.
ORT_ERRORS = (
    ort_state.Fail,
    ort_state.InvalidArgument,
    ort_state.InvalidGraph,
    ort_state.InvalidProtobuf,
    ort_state.NoSuchFile,
    ort_state.NotImplemented,
    ort_state.RuntimeException,
)


class RuntimeLoadError(VbpError):
    """ONNX Runtime cannot load the model."""


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


@functools.cache
def ort_default_domain_ops() -> dict[str, int]:
    """The ops ONNX Runtime defines in ONNX's default domain, each with the first opset it has
    them at; some from an earlier opset than ONNX itself (LayerNormalization from 1, ONNX from 17).
    Empty where ORT's build lists no schemas."""
    schemas = getattr(ort_state, "get_all_operator_schema", lambda: [])()
    first: dict[str, int] = {}
    for schema in schemas:
        if schema.domain in ("", "ai.onnx"):
            first[schema.name] = min(schema.since_version, first.get(schema.name, schema.since_version))
    return first


def available_cores() -> int:
    """The cores this process may run on (its affinity, e.g. under taskset or a container)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


MEMINFO = Path("/proc/meminfo")
# a container's memory limit, use and statistics, as cgroup v2 and v1 show them from inside it,
# and the statistic of its page cache that the kernel reclaims first (what a container's
# "working set" leaves out, as kubelet and docker stats count it)
CGROUP_MEMORY = (
    (Path("/sys/fs/cgroup"), "memory.max", "memory.current", "memory.stat", "inactive_file"),
    (
        Path("/sys/fs/cgroup/memory"),
        "memory.limit_in_bytes",
        "memory.usage_in_bytes",
        "memory.stat",
        "total_inactive_file",
    ),
)


def _field(path: Path, name: str, scale: int = 1) -> int | None:
    """The number after `name` on a line of a statistics file such as /proc/meminfo."""
    try:
        for line in path.read_text().splitlines():
            parts = line.replace(":", " ").split()
            if len(parts) >= 2 and parts[0] == name:
                return int(parts[1]) * scale
    except (OSError, ValueError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory this process can still take: the kernel's MemAvailable, capped by its
    container's memory limit less the container's working set (its use without the page cache
    the kernel reclaims first); None where neither can be read (not Linux)."""
    candidates = [_field(MEMINFO, "MemAvailable", 1024)]
    for folder, limit_file, usage_file, stat_file, reclaimable in CGROUP_MEMORY:
        try:
            limit, usage = (folder / limit_file).read_text().strip(), int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit():  # "max": no limit
            working_set = usage - (_field(folder / stat_file, reclaimable) or 0)
            candidates.append(max(int(limit) - working_set, 0))
        break
    known = [c for c in candidates if c is not None]
    return min(known) if known else None


MOUNTS = Path("/proc/self/mounts")
MEMORY_FILESYSTEMS = ("tmpfs", "ramfs")


def in_memory(folder: str | Path) -> bool:
    """Whether `folder` lies on a filesystem held in memory (tmpfs, ramfs), by the mount table
    (Linux; False where it cannot be read): files there take the memory they were to spare."""
    try:
        mounts = [line.split() for line in MOUNTS.read_text().splitlines()]
    except OSError:
        return False
    path = os.path.realpath(folder)
    point, kind = "", ""
    for fields in mounts:
        if len(fields) < 3:
            continue
        mounted = fields[1].replace("\\040", " ")  # the table escapes spaces
        # the deepest mount point holding `path`; of mounts stacked on one point, the last
        if (path == mounted or path.startswith(mounted.rstrip("/") + "/")) and len(mounted) >= len(point):
            point, kind = mounted, fields[2]
    return kind in MEMORY_FILESYSTEMS


def cpu_session(
    model_bytes: bytes | str,
    threads: int | None = None,
    optimize: bool = False,
    external_dir: Path | None = None,
    save_optimized: Path | None = None,
) -> ort.InferenceSession:
    """A CPU ORT session, with all graph optimizations when `optimize`.

    ORT never fuses away a graph output, so calibration runs the optimized graph, as the user's
    deployment will; off is for sessions run once (shape probing, the load check of a written
    model), where optimizing would cost more than it saves. `external_dir`: where a serialized
    model's external data lives (ORT reads it from there, so the weights are not copied through
    Python). `save_optimized`: also write the graph ORT optimized to this file, its weights to
    a data file beside it.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 4  # errors come back as exceptions: ORT's own log lines would only repeat them
    if save_optimized is not None:
        options.optimized_model_filepath = str(save_optimized)
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", f"{save_optimized.name}.data"
        )
    if external_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")  # a copy of the weights, for speed
    if threads:  # more threads than cores only adds contention
        options.intra_op_num_threads = min(threads, available_cores())
    try:
        if isinstance(model_bytes, bytes) and external_dir is None:
            # ORT's Python session keeps the bytes it was built from as long as it lives (its own
            # TODO says so): weights serialized inline go to ORT as a file instead, not held twice.
            with tempfile.TemporaryDirectory(prefix="onnx_vbp.") as folder:
                path = Path(folder) / "model.onnx"
                path.write_bytes(model_bytes)
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    except ORT_ERRORS as exc:
        raise RuntimeLoadError(f"ONNX Runtime cannot load the model: {first_line(exc)}") from exc

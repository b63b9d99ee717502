"""
Shared plumbing: where outputs live, the runtime (device, compute dtype, rank),
logging, and atomic file writes.

Nothing here runs at import time. The CLI calls `build_runtime()` once and passes the
resulting `Runtime` down to every stage; library code never probes CUDA or reads
`RANK` itself.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nanochat.errors import UserError

log = logging.getLogger("nanochat")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# -----------------------------------------------------------------------------
# Paths

def get_base_dir(base_dir: str | os.PathLike | None = None) -> Path:
    """Root of every output (data, tokenizer, checkpoints, reports).

    Precedence: explicit argument, then $NANOCHAT_BASE_DIR, then ~/.cache/nanochat.
    The directory is not created here; writers create what they write.
    """
    if base_dir is None:
        base_dir = os.environ.get("NANOCHAT_BASE_DIR") or Path.home() / ".cache" / "nanochat"
    return Path(base_dir).expanduser()


# -----------------------------------------------------------------------------
# Atomic writes: a reader (or a resumed run) never sees a half-written file.

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; on success fsync it and rename it over
    `path`. On any exception the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable (POSIX); harmless where unsupported.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -----------------------------------------------------------------------------
# Compute policy

def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def choose_compute_dtype(device_type: str) -> tuple[torch.dtype, str]:
    """Pick the dtype matmuls and activations run in, and say why.

    Master weights stay fp32 whatever this returns; only compute is lowered.
    $NANOCHAT_DTYPE (bfloat16|float16|float32) overrides the automatic choice.
    """
    env = os.environ.get("NANOCHAT_DTYPE")
    if env:
        if env not in _DTYPES:
            raise UserError(f"NANOCHAT_DTYPE={env!r} is not one of {sorted(_DTYPES)}; unset it or pick one of those")
        return _DTYPES[env], f"set by NANOCHAT_DTYPE={env}"
    if device_type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        if (major, minor) >= (8, 0):
            return torch.bfloat16, f"CUDA SM{major}{minor} has bf16 tensor cores"
        return torch.float32, f"CUDA SM{major}{minor} predates bf16 (set NANOCHAT_DTYPE=float16 to use fp16 with a grad scaler)"
    if device_type == "cpu":
        if _cpu_has_native_bf16():
            return torch.bfloat16, "CPU has native bf16 matmul (avx512_bf16/amx)"
        return torch.float32, "CPU lacks native bf16 matmul"
    return torch.float32, f"{device_type}: fp32 is the safe default"


def autodetect_device_type() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


# -----------------------------------------------------------------------------
# The runtime: built once by the CLI, passed to every stage.

@dataclass
class Runtime:
    device: torch.device
    dtype: torch.dtype
    dtype_reason: str = ""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    base_dir: Path = field(default_factory=get_base_dir)
    distributed: bool = False
    # dtype of Muon's Polar Express matmuls; None follows the compute dtype (bf16 only where
    # the model computes in bf16). $NANOCHAT_MUON_DTYPE=bfloat16 gives the reference's
    # choice (bf16 everywhere) on CPUs without native bf16, where it is ~4x slower.
    muon_dtype: torch.dtype | None = None

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    def autocast_dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.distributed = False


def _torchrun_env() -> tuple[int, int, int] | None:
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def build_runtime(device_type: str | None = None, base_dir: str | os.PathLike | None = None,
                  seed: int = 42) -> Runtime:
    """Decide device, compute dtype and distributed rank once, and log why.

    Under torchrun (RANK/LOCAL_RANK/WORLD_SIZE set) the process group is initialised:
    NCCL on CUDA, gloo on CPU.
    """
    device_type = device_type or autodetect_device_type()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device-type cuda was requested but this PyTorch build sees no CUDA device")
    if device_type not in ("cuda", "cpu", "mps"):
        raise UserError(f"device type {device_type!r} is not one of cuda, cpu, mps")
    env = _torchrun_env()
    rank, local_rank, world_size = env if env else (0, 0, 1)
    distributed = env is not None and world_size > 1
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device(device_type)
        if device_type == "cpu":
            tune_cpu_malloc()
    if distributed and not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    torch.manual_seed(seed)
    dtype, reason = choose_compute_dtype(device_type)
    muon = os.environ.get("NANOCHAT_MUON_DTYPE")
    if muon and muon not in _DTYPES:
        raise UserError(f"NANOCHAT_MUON_DTYPE={muon!r} is not one of {sorted(_DTYPES)}; unset it or pick one of those")
    rt = Runtime(device=device, dtype=dtype, dtype_reason=reason, rank=rank,
                 local_rank=local_rank, world_size=world_size,
                 base_dir=get_base_dir(base_dir), distributed=distributed,
                 muon_dtype=_DTYPES[muon] if muon else None)
    if muon:
        log.info("Muon's Polar Express runs in %s (set by NANOCHAT_MUON_DTYPE)", muon)
    log.info("runtime: device=%s dtype=%s (%s) world_size=%d base_dir=%s",
             device, rt.autocast_dtype_name(), reason, world_size, rt.base_dir)
    return rt


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 (both exist on glibc only)
        return libc
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


def tune_cpu_malloc(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """glibc only: keep freed tensor buffers up to `mmap_threshold` bytes in the heap for
    reuse instead of returning each to the OS, and return the heap's free top only past
    `trim_threshold` bytes (`release_free_memory` does it on demand).

    A buffer served by mmap is fresh memory whose pages fault in one at a time, about
    1 us per 4 KiB here: converting a 16 MiB bf16 activation to fp32 took 4.8 ms that way
    against 0.5 ms in reused heap memory. A training step allocates and frees gigabytes of
    activations, so at depth 4 on a 2-core CPU this is 20-30% of the step. glibc's
    default mmaps blocks of 128 KiB up to 32 MiB (adapting) and trims the heap top after
    every large free, faulting the same pages in again on the next step. Explicit
    MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ in the environment win. Returns
    whether the settings were applied."""
    libc = _glibc()
    if libc is None or os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get("MALLOC_TRIM_THRESHOLD_"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def release_free_memory() -> None:
    """Give the heap's free pages back to the OS (glibc `malloc_trim`), e.g. after a
    setup phase whose temporaries would otherwise stay resident; a no-op elsewhere."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


# -----------------------------------------------------------------------------
# Logging

class _RankZeroFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class _CurrentStderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of the write (so a caller that swaps
    sys.stderr, like pytest's capture, never leaves us holding a closed stream)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(level: int = logging.INFO) -> None:
    """Configure the `nanochat` logger (called by the CLI, never on import).
    Only rank 0 prints INFO; every rank prints warnings and errors."""
    rank = int(os.environ.get("RANK", "0"))
    handler = _CurrentStderrHandler()
    fmt = "%(asctime)s %(levelname).1s %(message)s" if rank == 0 else f"%(asctime)s %(levelname).1s [rank{rank}] %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(_RankZeroFilter(rank))
    logger = logging.getLogger("nanochat")
    logger.handlers[:] = [handler]
    logger.setLevel(level)
    logger.propagate = False


# -----------------------------------------------------------------------------
# Peak throughput, for MFU

# bf16 dense peak FLOP/s of common accelerators (more specific names first)
_GPU_PEAK_FLOPS = (
    (("gb200",), 2.5e15), (("b200",), 2.25e15), (("b100",), 1.8e15),
    (("h200",), 989e12), (("h100", "nvl"), 835e12), (("h100", "pcie"), 756e12), (("h100",), 989e12),
    (("h800",), 756e12), (("a100",), 312e12), (("a800",), 312e12), (("a40",), 149.7e12),
    (("a30",), 165e12), (("l40s",), 362e12), (("l4",), 121e12),
    (("mi300x",), 1.3074e15), (("mi250x",), 383e12),
    (("5090",), 209.5e12), (("4090",), 165.2e12), (("3090",), 71e12),
)


def gpu_peak_flops(device_name: str) -> float | None:
    name = device_name.lower()
    for patterns, flops in _GPU_PEAK_FLOPS:
        if all(p in name for p in patterns):
            return flops
    return None


_MEASURED_PEAK: dict[tuple[str, torch.dtype], float] = {}


def measure_peak_matmul_flops(device: torch.device, dtype: torch.dtype,
                              sizes: tuple[int, ...] = (64, 128, 256, 512, 1024, 2048, 4096),
                              trial_seconds: float = 0.05, trials: int = 3, budget_seconds: float = 1.2) -> float:
    """Achievable dense matmul FLOP/s on `device` in `dtype` (cached per process): the MFU
    denominator where no datasheet figure is known (CPUs).

    One shape is a poor probe: on CPUs fp32 peaks on cache-sized matrices while bf16 (AMX)
    needs large ones to amortise its tile setup, and the rate is not monotonic in the size
    (on 2 cores bf16 gave 1.1, 1.3, 2.1, 1.7 TFLOP/s at 512..4096); emulated bf16 (AVX2 only)
    is fastest on the smallest (2.4 GFLOP/s at 64, 1.3 at 512). So square matmuls of
    every size are timed, each in `trials` trials of about `trial_seconds`, and the best
    rate of any trial counts (the best, not the mean: the device's capability, not the
    noise of a shared machine). A size whose trials would overrun `budget_seconds` (judged
    from the best rate so far) is skipped, and so are the larger ones.
    """
    key = (str(device), dtype)
    if key in _MEASURED_PEAK:
        return _MEASURED_PEAK[key]
    # the probe's random matrices must not move the global RNG: a run whose peak was not
    # cached yet would otherwise initialise its model differently from the same run later
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        best = _probe_matmul(device, dtype, sizes, trial_seconds, trials, budget_seconds)
    if device.type == "cpu":
        release_free_memory()  # the probe's matrices would otherwise stay resident in the heap
    log.debug("measured peak matmul throughput on %s in %s: %.3e FLOP/s", device, dtype, best)
    _MEASURED_PEAK[key] = best
    return best


def _probe_matmul(device: torch.device, dtype: torch.dtype, sizes: tuple[int, ...], trial_seconds: float,
                  trials: int, budget_seconds: float) -> float:
    import time
    t_start = time.perf_counter()
    best = 0.0
    for n in sizes:
        if best > 0:
            one_estimate = 2 * n ** 3 / best
            spent = time.perf_counter() - t_start
            if spent + max(one_estimate, trial_seconds) * (trials + 2) > budget_seconds:
                break
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        one = float("inf")
        for _ in range(2):  # the first call also warms up kernels (oneDNN JIT, cuBLAS handles)
            _sync(device)
            t0 = time.perf_counter()
            a @ b
            _sync(device)
            one = min(one, time.perf_counter() - t0)
        iters = max(1, int(trial_seconds / max(one, 1e-9)))
        best_here = 0.0
        for _ in range(trials):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                a @ b
            _sync(device)
            best_here = max(best_here, 2 * n ** 3 * iters / (time.perf_counter() - t0))
        best = max(best, best_here)
        del a, b
    return best


PEAK_FLOPS_CACHE = "peak_flops.json"


def device_description(device: torch.device) -> str:
    """What a measured peak depends on: the processor model and, on CPUs, the thread
    count (2 threads peak at about twice 1 thread's rate)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        model = ""
        with contextlib.suppress(OSError):
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        model = line.split(":", 1)[1].strip()
                        break
        import platform
        return f"{model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return device.type


def processor_summary(device: torch.device) -> str:
    """The processor a benchmark ran on, for its report: the model, the thread count and,
    on CPUs, the kind that decides which dtype is fast (bf16 is ~100x slower than fp32
    where it is emulated), e.g. "AMD EPYC 7B13, 2 threads; AVX2, no native bf16"."""
    name = device_description(device)
    if device.type != "cpu":
        return name
    flags = _cpu_flags()
    if not flags:
        return name
    if "amx_bf16" in flags:
        kind = "native bf16 (AMX)"
    elif "avx512_bf16" in flags:
        kind = "native bf16 (AVX512-BF16)"
    else:
        kind = ("AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2") + ", no native bf16"
    return f"{name}; {kind}"


def _cached_peak(cache_dir: str | os.PathLike | None, filename: str, key: str, measure,
                 at_least: float = 0.0) -> float:
    """measure() once per key, kept in `cache_dir/filename` (JSON) when cache_dir is given.

    at_least: a rate this run achieved, which the peak cannot be below. A cached figure
    under it was measured while something else loaded the machine (it would put MFU above
    100% from then on), so it is measured again and replaced by the larger of the two."""
    if cache_dir is None:
        return max(measure(), at_least)
    import json
    path = Path(cache_dir) / filename
    table: dict = {}
    with contextlib.suppress(OSError, ValueError):
        table = json.loads(path.read_text())
    if not isinstance(table, dict):
        table = {}
    cached = table.get(key)
    if isinstance(cached, (int, float)) and cached > 0:
        if cached >= at_least:
            return float(cached)
        log.warning("%s: the peak kept for %r (%.3g/s) is below the %.3g/s this run reached, so it was "
                    "measured on a busy machine; measuring it again", path, key, cached, at_least)
    table[key] = value = max(measure(), at_least)
    with contextlib.suppress(OSError):  # a read-only base dir only loses the cache
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return value


def peak_flops(device: torch.device, dtype: torch.dtype, cache_dir: str | os.PathLike | None = None,
               at_least: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the datasheet figure on known GPUs, else measured.

    A measured figure varies by 10-30% from run to run on a shared machine, which made two
    stages of one run report different MFU for the same throughput. With `cache_dir` (the
    base dir) the first measurement for this processor, thread count, dtype and torch
    version is kept in `peak_flops.json` there and every later stage divides by the same
    number; delete the file to measure again. at_least: matmul FLOP/s this run achieved
    (bench-train passes its best step); a measured peak below it is measured again."""
    if device.type == "cuda":
        known = gpu_peak_flops(torch.cuda.get_device_name(device))
        if known is not None:
            return known

    def measure() -> float:
        # measured once per machine, so it can afford a longer probe than the 1.2 s default:
        # a short one on a busy machine read 20% low, and a low peak inflates every MFU after it
        _MEASURED_PEAK.pop((str(device), dtype), None)  # a re-measurement must not reuse this process's figure
        return measure_peak_matmul_flops(device, dtype, trials=5, budget_seconds=4.0)

    if cache_dir is None:
        return max(measure_peak_matmul_flops(device, dtype), at_least)
    key = f"{device_description(device)} | {str(dtype).removeprefix('torch.')} | torch {torch.__version__}"
    return _cached_peak(cache_dir, PEAK_FLOPS_CACHE, key, measure, at_least)


# memory bandwidth (bytes/s) of common accelerators, for memory-bandwidth utilisation
_GPU_PEAK_BANDWIDTH = (
    (("gb200",), 8.0e12), (("b200",), 8.0e12), (("h200",), 4.8e12), (("h100", "nvl"), 3.9e12),
    (("h100", "pcie"), 2.0e12), (("h100",), 3.35e12), (("h800",), 3.35e12), (("a100", "80gb"), 2.039e12),
    (("a100",), 1.555e12), (("a40",), 0.696e12), (("a30",), 0.933e12), (("l40s",), 0.864e12),
    (("l4",), 0.3e12), (("mi300x",), 5.3e12), (("5090",), 1.792e12), (("4090",), 1.008e12),
    (("3090",), 0.936e12),
)
PEAK_BANDWIDTH_CACHE = "peak_bandwidth.json"


def measure_memory_bandwidth(device: torch.device, nbytes: int = 256 << 20, trials: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write, far beyond the caches), best of `trials`."""
    import time
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of both buffers
    best = 0.0
    for _ in range(trials):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = max(best, 2 * nbytes / (time.perf_counter() - t0))
    del src, dst
    if device.type == "cpu":
        release_free_memory()
    return best


def peak_bandwidth(device: torch.device, cache_dir: str | os.PathLike | None = None) -> float:
    """Memory bandwidth for MBU: the datasheet figure on known GPUs, else measured once
    (cached in `peak_bandwidth.json` under cache_dir, like peak_flops)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for patterns, value in _GPU_PEAK_BANDWIDTH:
            if all(p in name for p in patterns):
                return value
    key = f"{device_description(device)} | torch {torch.__version__}"
    return _cached_peak(cache_dir, PEAK_BANDWIDTH_CACHE, key, lambda: measure_memory_bandwidth(device))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

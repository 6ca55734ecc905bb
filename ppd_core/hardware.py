"""What are we running on? NVIDIA GPUs through NVML and torch, else the CPU.

No GPU is the normal case on a laptop, not an error: NVML failing to load just means "CPU".
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "fma", "f16c", "neon", "asimd")


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    memory_mb: int
    driver: str
    capability: str  # CUDA compute capability from torch, "" if torch cannot see it


@dataclass(frozen=True)
class Hardware:
    kind: str  # "cuda" or "cpu"
    cpu_model: str
    cores: int
    memory_mb: int
    isa: tuple[str, ...]
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)

    @property
    def fingerprint(self) -> str:
        """Stable across runs on the same machine; changes when the hardware that matters changes."""
        key = {"kind": self.kind, "cpu": self.cpu_model, "cores": self.cores, "isa": self.isa,
               "gpus": [(g.name, g.memory_mb, g.capability) for g in self.gpus]}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> str:
        if self.gpus:
            g = self.gpus[0]
            return f"{g.name} ({g.memory_mb / 1024:.0f} GB, CUDA {g.capability}, driver {g.driver})"
        return f"{self.cpu_model} ({self.cores} cores, {', '.join(self.isa) or 'no listed ISA extensions'})"

    def as_dict(self) -> dict:
        return {**asdict(self), "fingerprint": self.fingerprint, "description": self.describe()}


def nvml_gpus(nvml=None) -> tuple[GpuInfo, ...]:
    """GPUs reported by NVML; () when there is no NVIDIA driver (the CPU path). `nvml` is injectable for tests."""
    if nvml is None:
        try:
            import pynvml as nvml  # provided by nvidia-ml-py
        except ImportError:
            return ()
    try:
        nvml.nvmlInit()
    except nvml.NVMLError:  # NVMLError_LibraryNotFound / DriverNotLoaded: no GPU here
        return ()
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            mem = nvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GpuInfo(i, _text(nvml.nvmlDeviceGetName(handle)), int(mem.total // 2**20), driver,
                                _capability(i)))
        return tuple(gpus)
    finally:
        nvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _capability(index: int) -> str:
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return ""
    major, minor = torch.cuda.get_device_capability(index)
    return f"{major}.{minor}"


def cpu_model_and_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    model, flags = platform.processor() or platform.machine(), set()
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    return model, tuple(f for f in ISA_FLAGS if f in flags)


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (else torch emulates it, far slower than float32)."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_model_and_flags()[1]))


def detect(nvml=None) -> Hardware:
    cpu, isa = cpu_model_and_flags()
    gpus = nvml_gpus(nvml)
    kind = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    return Hardware(kind, cpu, psutil.cpu_count(logical=True) or 1, int(psutil.virtual_memory().total // 2**20), isa,
                    gpus)

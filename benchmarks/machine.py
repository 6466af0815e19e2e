"""The machine a benchmark ran on, for its JSON line: CPU model, threads, the vector/matrix flags that decide which
kernels run (AVX-512, AVX-512 bf16, AMX), torch's version and the device. Every benchmark's line carries these, so
a figure always says where it came from (figures with and without AMX differ by several times)."""

from __future__ import annotations

import platform

KEY_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_facts() -> dict:
    import torch

    flags: set[str] = set()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": [f for f in KEY_FLAGS if f in flags], "amx": "amx_bf16" in flags,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}

"""Does the work fit this machine? Checked before a long stage starts, so a model too large fails at
once with one line saying how much memory it needs, not minutes later inside a library."""
from __future__ import annotations

import json
from pathlib import Path

from compress.errors import UserError

GIB = 2**30
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Tracing an unrolled sampler holds its graph with every weight once more beside the module
# (measured on the SD-1.5-architecture export: 7.0 GB peak for 4.3 GB loaded and a 3.6 GB sampler).
EXPORT_WEIGHT_FACTOR = 1.0
HEADROOM_BYTES = GIB // 2


def available_bytes() -> int | None:
    """Memory the OS can give this process now (Linux MemAvailable; psutil elsewhere; None if neither tells)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def require_memory(needed: int, what: str) -> None:
    """Raises a one-line UserError when ``needed`` bytes (plus headroom) exceed what is available."""
    available = available_bytes()
    if available is not None and needed + HEADROOM_BYTES > available:
        raise UserError(f"{what} needs about {(needed + HEADROOM_BYTES) / GIB:.1f} GiB of memory and this machine has "
                        f"{available / GIB:.1f} GiB available")


def folder_weight_bytes(folder: Path) -> int:
    """Bytes the weights under ``folder`` take once loaded in float32: from the safetensors headers (a
    half-precision file doubles), other checkpoint files by their size. Variant files
    (``*.fp16.safetensors``) are skipped: the loader reads the default ones."""
    total = 0
    for path in Path(folder).rglob("*"):
        if path.suffix not in WEIGHT_SUFFIXES or not path.is_file() or path.name.count(".") > 1:
            continue
        total += _safetensors_float32_bytes(path) if path.suffix == ".safetensors" else path.stat().st_size
    return total


def _safetensors_float32_bytes(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length < min(path.stat().st_size, 2**27):  # not a safetensors header: the loader will say why
                return path.stat().st_size
            header = json.loads(f.read(length))
        return sum((entry["data_offsets"][1] - entry["data_offsets"][0]) * (2 if entry["dtype"] in ("F16", "BF16") else 1)
                   for name, entry in header.items() if name != "__metadata__")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return path.stat().st_size

"""What every benchmark ends with: its result as JSON and its table on the console."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def machine() -> dict:
    """What a benchmark ran on, for its JSON: the platform, the processor, the CPUs, torch."""
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def write_and_print(result: dict, table, out: str) -> int:
    """Write the result as JSON to ``out``, print its markdown table."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(result))
    print(f"wrote {out}")
    return 0

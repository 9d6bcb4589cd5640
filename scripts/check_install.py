"""Read pip's `--dry-run --report` of the install and fail if it would bring CUDA packages.

    python scripts/check_install.py REPORT.json [--gpu]

Without --gpu (a machine with no NVIDIA GPU) any nvidia-* or triton package, or a torch
that is not a CPU build, is a failure. Prints one line: what would be installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CUDA_PREFIXES = ("nvidia-", "nvidia_", "triton", "pytorch-triton")


def cuda_packages(report: dict) -> list[str]:
    names = [item["metadata"]["name"].lower() for item in report.get("install", [])]
    return sorted(n for n in names if n.startswith(CUDA_PREFIXES))


def torch_version(report: dict) -> str | None:
    for item in report.get("install", []):
        if item["metadata"]["name"].lower() == "torch":
            return str(item["metadata"]["version"])
    return None


def main(argv: list[str]) -> int:
    report = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    gpu = "--gpu" in argv[1:]
    count = len(report.get("install", []))
    cuda, torch = cuda_packages(report), torch_version(report)
    if gpu:
        print(f"OK: {count} packages, torch {torch} (NVIDIA GPU: the default build)")
        return 0
    if cuda:
        print(f"FAIL: CUDA packages on a machine without a GPU: {', '.join(cuda)}")
        return 1
    if torch is not None and not torch.endswith("+cpu") and sys.platform == "linux":
        print(f"FAIL: torch {torch} is not the CPU build")
        return 1
    print(f"OK: {count} packages, torch {torch}, no CUDA packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

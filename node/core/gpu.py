"""GPU detection for capability ads: what `nvidia-smi` reports, or nothing.

Ads carry one short string per GPU ("NVIDIA A100-SXM4-40GB, 40960 MiB"), so a submitter
can place a kind that declares ``Resources(gpu=True)`` only where a GPU is. Detection runs
once at start with a short timeout: a hung driver must not hold up the node, and a node
without the tool (most laptops, and every CI machine here) advertises none.
"""

from __future__ import annotations

import logging
import shutil
import subprocess

logger = logging.getLogger("teammesh.gpu")

MAX_GPUS = 16  # what an ad may carry (protocols/capability.py)
MAX_NAME = 96


def detect_gpus(timeout_s: float = 3.0) -> tuple[str, ...]:
    """The GPUs `nvidia-smi` lists, as "name, memory MiB" strings; () if none or no tool."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return ()
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=timeout_s, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        logger.warning("nvidia-smi did not answer (%s): advertising no GPU", exc)
        return ()
    if out.returncode != 0:
        logger.warning("nvidia-smi failed (%s): advertising no GPU",
                       out.stderr.strip()[:200] or f"status {out.returncode}")
        return ()
    gpus = []
    for line in out.stdout.splitlines():
        name, _, memory = (part.strip() for part in line.partition(","))
        if not name:
            continue
        gpus.append((f"{name}, {memory} MiB" if memory.isdigit() else name)[:MAX_NAME])
    return tuple(gpus[:MAX_GPUS])


def gpu_memory_mib(gpu: str) -> int:
    """The memory an ad's GPU string names (0 if it names none)."""
    tail = gpu.rsplit(",", 1)[-1].strip()
    number = tail.removesuffix("MiB").strip()
    return int(number) if number.isdigit() else 0

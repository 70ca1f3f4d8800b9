"""Where smear finds the project, its data sets and its shipped models."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def project_root() -> Path:
    """The source checkout when running from one, else the current directory.

    ``SMEAR_PROJECT_ROOT`` overrides both. Relative data paths in configs (``../shared/data``)
    are resolved against this folder.
    """
    env = os.environ.get("SMEAR_PROJECT_ROOT")
    if env:
        return Path(env).resolve()
    if (PACKAGE_ROOT / "pyproject.toml").is_file():
        return PACKAGE_ROOT
    return Path.cwd()


def resolve_path(path: str | os.PathLike) -> Path:
    """Resolve a config path: ``~`` expanded, relative paths taken from :func:`project_root`."""
    p = Path(os.path.expanduser(str(path)))
    return p if p.is_absolute() else (project_root() / p).resolve()


def git_commit() -> str:
    """The commit of the source checkout, or ``unknown`` outside one."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PACKAGE_ROOT, capture_output=True, text=True, timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_description(device: str = "cpu") -> str:
    """CPU model and the CPUs this process may use; on a CUDA device, the GPU's name too (cards and benchmark rows)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    out = f"{cpu} ({n} CPUs)"
    if str(device).startswith("cuda"):
        try:
            import torch

            out += f" + {torch.cuda.get_device_name(torch.device(device))}"
        except Exception:  # noqa: BLE001  no CUDA here after all: the CPU describes the machine
            pass
    return out


def check_device(device: str | None) -> None:
    """Refuse, in one line, a torch device this machine does not have (before any model loads).

    Raises:
        SmearError: e.g. ``--device cuda`` without a visible CUDA GPU; the message names the devices there are.
    """
    d = str(device or "cpu").strip().lower()
    if d in ("", "cpu"):
        return
    import torch

    from .errors import SmearError

    have = ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        have.append("mps")
    if d.startswith("cuda") or d == "mps":
        wanted = "cuda:0" if d == "cuda" else d
        if wanted not in have:
            raise SmearError(f"device {device!r} is not available here; available: {', '.join(have)}")
    else:
        raise SmearError(f"device {device!r} is not a torch device smear knows (cpu, cuda, cuda:N, mps); "
                         f"available: {', '.join(have)}")

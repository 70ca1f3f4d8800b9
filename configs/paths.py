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

"""Helpers of the fault-injection suite (imported by its tests through sys.path, as tests/interp does)."""
from __future__ import annotations

from pathlib import Path

import torch


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def hooks_left(*roots) -> list[str]:
    """Every forward / pre / backward hook, global hook and instance-level forward override still installed."""
    from torch.nn.modules import module as M

    left = [f"global {n}" for n in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                    "_global_backward_hooks", "_global_backward_pre_hooks")
            if getattr(M, n, None)]
    for root in roots:
        mods = [m for m in root.components.values() if isinstance(m, torch.nn.Module)] \
            if hasattr(root, "components") else [root]
        for top in mods:
            for name, m in top.named_modules():
                for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
                    if getattr(m, attr, None):
                        left.append(f"{name or type(m).__name__}.{attr}")
                if "forward" in m.__dict__:
                    left.append(f"{name or type(m).__name__}.forward override")
    return left

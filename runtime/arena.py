"""Arena planning for one input-shape signature.

Given each planned tensor's byte size and live range [first step, last step] (inclusive),
``plan_offsets`` places them greedily, largest first, at the lowest 64-byte-aligned offset
that overlaps no tensor alive at the same time. ``check_offsets`` validates a plan that came
from elsewhere (the model's ``plan`` metadata) against the same ranges.
"""

from __future__ import annotations

from dataclasses import dataclass

ALIGN = 64


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass
class Block:
    key: object  # slot id (int) or ("ws", step)
    size: int
    start: int
    end: int
    offset: int = -1


def plan_offsets(blocks: list[Block]) -> int:
    """Assign ``offset`` to every block; return the arena size in bytes."""
    placed: list[Block] = []
    total = 0
    for b in sorted(blocks, key=lambda b: (-b.size, b.start)):
        live = sorted((p.offset, p.offset + align(p.size)) for p in placed if p.start <= b.end and b.start <= p.end)
        off = 0
        need = align(b.size)
        for lo, hi in live:
            if off + need <= lo:
                break
            off = max(off, hi)
        b.offset = off
        placed.append(b)
        total = max(total, off + need)
    return total


def check_offsets(blocks: list[Block], arena_size: int, same_key_ok: bool = False) -> str | None:
    """None when no two blocks alive together overlap in memory and all fit; else why not.
    With ``same_key_ok``, blocks with equal keys (one tensor written in place over another)
    may overlap."""
    events = sorted(blocks, key=lambda b: b.start)
    for b in blocks:
        if b.offset < 0 or b.offset + b.size > arena_size:
            return f"tensor {b.key} does not fit in the arena"
    for i, a in enumerate(events):
        for b in events[i + 1:]:
            if b.start > a.end:
                break
            if same_key_ok and a.key == b.key:
                continue
            if a.offset < b.offset + b.size and b.offset < a.offset + a.size:
                return f"tensors {a.key} and {b.key} overlap while both alive"
    return None

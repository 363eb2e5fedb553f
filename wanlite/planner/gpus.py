"""The GPUs people run Wan on, for planning another machine (`wanlite plan --gpu "RTX 3060"`) and for naming the
one found here. Figures are the vendors' published specifications: the dense tensor rate of the half type the
card computes in (bf16 from Ampere on, else fp16) with fp32 accumulation (GeForce cards run that at half their
fp16-accumulate rate; cards without tensor cores at their plain fp16 / fp32 rate), memory bandwidth, and the
PCIe link's practical pinned / pageable copy rates.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from wanlite.errors import WanliteError

GB = 1e9
PCIE = {3: (12 * GB, 6 * GB), 4: (24 * GB, 10 * GB), 5: (48 * GB, 16 * GB)}  # gen -> (pinned, pageable) bytes/s


@dataclass(frozen=True)
class Card:
    name: str
    cc: tuple[int, int]  # compute capability
    vram_gb: float
    half_tflops: float  # dense tensor rate of its half type, fp32 accumulation
    mem_gbs: float  # memory bandwidth, GB/s
    pcie: int  # PCIe generation of its link (x16; laptops x8: counted as one generation lower)

    @property
    def bf16(self) -> bool:
        return self.cc >= (8, 0)

    @property
    def fp8(self) -> bool:
        return self.cc >= (8, 9)


CARDS = [
    # Pascal: no tensor cores; P100 runs fp16 at twice its fp32 rate, GeForce Pascal at fp32's via upcast
    Card("GTX 1070", (6, 1), 8, 6.5, 256, 3), Card("GTX 1080", (6, 1), 8, 8.9, 320, 3),
    Card("GTX 1080 Ti", (6, 1), 11, 11.3, 484, 3), Card("P100", (6, 0), 16, 21.2, 732, 3),
    # Turing
    Card("GTX 1660 Super", (7, 5), 6, 10.1, 336, 3), Card("RTX 2060", (7, 5), 6, 25.8, 336, 3),
    Card("RTX 2060 12GB", (7, 5), 12, 28.7, 360, 3), Card("RTX 2070", (7, 5), 8, 29.9, 448, 3),
    Card("RTX 2080", (7, 5), 8, 40.3, 448, 3), Card("RTX 2080 Ti", (7, 5), 11, 53.8, 616, 3),
    Card("T4", (7, 5), 16, 25.0, 320, 3),  # 65 TFLOPS peak, held near 25 by its 70 W limit
    # Ampere
    Card("RTX 3050", (8, 6), 8, 18.2, 224, 4), Card("RTX 3060", (8, 6), 12, 25.6, 360, 4),
    Card("RTX 3060 Ti", (8, 6), 8, 32.4, 448, 4), Card("RTX 3070", (8, 6), 8, 40.6, 448, 4),
    Card("RTX 3080", (8, 6), 10, 59.5, 760, 4), Card("RTX 3080 Ti", (8, 6), 12, 68.2, 912, 4),
    Card("RTX 3090", (8, 6), 24, 71.0, 936, 4), Card("A10G", (8, 6), 24, 70.0, 600, 4),
    Card("RTX 3060 Laptop", (8, 6), 6, 20.0, 336, 3), Card("RTX 3080 Laptop", (8, 6), 16, 40.0, 448, 3),
    # Ada
    Card("RTX 4060", (8, 9), 8, 15.1, 272, 4), Card("RTX 4060 Ti", (8, 9), 16, 22.1, 288, 4),
    Card("RTX 4070", (8, 9), 12, 29.1, 504, 4), Card("RTX 4070 Super", (8, 9), 12, 35.5, 504, 4),
    Card("RTX 4070 Ti Super", (8, 9), 16, 44.1, 672, 4), Card("RTX 4080", (8, 9), 16, 48.7, 717, 4),
    Card("RTX 4090", (8, 9), 24, 82.6, 1008, 4), Card("L4", (8, 9), 24, 60.0, 300, 4),
    Card("RTX 4060 Laptop", (8, 9), 8, 11.6, 256, 3), Card("RTX 4070 Laptop", (8, 9), 8, 15.6, 256, 3),
    Card("RTX 4090 Laptop", (8, 9), 16, 45.0, 576, 3),
    # Blackwell (consumer)
    Card("RTX 5060 Ti", (12, 0), 16, 23.7, 448, 5), Card("RTX 5070", (12, 0), 12, 30.9, 672, 5),
    Card("RTX 5080", (12, 0), 16, 56.3, 960, 5), Card("RTX 5090", (12, 0), 32, 104.8, 1792, 5),
]


def _key(name: str) -> str:
    """'NVIDIA GeForce RTX 3060' and '3060' both -> '3060'; 'Tesla T4' -> 't4'."""
    text = name.lower().replace("geforce", "").replace("nvidia", "").replace("tesla", "")
    text = re.sub(r"\b(rtx|gtx)\b", "", text)
    return re.sub(r"[^a-z0-9]", "", text)


def find_card(name: str) -> Card | None:
    """The table's card for a name as a user types it or as the driver reports it; None if not in the table."""
    key = _key(name)
    return next((c for c in CARDS if _key(c.name) == key), None)


def card(name: str) -> Card:
    found = find_card(name)
    if found is None:
        raise WanliteError(f"--gpu {name!r} is not in wanlite's table; known: {', '.join(c.name for c in CARDS)} "
                           "(or describe it with --vram GB)")
    return found

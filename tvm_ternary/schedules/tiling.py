"""Tiling knobs of the default schedules and the untuned choice per ISA and shape.

The register tile of the tensorized kernels is ``ow_block`` output pixels (along W) times
``oc_tiles`` intrinsic blocks of output channels, all accumulators live in vector registers while
(r, s, C/depth) is reduced.  These are the knobs MetaSchedule may search later.

Example::

    t = default_tiling(spec, isa="vnni512")      # Tiling(ow_block=14, oc_tiles=2, ...)
    t = Tiling(ow_block=7, oc_tiles=4)            # a hand choice
"""

from __future__ import annotations

from dataclasses import dataclass

from .intrin import BLOCKS
from .spec import ConvSpec, maddubs_form

# Fewest accumulators (pixels x output blocks) an unpadded register tile may have before a
# padded accumulator width is preferred (default_tiling; half the budget on ISAs with fewer
# registers).
MIN_UNPADDED_CELLS = 8
ONE_BLOCK_PIXELS = 14  # vnni512: pixels of a one-output-block tile (default_tiling)
# Vector registers per ISA (zmm0-31 with AVX-512, ymm0-15 otherwise).
_REGS = {"vnni512": 32, "avx512": 32, "avxvnni": 16, "avx2": 16, "plain": 16}


@dataclass(frozen=True)
class Tiling:
    """Knobs of the tiled schedule.

    ow_block: output pixels per register tile (the acc width is padded up to a multiple).
    oc_tiles: intrinsic output blocks per register tile; must divide ceil(K / lanes).
    decode_at: "tile" decodes a weight block per (oc tile, image) inside the parallel loop
        (stays in L1/L2, reused by every pixel); "root" decodes all weights once up front
        and parallelises over output rows too (for layers with few output-channel tiles).
    """

    ow_block: int
    oc_tiles: int
    decode_at: str = "tile"

    def __post_init__(self):
        if self.ow_block < 1 or self.oc_tiles < 1:
            raise ValueError(f"ow_block and oc_tiles must be >= 1: {self}")
        if self.decode_at not in ("tile", "root"):
            raise ValueError(f"decode_at must be 'tile' or 'root', got {self.decode_at!r}")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pick_ow_block(ow: int, limit: int) -> int:
    """Largest divisor of ow within limit, unless padding ow to a multiple of a bigger block
    wastes less than the small block loses (a block below half the limit starves the FMA pipes)."""
    best_div = max(d for d in _divisors(ow) if d <= limit)
    if best_div * 2 >= limit or best_div == ow:
        return best_div
    # pad: choose the block in (limit/2, limit] with the least padded waste
    cands = range(max(1, limit // 2), limit + 1)
    return min(cands, key=lambda b: (-(-ow // b) * b - ow, -b))


def default_tiling(spec: ConvSpec, *, isa: str, threads: int = 1) -> Tiling:
    """The untuned register tile for ``spec`` on ``isa``."""
    blk = BLOCKS[isa]
    kb = -(-spec.out_channels // blk.lanes)
    ow = spec.out_width
    regs = _REGS[isa]
    # Measured on znver5 (3x3 and 1x1 ResNet layers): 2 output blocks x up to 14 pixels is
    # within 5% of the best tile everywhere; 4 blocks x 7 pixels spills (28 acc + 4 weights).
    budget = regs - 4
    maddubs = maddubs_form(spec, isa) is not None
    if maddubs:
        # int16 and int32 accumulators of each cell are live together while a chunk runs
        # (LLVM spills the int32 ones, touched once per chunk, when it must): half the tile.
        budget = (regs - 4) // 2 + 2
    oc_cands = [d for d in _divisors(kb) if d <= 8]
    if ow <= 2:  # dense / tiny maps: no pixel reuse, use channel tiles for independent chains
        oct_ = max(d for d in oc_cands if d * max(ow, 1) <= budget)
    elif maddubs:  # 1 or 2 output blocks: the most useful (unpadded) cells, 2 on a tie
        def useful(o):
            b = _pick_ow_block(ow, max(1, budget // o))
            return b * o * ow / (-(-ow // b) * b), o
        oct_ = max((o for o in (1, 2) if kb % o == 0), key=useful)
    elif isa == "vnni512" and kb % 2:
        # An odd number of output blocks (Xeon, 1 thread, ternary 1x1 at 56x56): 3 blocks a
        # tile where 3 divides them (MobileNetV2's 24->144 expand, 9 blocks: 28 x 1 0.29 ms,
        # 8 x 3 0.093 ms); one block a tile takes at most ONE_BLOCK_PIXELS pixels (32->16 at
        # 112: 28 x 1 0.139 ms, 14 x 1 0.054 ms; 144->16 at 56: 0.058 -> 0.039 ms).
        oct_ = 3 if kb % 3 == 0 else 1
        if oct_ == 1:
            budget = min(budget, ONE_BLOCK_PIXELS)
    else:
        oct_ = 2 if kb % 2 == 0 else 1
    owb = _pick_ow_block(ow, max(1, budget // oct_))
    if ow % owb:
        # A padded accumulator width costs more than a smaller pixel block: it needs a padded
        # copy of the input and a guarded epilogue, whose per-channel terms LLVM then cannot
        # hoist (Xeon, 1 thread: SqueezeNet's stem, OW = 111 = 3 x 37, VNNI 14 x 2 padded
        # 0.41 ms, 3 x 4 0.30 ms; a 55-wide 1x1 16->64, VNNI 14 x 2 0.085 ms, 11 x 2 0.061 ms,
        # avx2t 4 x 2 0.205 ms, 5 x 1 0.171 ms). Take an unpadded tile, with more output blocks
        # if need be, when it has enough cells.
        cands = [o for o in (1, 2) if kb % o == 0] if maddubs else oc_cands
        unpadded = max(((max(d for d in _divisors(ow) if d <= max(1, budget // o)), o) for o in cands),
                       key=lambda t: (t[0] * t[1], t[0]))
        # (one pixel per tile reuses no activation broadcast: not a candidate)
        if unpadded[0] > 1 and unpadded[0] * unpadded[1] >= min(MIN_UNPADDED_CELLS, budget // 2):
            owb, oct_ = unpadded
    tiles = (kb // oct_) * spec.batch
    decode_at = "tile" if tiles >= 2 * threads or spec.out_height == 1 else "root"
    return Tiling(ow_block=owb, oc_tiles=oct_, decode_at=decode_at)

"""Reading compiled GPU code without a GPU: SASS from ``nvdisasm``, its control flow, and the
instructions a kernel's steady-state loop issues per iteration.

Used by the ahead-of-time compiler (pyengine/kernels/aot.py: local-memory instructions, i.e.
spills, in decode kernels fail the check) and by benchmarks/static_gpu.py (instructions per
weight byte and the issue-bound ceiling). Works on cubins from Triton and from nvcc; needs
``nvdisasm`` (Triton's NVIDIA backend ships one; CUDA toolkits too).

Steady-state loop and path (:func:`steady_state`): weight loads are the global loads whose
source line (nvdisasm -g line info) carries the marker ``static-gpu: weight load`` in a comment
of the kernel's source. The loop is the innermost natural loop with the most weight loads
outside its nested loops; its steady-state path is the path from the loop header back to it
(nested loops' back edges removed, so a nested loop is crossed at most once) with the most
weight loads, then the most multiply-adds (MATH_OPCODES: the branch that computes is taken),
then the fewest instructions: the path that streams the weight and computes with it, with no
optional work (a staging branch skipped, every row valid, the vector-load branch). Predicated
instructions count: they take an issue slot whether or not their predicate holds.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set, Tuple

WEIGHT_LOAD_MARKER = "static-gpu: weight load"
# Arithmetic that consumes the weights: multiply-adds, tensor-core products.
MATH_OPCODES = ("FFMA", "FFMA2", "HFMA2", "HMMA", "HGMMA", "IMMA", "QGMMA", "DFMA")
LOCAL_MEMORY_OPCODES = ("LDL", "STL")
GLOBAL_LOAD_OPCODES = ("LDG", "LD", "LDGSTS")    # LDGSTS: cp.async, global -> shared

_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:(@!?U?P[T0-9]+)\s+)?([A-Z0-9_.]+)\s*(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L_x_\d+):\s*$")
_LINE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_FUNC = re.compile(r"^//-+ \.text\.(\S+)\s+-+")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclasses.dataclass
class Instr:
    """One SASS instruction: address, predicate ("@P0", "@!P1" or None), opcode with its
    modifiers ("LDG.E.128.CONSTANT"), operands, its source locations (nvdisasm -gi: the line
    and every call site it was inlined at, innermost first) and the label a branch goes to."""

    addr: int
    pred: Optional[str]
    opcode: str
    operands: str
    locations: Tuple[Tuple[str, int], ...] = ()
    target: Optional[str] = None

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def load_bytes(self) -> int:
        """Bytes one thread loads (global or local loads; 0 for other instructions)."""
        if self.base not in GLOBAL_LOAD_OPCODES + ("LDL", "LDS"):
            return 0
        mods = self.opcode.split(".")[1:]
        for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
            if mod in mods:
                return size
        return 4


@dataclasses.dataclass
class Function:
    name: str
    instrs: List[Instr]
    labels: Dict[str, int]          # label -> index of the instruction it precedes


@functools.lru_cache(maxsize=None)
def nvdisasm_path() -> str:
    """An nvdisasm: Triton's bundled one when triton is installed, else the one on PATH."""
    try:
        import triton.backends.nvidia as nv
        bundled = Path(nv.__file__).parent / "bin" / "nvdisasm"
        if bundled.exists():
            return str(bundled)
    except Exception:  # noqa: BLE001 - no triton: look on PATH
        pass
    found = shutil.which("nvdisasm")
    if found is None:
        raise FileNotFoundError("nvdisasm not found (install triton or a CUDA toolkit)")
    return found


def disassemble(cubin: bytes) -> str:
    """``nvdisasm -c -gi`` of a cubin: code sections with source line information, inlined
    call sites included (a CUDA ``__ldg`` is located in the toolkit's header, inlined at the
    kernel's line)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        proc = subprocess.run([nvdisasm_path(), "-c", "-gi", f.name], capture_output=True,
                              text=True, check=True)
    return proc.stdout


def parse(text: str) -> Dict[str, Function]:
    """The functions of an nvdisasm listing, by (mangled) name."""
    funcs: Dict[str, Function] = {}
    cur: Optional[Function] = None
    locations: List[Tuple[str, int]] = []
    chain_open = False       # the previous line was a location line: this one extends it
    for raw in text.splitlines():
        m = _FUNC.match(raw)
        if m:
            cur = funcs.setdefault(m.group(1), Function(m.group(1), [], {}))
            locations, chain_open = [], False
            continue
        if cur is None:
            continue
        m = _LINE.match(raw)
        if m:
            if not chain_open:
                locations = []
            locations.append((m.group(1), int(m.group(2))))
            if m.group(3):
                locations.append((m.group(3), int(m.group(4))))
            chain_open = True
            continue
        chain_open = False
        m = _LABEL.match(raw)
        if m:
            cur.labels[m.group(1)] = len(cur.instrs)
            continue
        m = _INSTR.match(raw)
        if m:
            t = _TARGET.search(m.group(4))
            cur.instrs.append(Instr(int(m.group(1), 16), m.group(2), m.group(3), m.group(4),
                                    tuple(dict.fromkeys(locations)),
                                    t.group(1) if t else None))
    return funcs


def local_memory_instructions(func: Function) -> int:
    """LDL / STL instructions (register spills or stack arrays) in the function."""
    return sum(i.base in LOCAL_MEMORY_OPCODES for i in func.instrs)


# ---- control flow ---------------------------------------------------------------------------

@dataclasses.dataclass
class Block:
    index: int
    start: int                      # first instruction (index into Function.instrs)
    end: int                        # one past the last
    succs: List[int] = dataclasses.field(default_factory=list)


def basic_blocks(func: Function) -> List[Block]:
    """Basic blocks in address order with their successors (conditional branches and
    predicated exits fall through; indirect branches have no known successor)."""
    instrs = func.instrs
    leaders = {0} | set(func.labels.values())
    for i, ins in enumerate(instrs):
        if ins.base in ("BRA", "EXIT", "RET", "BRX", "JMX", "JMP") and i + 1 < len(instrs):
            leaders.add(i + 1)
    starts = sorted(s for s in leaders if s < len(instrs))
    blocks = [Block(k, s, (starts[k + 1] if k + 1 < len(starts) else len(instrs)))
              for k, s in enumerate(starts)]
    block_at = {b.start: b.index for b in blocks}
    for b in blocks:
        last = instrs[b.end - 1]
        falls = b.index + 1 < len(blocks)
        if last.base == "BRA" and last.target in func.labels:
            b.succs.append(block_at[func.labels[last.target]])
            if last.pred is not None and falls:
                b.succs.append(b.index + 1)
        elif last.base in ("EXIT", "RET"):
            if last.pred is not None and falls:
                b.succs.append(b.index + 1)
        elif last.base in ("BRX", "JMX", "JMP"):
            pass
        elif falls:
            b.succs.append(b.index + 1)
    return blocks


@dataclasses.dataclass
class Loop:
    header: int
    blocks: Set[int]
    latches: Set[int]               # blocks with an edge back to the header


def natural_loops(blocks: Sequence[Block]) -> List[Loop]:
    """Natural loops (a back edge goes to a block at a lower or equal address), merged by
    header."""
    preds: Dict[int, List[int]] = {b.index: [] for b in blocks}
    for b in blocks:
        for s in b.succs:
            preds[s].append(b.index)
    loops: Dict[int, Loop] = {}
    for b in blocks:
        for h in b.succs:
            if h > b.index:
                continue
            body = {h, b.index}
            stack = [b.index] if b.index != h else []
            while stack:
                x = stack.pop()
                for p in preds[x]:
                    if p not in body:
                        body.add(p)
                        stack.append(p)
            loop = loops.setdefault(h, Loop(h, set(), set()))
            loop.blocks |= body
            loop.latches.add(b.index)
    return sorted(loops.values(), key=lambda lp: lp.header)


@functools.lru_cache(maxsize=None)
def _source_lines(path: str) -> Tuple[str, ...]:
    try:
        return tuple(Path(path).read_text().splitlines())
    except OSError:
        return ()


def is_weight_load(ins: Instr) -> bool:
    """A global load one of whose source locations carries the weight-load marker."""
    if ins.base not in GLOBAL_LOAD_OPCODES:
        return False
    for file, line in ins.locations:
        lines = _source_lines(file)
        if 0 < line <= len(lines) and WEIGHT_LOAD_MARKER in lines[line - 1]:
            return True
    return False


@dataclasses.dataclass
class SteadyState:
    """The steady-state path of a kernel's main loop (see the module docstring)."""

    instructions: int               # issued per iteration, per warp
    weight_loads: int               # weight-load instructions on the path
    weight_load_bytes: int          # bytes per thread they name (predicated alternatives too)
    other_global_loads: int
    shared_loads: int
    local_memory: int               # LDL / STL on the path
    barriers: int
    opcodes: Dict[str, int]         # base opcode -> count on the path


def steady_state(func: Function) -> Optional[SteadyState]:
    """The steady-state path of the function's main loop, or None when no loop holds a
    marked weight load."""
    blocks = basic_blocks(func)
    loops = natural_loops(blocks)
    weight = [sum(is_weight_load(i) for i in func.instrs[b.start:b.end]) for b in blocks]
    math = [sum(i.base in MATH_OPCODES for i in func.instrs[b.start:b.end]) for b in blocks]

    def own_blocks(loop: Loop) -> Set[int]:
        nested = set()
        for other in loops:
            if other is not loop and other.header in loop.blocks and other.header != loop.header:
                nested |= other.blocks
        return loop.blocks - nested

    best_loop = max(loops, key=lambda lp: (sum(weight[b] for b in own_blocks(lp)),
                                           -len(lp.blocks)), default=None)
    if best_loop is None or sum(weight[b] for b in own_blocks(best_loop)) == 0:
        return None

    # Longest path (weight loads, multiply-adds, then fewest instructions) over the loop body as
    # a DAG: forward edges only (address order is a topological order once back edges are
    # gone). Nested loops (activation staging, say) are left out when the loop can go round
    # without them; otherwise crossed once.
    def longest(allowed: Set[int]):
        h = best_loop.header
        size = {b: blocks[b].end - blocks[b].start for b in allowed}
        best: Dict[int, Tuple[int, int, int]] = {h: (weight[h], math[h], -size[h])}
        came: Dict[int, Optional[int]] = {h: None}
        for b in sorted(allowed):
            if b not in best:
                continue
            for s in blocks[b].succs:
                if s not in allowed or s <= b:
                    continue
                cand = (best[b][0] + weight[s], best[b][1] + math[s], best[b][2] - size[s])
                if s not in best or cand > best[s]:
                    best[s], came[s] = cand, b
        ends = [lt for lt in best_loop.latches if lt in best]
        if not ends:
            return None, came
        return max(ends, key=lambda lt: best[lt]), came

    end, came = longest(own_blocks(best_loop) | {best_loop.header})
    if end is None:
        end, came = longest(best_loop.blocks)
    if end is None:
        return None
    path = []
    x: Optional[int] = end
    while x is not None:
        path.append(x)
        x = came[x]
    instrs = [i for b in reversed(path) for i in func.instrs[blocks[b].start:blocks[b].end]]
    opcodes: Dict[str, int] = {}
    for i in instrs:
        opcodes[i.base] = opcodes.get(i.base, 0) + 1
    wl = [i for i in instrs if is_weight_load(i)]
    return SteadyState(
        instructions=len(instrs), weight_loads=len(wl),
        weight_load_bytes=sum(i.load_bytes for i in wl),
        other_global_loads=sum(i.base in GLOBAL_LOAD_OPCODES for i in instrs) - len(wl),
        shared_loads=opcodes.get("LDS", 0), local_memory=sum(
            opcodes.get(op, 0) for op in LOCAL_MEMORY_OPCODES),
        barriers=opcodes.get("BAR", 0), opcodes=dict(sorted(opcodes.items())))

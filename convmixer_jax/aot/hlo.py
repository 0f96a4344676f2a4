"""Reading a compiled program's optimised HLO text: collectives, FLOPs, the TPU compiler's cycles.

What a compiler decided is in its optimised HLO, whatever the platform: which collectives the
SPMD partitioner inserted, how much matrix work each device does, and (on TPU) libtpu's
estimated cycles per operation. XLA's own `cost_analysis()` counts a loop body once however often
it runs (a scanned ConvMixer's blocks), and the GPU compiler reports none, so FLOPs are counted
here from the dots and convolutions, loop bodies times their known trip counts.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
          "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%([^\s(]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([^\s=]+) = (.*)$")
# cuDNN's convolution custom calls: which of (operand 0, operand 1, result) is the forward
# convolution's input, kernel and output.
_CUDNN_ROLES = {
    "__cudnn$convForward": ("op0", "op1", "out"),
    "__cudnn$convBiasActivationForward": ("op0", "op1", "out"),
    "__cudnn$convBackwardInput": ("out", "op1", "op0"),
    "__cudnn$convBackwardFilter": ("op0", "out", "op1"),
}


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (dtype, dims) of each array in the result
    op: str
    operands: tuple[str, ...]
    args: str  # the operand list as written (a constant's value)
    attrs: str  # everything after the operand list


def _split_type(body: str) -> tuple[str, str]:
    """('TYPE', 'rest') of an instruction's right-hand side; TYPE may be a (nested) tuple."""
    if not body.startswith("("):
        kind, _, rest = body.partition(" ")
        return kind, rest
    depth = 0
    for i, char in enumerate(body):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return body[: i + 1], body[i + 2 :]
    return body, ""


def _operands(rest: str) -> tuple[str, str, str]:
    """(op, operand text, attributes) of 'op(operands), attrs'."""
    op, _, rest = rest.partition("(")
    depth = 1
    for i, char in enumerate(rest):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return op, rest[:i], rest[i + 1 :]
    return op, rest, ""


def parse(text: str) -> dict[str, list[Instruction]]:
    """{computation name: its instructions}; the entry computation is also under 'ENTRY'."""
    computations: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for line in text.splitlines():
        header = _HEADER.match(line)
        if header:
            current = computations.setdefault(header.group(2), [])
            if header.group(1):
                computations["ENTRY"] = current
            continue
        found = _INSTRUCTION.match(line) if current is not None else None
        if not found:
            continue
        kind, rest = _split_type(found.group(2))
        op, operand_text, attrs = _operands(rest)
        shapes = tuple(
            (dtype, tuple(int(d) for d in dims.split(",") if d))
            for dtype, dims in _ARRAY.findall(kind)
            if dtype in _BYTES
        )
        operands = tuple(re.findall(r"%([^\s,)]+)", operand_text))
        current.append(
            Instruction(found.group(1), shapes, op.strip(), operands, operand_text, attrs)
        )
    return computations


def _nbytes(shapes) -> int:
    return sum(_BYTES[dtype] * math.prod(dims) for dtype, dims in shapes)


def collectives(text: str) -> dict:
    """Counts of each collective in the program (an async pair counted once) and the bytes of
    the largest all-gather's result."""
    counts = dict.fromkeys(COLLECTIVES, 0)
    largest = 0
    for instructions in _unique(parse(text)):
        for ins in instructions:
            kind = ins.op.removesuffix("-start")
            if kind in counts:
                counts[kind] += 1
                if kind == "all-gather":
                    largest = max(largest, max((_nbytes([s]) for s in ins.shapes), default=0))
    return {**counts, "largest_all_gather_bytes": largest}


def _unique(computations: dict[str, list[Instruction]]):
    seen = set()
    for name, instructions in computations.items():
        if name != "ENTRY" and id(instructions) not in seen:
            seen.add(id(instructions))
            yield instructions


def _window(attrs: str) -> dict[str, list]:
    """A convolution's window={...}, one entry per spatial dimension: size, stride, pad as
    (lo, hi), lhs_dilate and rhs_dilate (XLA's defaults where absent)."""
    found = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(item.split("=") for item in found.group(1).split()) if found else {}
    size = [int(d) for d in fields["size"].split("x")] if "size" in fields else []

    def each(key: str, parse, default) -> list:
        values = fields[key].split("x") if key in fields else []
        return [parse(v) for v in values] or [default] * len(size)

    return {
        "size": size,
        "stride": each("stride", int, 1),
        "pad": each("pad", lambda v: tuple(int(p) for p in v.split("_")), (0, 0)),
        "lhs_dilate": each("lhs_dilate", int, 1),
        "rhs_dilate": each("rhs_dilate", int, 1),
    }


def _valid_taps(
    out: int, size: int, stride: int, pad_lo: int, lhs: int, lhs_dilate: int, rhs_dilate: int
) -> int:
    """(output position, window position) pairs of one spatial dimension that read the input
    rather than padding."""
    count = 0
    for o in range(out):
        for k in range(size):
            p = o * stride + k * rhs_dilate - pad_lo
            count += 0 <= p <= (lhs - 1) * lhs_dilate and p % lhs_dilate == 0
    return count


def _conv_macs(
    lhs: tuple[int, ...], kernel: tuple[int, ...], out: tuple[int, ...], attrs: str
) -> int:
    """Multiply-adds of a convolution that read the input (not padding), as XLA counts them."""
    labels = re.search(r"dim_labels=([^_]+)_([^-]+)->(\S+?)(?:,|$)", attrs)
    lhs_labels, kernel_labels, out_labels = labels.groups()
    window = _window(attrs)
    spatial = 1
    for d in range(len(window["size"])):
        spatial *= _valid_taps(
            out[out_labels.index(str(d))], window["size"][d], window["stride"][d],
            window["pad"][d][0], lhs[lhs_labels.index(str(d))], window["lhs_dilate"][d],
            window["rhs_dilate"][d],
        )  # fmt: skip
    out_spatial = math.prod(out[out_labels.index(str(d))] for d in range(len(window["size"])))
    return math.prod(out) // out_spatial * spatial * kernel[kernel_labels.index("i")]


def _custom_call_macs(ins: Instruction, shapes: dict) -> int:
    target = re.search(r'custom_call_target="([^"]+)"', ins.attrs)
    target = target.group(1) if target else ""
    arrays = {"out": ins.shapes[0][1] if ins.shapes else ()}
    for i, name in enumerate(ins.operands[:2]):
        arrays[f"op{i}"] = shapes.get(name, ())
    if target in _CUDNN_ROLES:
        lhs, kernel, out = _CUDNN_ROLES[target]
        return _conv_macs(arrays[lhs], arrays[kernel], arrays[out], ins.attrs)
    if target.startswith("__cublas"):
        config = re.search(r"backend_config=(\{.*\})\s*$", ins.attrs)
        dims = json.loads(config.group(1)).get("gemm_backend_config", {})
        contracting = dims.get("dot_dimension_numbers", {}).get("lhs_contracting_dimensions", [])
        return math.prod(arrays["out"]) * math.prod(arrays["op0"][int(d)] for d in contracting)
    return 0


def _trip_count(ins: Instruction, computations) -> int:
    """A while loop's iterations: the compiler's known trip count where it states one, else the
    bound of the condition's `i < N` (a scan counts up from 0 by 1)."""
    found = re.search(r'"known_trip_count":\{"n":"([0-9]+)"', ins.attrs)
    if found:
        return int(found.group(1))
    condition = re.search(r"condition=%([^\s,}]+)", ins.attrs)
    instructions = computations.get(condition.group(1), []) if condition else []
    constants = {
        i.name: int(i.args) for i in instructions if i.op == "constant" and i.args.isdigit()
    }
    for i in instructions:
        if i.op == "compare" and "direction=LT" in i.attrs and i.operands[1] in constants:
            return constants[i.operands[1]]
    return 1


def flops(text: str) -> int:
    """2 x the multiply-adds of every dot and convolution the program executes (cuBLAS and
    cuDNN calls included), loop bodies counted once per iteration."""
    computations = parse(text)

    @functools.cache
    def of(name: str) -> int:
        instructions = computations.get(name, [])
        shapes = {ins.name: ins.shapes[0][1] if ins.shapes else () for ins in instructions}
        total = 0
        for ins in instructions:
            called = re.findall(r"(calls|body|to_apply)=%([^\s,}]+)", ins.attrs)
            if ins.op == "dot":
                found = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
                lhs = shapes.get(ins.operands[0], ())
                contracting = [int(d) for d in found.group(1).split(",") if d] if found else []
                total += 2 * math.prod(ins.shapes[0][1]) * math.prod(lhs[d] for d in contracting)
            elif ins.op == "convolution":
                lhs, kernel = (shapes.get(name, ()) for name in ins.operands[:2])
                total += 2 * _conv_macs(lhs, kernel, ins.shapes[0][1], ins.attrs)
            elif ins.op == "custom-call":
                total += 2 * _custom_call_macs(ins, shapes)
            elif ins.op == "while":
                body = dict(called).get("body")
                total += _trip_count(ins, computations) * of(body) if body else 0
            for key, callee in called:
                if key == "calls" or (key == "to_apply" and ins.op == "call"):
                    total += of(callee)
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            if branches:
                total += max(of(b.strip().lstrip("%")) for b in branches.group(1).split(","))
        return total

    return of("ENTRY")


def _kind(ins: Instruction, computations) -> str:
    """'depthwise' for a grouped convolution, 'matmul' for a dot or dense convolution, else
    'other'; a fusion is what its called computation contains."""
    inner = [ins] + [
        callee_ins
        for callee in re.findall(r"calls=%([^\s,}]+)", ins.attrs)
        for callee_ins in computations.get(callee, [])
    ]
    if any(re.search(r"(feature|batch)_group_count=", i.attrs) for i in inner):
        return "depthwise"
    if any(i.op in ("dot", "convolution") for i in inner):
        return "matmul"
    return "other"


def tpu_cycles_by_kind(text: str) -> dict[str, int]:
    """libtpu's estimated cycles of the entry computation's operations, summed by `_kind`;
    empty where the compiler gives no estimates (any platform but TPU)."""
    computations = parse(text)
    totals = {"depthwise": 0, "matmul": 0, "other": 0}
    found_any = False
    for ins in computations.get("ENTRY", []):
        cycles = re.search(r'"estimated_cycles":"([0-9]+)"', ins.attrs)
        if cycles:
            found_any = True
            totals[_kind(ins, computations)] += int(cycles.group(1))
    return totals if found_any else {}


def custom_calls(text: str, target: str) -> int:
    """How many of the entry computation's operations are custom calls to `target`."""
    marker = f'custom_call_target="{target}"'
    return sum(
        ins.op == "custom-call" and marker in ins.attrs for ins in parse(text).get("ENTRY", [])
    )

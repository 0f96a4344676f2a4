"""The accelerators this project is sized for: devices, memory and peak speed, in one table.

A target is a whole machine a run is launched on (a TPU pod slice, one or eight GPUs). The
ahead-of-time compiles (`aot.py`) build its devices without the hardware: TPU topologies through
libtpu, GPUs through the CUDA compiler given a description of the card. Usable HBM is what the
TPU compiler reports as available; on GPUs it is the share `launch/gpu.sh` lets JAX take
(XLA_PYTHON_CLIENT_MEM_FRACTION=0.90) of the card's memory. Peak TFLOP/s are the datasheets' dense
bf16 figures, which MFU is taken against.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30
GPU_MEM_FRACTION = 0.90  # launch/gpu.sh's XLA_PYTHON_CLIENT_MEM_FRACTION


@dataclasses.dataclass(frozen=True)
class GpuCard:
    """What the CUDA compiler needs to know of a card (XLA's GpuTargetConfigProto)."""

    name: str  # CUDA's device name, which JAX reports as device_kind
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: int  # bytes/s
    l2_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int
    fp32_units_per_sm: int

    def target_config(self) -> str:
        major, minor = self.compute_capability
        return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_sm}
  threads_per_core_limit: 2048
  core_count: {self.sm_count}
  fpus_per_core: {self.fp32_units_per_sm}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {self.memory_bandwidth}
  l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz}
  device_memory_size: {self.memory_bytes}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
device_description_str: "{self.name}"
"""


H100 = GpuCard(
    "NVIDIA H100 80GB HBM3", (9, 0), 132, 1.98, 84_978_434_048, 3_352_320_000_000,
    50 * 2**20, 233_472, 232_448, 128,
)  # fmt: skip
A100 = GpuCard(
    "NVIDIA A100-SXM4-80GB", (8, 0), 108, 1.41, 85_100_068_864, 2_039_040_000_000,
    40 * 2**20, 167_936, 166_912, 64,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # 'tpu' or 'cuda'
    topology: str  # libtpu's topology name, or the CUDA plugin's 'hosts x ? x GPUs per host'
    devices: int
    hbm_bytes: int  # usable memory per device
    peak_tflops: float  # dense bf16, per device
    chip_config: str = ""  # TPU: 'megacore' makes a v4 chip's two TensorCores one device
    hosts_shape: tuple[int, int, int] | None = None  # TPU chips per host, where not the default
    card: GpuCard | None = None

    @property
    def single(self) -> Target:
        """One device of the same kind, for comparing a sharded program with one device's."""
        if self.platform == "cuda":
            return dataclasses.replace(self, name=f"{self.name}:1", topology="1x1x1", devices=1)
        chip = self.topology.split(":")[0]
        shape = "1x1" if chip in ("v5e", "v6e") else "1x1x1"
        return dataclasses.replace(
            self, name=f"{self.name}:1", topology=f"{chip}:{shape}", devices=1,
            hosts_shape=(1, 1, 1),
        )  # fmt: skip


def _gpus(name: str, card: GpuCard, count: int, peak: float) -> Target:
    usable = int(card.memory_bytes * GPU_MEM_FRACTION)
    return Target(name, "cuda", f"1x1x{count}", count, usable, peak, card=card)


TARGETS = {
    t.name: t
    for t in (
        Target("v4-8", "tpu", "v4:2x2x1", 4, int(30.75 * GIB), 275.0, "megacore"),
        Target("v4-32", "tpu", "v4:2x2x4", 16, int(30.75 * GIB), 275.0, "megacore"),
        Target("v5e-16", "tpu", "v5e:4x4", 16, int(15.75 * GIB), 197.0),
        Target("v5p-32", "tpu", "v5:2x2x4", 16, int(95.74 * GIB), 459.0),
        Target("v6e-8", "tpu", "v6e:2x4", 8, int(31.25 * GIB), 918.0, hosts_shape=(2, 4, 1)),
        _gpus("h100", H100, 1, 989.0),
        _gpus("h100x8", H100, 8, 989.0),
        _gpus("a100", A100, 1, 312.0),
        _gpus("a100x8", A100, 8, 312.0),
    )
}

# Dense bf16 peak TFLOP/s of one device, by the device_kind JAX reports on real hardware.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": 989.0,
    "NVIDIA H100": 989.0,
    "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0,
    "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5": 459.0,
    "TPU v6 lite": 918.0,
}


def get(name: str) -> Target:
    """The target `name`, or a ValueError listing the known ones."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[name]

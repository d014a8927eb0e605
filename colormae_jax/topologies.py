"""Hardware that a step can be compiled for without being attached: TPU slices and NVIDIA GPU nodes.

:func:`resolve` turns a name such as ``v5e:4x4``, ``v5e-16``, ``v4-32``, ``h100:8`` or ``h100:2x8``
(hosts x GPUs) into a :class:`Target`: compile-only devices from
``jax.experimental.topologies.get_topology_desc`` and the chip's public figures (memory, dense
bf16 peak, HBM bandwidth) that the pre-flight check (``python -m colormae_jax.tools.preflight``)
reports against. TPU compiles need libtpu (``pip install -e ".[tpu]"``), NVIDIA ones the CUDA
plugin (``pip install -e ".[cuda]"``) and a GPU target config per kind (built in for A100, H100 and
H200, or read from a file). docs/preflight.md.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

GiB = 2 ** 30
FLAG = '--topology'  # how the errors name what is wrong


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's public figures. ``peak_flops``: dense bf16 matrix FLOP/s; ``bandwidth``: HBM bytes/s."""
    kind: str
    name: str
    platform: str  # 'tpu' | 'gpu'
    memory_bytes: int
    peak_flops: float
    bandwidth: float


# Published per-chip figures (one compile device per chip: v4 and v5p as megacore).
TPU_CHIPS = {
    'v4': Chip('v4', 'TPU v4', 'tpu', 32 * GiB, 275e12, 1228e9),
    'v5e': Chip('v5e', 'TPU v5e', 'tpu', 16 * GiB, 197e12, 819e9),
    'v5p': Chip('v5p', 'TPU v5p', 'tpu', 95 * GiB, 459e12, 2765e9),
    'v6e': Chip('v6e', 'TPU v6e', 'tpu', 32 * GiB, 918e12, 1640e9),
}
TPU_DEVICE_KINDS = {'TPU v4': 'v4', 'TPU v5 lite': 'v5e', 'TPU v5': 'v5p', 'TPU v6 lite': 'v6e'}  # device_kind
TPU_3D = ('v4', 'v5p')  # 3-D tori, named by TensorCores in Cloud names (v4-32: 16 chips), megacore chips

# GpuTargetConfig text protos (stream_executor.GpuTargetConfigProto) with each card's public figures;
# XLA compiles for the card they describe. Dense bf16 peaks (without sparsity) beside them.
_GPU_FIELDS = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core}
  threads_per_core_limit: 2048
  core_count: {cores}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {cc_major} minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""
GPU_TARGET_CONFIGS = {
    'a100': _GPU_FIELDS.format(smem_core=167936, cores=108, fpus=64, bandwidth=2039040000000, l2=41943040,
                               clock=1.41, memory=85100068864, smem_optin=166912, cc_major=8,
                               name='NVIDIA A100-SXM4-80GB'),
    'h100': _GPU_FIELDS.format(smem_core=233472, cores=132, fpus=128, bandwidth=3352320000000, l2=52428800,
                               clock=1.98, memory=84942979072, smem_optin=232448, cc_major=9,
                               name='NVIDIA H100 80GB HBM3'),
    'h200': _GPU_FIELDS.format(smem_core=233472, cores=132, fpus=128, bandwidth=4800000000000, l2=52428800,
                               clock=1.98, memory=151397597184, smem_optin=232448, cc_major=9,
                               name='NVIDIA H200 141GB HBM3e'),
}
GPU_PEAK_FLOPS = {'a100': 312e12, 'h100': 989e12, 'h200': 989e12}  # dense bf16 (SXM)
GPUS_PER_HOST = 8

TPU_INSTALL = 'pip install -e ".[tpu]" -c constraints.txt'
CUDA_INSTALL = 'pip install -e ".[cuda]" -c constraints.txt'


@dataclasses.dataclass
class Target:
    """A named slice or node: its compile-only devices and its chip."""
    name: str      # as given
    topology: str  # what get_topology_desc was given, e.g. 'v5e:4x4' or 'h100 1x1x8'
    chip: Chip
    devices: list
    processes: int

    @property
    def platform(self) -> str:
        return self.chip.platform

    def describe(self) -> str:
        hosts = f', {self.processes} hosts' if self.processes > 1 else ''
        return f'{self.name} ({len(self.devices)} x {self.chip.name}{hosts})'


class TopologyError(ValueError):
    """A topology that cannot be compiled for: the message names it and what to do."""


def _error(name: str, msg: str) -> TopologyError:
    return TopologyError(f'{FLAG}={name}: {msg}')


def split_names(text: str) -> list[str]:
    names = [x.strip() for x in (text or '').split(',') if x.strip()]
    if not names:
        raise _error(text or "''", 'no topology given; e.g. --topology=v5e:4x4,h100:8 ' + _choices())
    return names


def _choices() -> str:
    return (f'(TPU: {", ".join(TPU_CHIPS)} as KIND:AxB[xC] or a Cloud name such as v5e-16, v4-32, v5p-64; '
            f'GPU: {", ".join(sorted(GPU_TARGET_CONFIGS))} as KIND:N or KIND:HOSTSxN)')


def torus(kind: str, chips: int) -> str:
    """The slice shape of ``chips`` chips of ``kind`` (a power of two), e.g. v5e 16 -> '4x4', v4 16 -> '2x2x4'."""
    dims = [2, 2, 1] if kind in TPU_3D else [2, 2]
    if chips < math.prod(dims) or chips & (chips - 1):
        raise ValueError(chips)
    while math.prod(dims) < chips:  # double the last of the smallest sides: 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4
        i = max(j for j, d in enumerate(dims) if d == min(dims))
        dims[i] *= 2
    return 'x'.join(map(str, dims))


def parse(name: str) -> tuple[str, str, dict]:
    """``name`` -> (platform, kind, arguments): ('tpu', 'v5e', {'topology': 'v5e:4x4'}) or
    ('gpu', 'h100', {'hosts': 1, 'gpus': 8}). Raises :class:`TopologyError` naming the valid forms."""
    n = name.strip().lower()
    m = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', n)  # a Cloud name: chips (v5e, v6e) or TensorCores (v4, v5p)
    if m:
        kind, count = m[1], int(m[2])
        if kind not in TPU_CHIPS:
            raise _error(name, f'unknown TPU {kind!r}; valid: {", ".join(TPU_CHIPS)}')
        chips = count // 2 if kind in TPU_3D else count
        try:
            return 'tpu', kind, {'topology': f'{kind}:{torus(kind, chips)}'}
        except ValueError:
            smallest = 8 if kind in TPU_3D else 4
            raise _error(name, f'no {kind} slice of {count} {"TensorCores" if kind in TPU_3D else "chips"}; use a '
                               f'power of two from {smallest}, e.g. {kind}-{smallest * 4}') from None
    m = re.fullmatch(r'(v\d+[a-z]*):(\d+(?:x\d+){1,2})', n)
    if m:
        if m[1] not in TPU_CHIPS:
            raise _error(name, f'unknown TPU {m[1]!r}; valid: {", ".join(TPU_CHIPS)}')
        want = 3 if m[1] in TPU_3D else 2
        if m[2].count('x') + 1 != want:
            raise _error(name, f'{m[1]} slices have {want} sides, e.g. {m[1]}:{torus(m[1], 16)}')
        return 'tpu', m[1], {'topology': n}
    m = re.fullmatch(r'([a-z][a-z0-9_]*?)(?::(?:(\d+)x)?(\d+))?', n)
    if m and not re.fullmatch(r'v\d+[a-z]*', m[1]):
        hosts, gpus = int(m[2] or 1), int(m[3] or GPUS_PER_HOST)
        if not 1 <= gpus <= GPUS_PER_HOST or hosts < 1:
            raise _error(name, f'a node has 1 to {GPUS_PER_HOST} GPUs (KIND:N), several nodes are KIND:HOSTSxN, '
                               f'e.g. {m[1]}:2x8')
        return 'gpu', m[1], {'hosts': hosts, 'gpus': gpus}
    raise _error(name, f'not a topology name; valid forms: {_choices()}')


def gpu_chip(kind: str, target_config: str, peak_flops: float | None) -> Chip:
    """A GPU's figures: memory and bandwidth read from its target config, the peak from the
    built-in table or ``peak_flops``."""
    def field(key: str) -> float:
        m = re.search(rf'\b{key}\s*:\s*([0-9.eE+]+)', target_config)
        if not m:
            raise _error(kind, f'the target config has no {key}; give a full GpuTargetConfig text proto')
        return float(m[1])
    desc = re.search(r'device_description_str\s*:\s*"([^"]*)"', target_config)
    peak = peak_flops or GPU_PEAK_FLOPS.get(kind)
    if not peak:
        raise _error(kind, f'no bf16 peak known for GPU kind {kind!r}; give it, e.g. --peak_tflops={kind}=2250')
    return Chip(kind, desc[1] if desc else kind.upper(), 'gpu', int(field('device_memory_size')), peak,
                field('memory_bandwidth'))


def check_plugin(platform: str, name: str) -> None:
    """Refuses (one line, what to install) when the compiler for ``platform`` is not installed."""
    if platform == 'tpu' and importlib.util.find_spec('libtpu') is None:
        raise _error(name, f'compiling for TPU needs libtpu, which is not installed; {TPU_INSTALL}')
    if platform == 'gpu':
        try:
            found = importlib.util.find_spec('jax_plugins.xla_cuda12') is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            raise _error(name, f'compiling for NVIDIA GPUs needs the CUDA plugin (jax-cuda12-plugin and '
                               f'jax-cuda12-pjrt), which is not installed; {CUDA_INSTALL}')


def read_target_configs(items: list[str]) -> dict[str, str]:
    """``['b200=path.txtpb', ...]`` -> {kind: text}, over the built-in ones."""
    out = dict(GPU_TARGET_CONFIGS)
    for item in items or []:
        kind, eq, path = item.partition('=')
        if not eq or not kind.strip() or not path.strip():
            raise TopologyError(f'--target_config={item}: expected KIND=FILE, e.g. --target_config=b200=b200.txtpb')
        if not os.path.isfile(path):
            raise TopologyError(f'--target_config={item}: {path}: no such file; give a GpuTargetConfig text proto')
        with open(path) as f:
            out[kind.strip().lower()] = f.read()
    return out


def resolve(name: str, target_configs: dict[str, str] | None = None,
            peak_flops: dict[str, float] | None = None) -> Target:
    """The compile-only devices of ``name`` (see :func:`parse`)."""
    import jax
    from jax.experimental import topologies

    platform, kind, args = parse(name)
    check_plugin(platform, name)
    if platform == 'tpu':
        kw = {'chip_config_name': 'megacore'} if kind in TPU_3D else {}
        try:
            devices = list(topologies.get_topology_desc(args['topology'], 'tpu', **kw).devices)
        except (jax.errors.JaxRuntimeError, RuntimeError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _error(name, f'libtpu refused {args["topology"]!r} ({msg}); e.g. {kind}:{torus(kind, 16)}') from None
        chip, topo = TPU_CHIPS[kind], args['topology']
    else:
        configs = target_configs if target_configs is not None else GPU_TARGET_CONFIGS
        if kind not in configs:
            raise _error(name, f'no target config for GPU kind {kind!r}; built in: {", ".join(sorted(configs))}; '
                               f'give one with --target_config={kind}=FILE.txtpb (a GpuTargetConfig text proto)')
        chip = gpu_chip(kind, configs[kind], (peak_flops or {}).get(kind))
        topo = f'1x{args["hosts"]}x{args["gpus"]}'
        try:
            devices = list(topologies.get_topology_desc(kind, 'cuda', target_config=configs[kind],
                                                        topology=topo).devices)
        except (jax.errors.JaxRuntimeError, RuntimeError, NotImplementedError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise _error(name, f'the CUDA plugin refused it ({msg}); check the target config, or set '
                               f'JAX_PLATFORMS=cpu') from None
        topo = f'{kind} {topo}'
    processes = len({d.process_index for d in devices})
    return Target(name, topo, chip, devices, processes)

"""The one-line description of the machine every benchmark prints with its figures.

CPU timings depend on the vector instruction sets as much as on the core count (bf16 matmuls are
emulated without AVX512-BF16 / AMX, several times slower), so the line names the CPU model, the
instruction sets PyTorch's kernels can use, and the kernel level PyTorch picked.
"""
import os
import platform

import torch

# Instruction sets that change which CPU kernels PyTorch / oneDNN run, in /proc/cpuinfo's spelling.
ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16",
             "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve")


def cpu_model_and_flags(cpuinfo="/proc/cpuinfo"):
    """(CPU model name, [instruction-set flags of ISA_FLAGS present]); platform values off Linux."""
    model, flags = None, set()
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model is None:
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return model or platform.processor() or platform.machine(), [f for f in ISA_FLAGS if f in flags]


def describe_machine(device="cpu", threads=None):
    """'<GPU> | CPU <model>, <n> cores, <threads> threads, ISA <flags>, torch CPU kernels <level> | torch <version>'."""
    model, flags = cpu_model_and_flags()
    cpu = (f"CPU {model}, {os.cpu_count()} cores, {threads or torch.get_num_threads()} threads, "
           f"ISA {' '.join(flags) or 'unknown'}, torch CPU kernels {torch.backends.cpu.get_cpu_capability()}")
    parts = [cpu, f"torch {torch.__version__}"]
    if str(device).startswith("cuda") and torch.cuda.is_available():
        parts.insert(0, torch.cuda.get_device_name())
    return " | ".join(parts)


def sync(device):
    """Wait for the device's queued kernels (CUDA), so that a timer measures the work itself."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)

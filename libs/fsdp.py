"""Fully sharded training (FSDP2, `torch.distributed.fsdp.fully_shard`), on with `config.fsdp.enabled=True`.

Every process holds 1 / N of the parameters, gradients, AdamW state and EMA (N processes of one shard
group): one shard unit per U-ViT block (in-blocks, middle block, out-blocks) plus the root, which holds the
embeddings, pos_embed and the head. A unit's weights are all-gathered just before its forward and backward and
freed after (`reshard_after_forward`); its gradients are reduce-scattered, averaged over the processes as DDP
averages them. With `replicate` > 1 the processes form a (replicate x shard) mesh (HSDP): shards within a group
(one node), replicas across groups, so the all-gathers stay on the node's fast links.

Through torch directly, not accelerate's FSDP plugin: the trainer needs the EMA sharded like the network (a
second module the plugin does not prepare), its own per-parameter seeded meta-device initialisation, and its own
checkpoint layout (libs/sharded_checkpoint.py) beside the gathered nnet.pth / nnet_ema.pth every eval script
reads. accelerate still starts the processes and gives the device; the optimizer alone goes through
`accelerator.prepare`, the network stays out of it (it would be wrapped in DDP).

Mixed precision (`mixed_precision='bf16'`): FSDP's MixedPrecisionPolicy keeps float32 master weights and
optimizer state in the shards, all-gathers bf16 copies for the forward and backward, and reduces gradients in
float32; the network's output is float32. Launch with `--mixed_precision no` (accelerate's autocast would be a
second policy over the first).

Meta-device initialisation (`meta_init=True`): the network is built on the meta device (no memory), sharded,
then each process fills only its own shards. Module m's parameters are drawn as a U-ViT build draws them
(PyTorch's default, then the original's init: `UViTBase.init_module`) from a generator seeded with
(config.seed, CRC-32 of m's name), on the CPU, one module at a time; each process keeps its rows. The values are
therefore a function of the seed and the module names only: the same for any number of processes, and what a
one-process meta build gives. They are NOT the values of the ordinary build, which draws every module from one
stream in construction order (`meta_init=False`, the default, builds the full network on every process as DDP
does, then shards it: the same initial weights as a DDP run of the same seed).
"""
import contextlib
import logging
import zlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from libs.data_loader import mix_seed
from libs.errors import ConfigError
from libs.nnet import build_nnet

logger = logging.getLogger(__name__)

PRECISIONS = ('no', 'bf16')


def enabled(config) -> bool:
    """Whether `config` trains sharded (configs without an fsdp section do not)."""
    return bool(config.get('fsdp') and config.fsdp.enabled)


def problems(config, world_size: int):
    """[(key, message)] of what config.fsdp gets wrong (its values always; with the rest of the config and the
    `world_size` processes when enabled); [] when fine. Types are checked against configs/base.py by
    libs.config_utils, which calls this."""
    if not config.get('fsdp'):
        return []
    cfg, found = config.fsdp, []
    if cfg.mixed_precision not in PRECISIONS:
        found.append(('fsdp.mixed_precision', f"not one of {', '.join(map(repr, PRECISIONS))}"))
    if not (isinstance(cfg.replicate, int) and cfg.replicate >= 1):
        found.append(('fsdp.replicate', "must be >= 1: the number of replica groups (nodes) of HSDP, 1 = shard "
                                        "over every process"))
    if not enabled(config):
        return found
    if found == [] and world_size % cfg.replicate:
        found.append(('fsdp.replicate', f"does not divide the {world_size} process(es) into equal shard groups"))
    if cfg.cpu_offload is True and not torch.cuda.is_available():
        found.append(('fsdp.cpu_offload', "needs a CUDA device (it keeps the GPU's shards in pinned host memory); "
                                          "without one the shards are in host memory already: set it to False"))
    if config.get('repa') and config.repa.enabled:
        found.append(('repa.enabled', "REPA is not available with config.fsdp.enabled yet: turn one of them off"))
    if config.get('posthoc_ema') and config.posthoc_ema.snapshot_interval:
        found.append(('posthoc_ema.snapshot_interval', "post-hoc EMA profiles are not available with "
                                                        "config.fsdp.enabled yet: set it to 0"))
    if config.get('training_aids'):
        found.append(('training_aids', "training aids are not available with config.fsdp.enabled yet (they see "
                                       "one unsharded network): set it to ()"))
    return found


def device_mesh(cfg, world_size: int, device: torch.device):
    """The 1-D shard mesh, or HSDP's 2-D (replicate, shard) mesh when cfg.replicate > 1. A single process started
    without a launcher gets a one-process group of its own (sharding over 1 = the whole network, same code path)."""
    if world_size == 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo', store=dist.HashStore(), rank=0,
                                world_size=1)
    if cfg.replicate == 1:
        return init_device_mesh(device.type, (world_size,), mesh_dim_names=('shard',))
    return init_device_mesh(device.type, (cfg.replicate, world_size // cfg.replicate),
                            mesh_dim_names=('replicate', 'shard'))


def blocks(nnet: nn.Module):
    """The shard units below the root: every U-ViT block."""
    return [*nnet.in_blocks, nnet.mid_block, *nnet.out_blocks]


def shard(nnet: nn.Module, mesh, cfg) -> nn.Module:
    """fully_shard each block, then the root (in place; returns nnet). bf16: the blocks hand bf16 tokens on, the
    root's output (the network's) is float32."""
    def precision(output_dtype):
        if cfg.mixed_precision != 'bf16':
            return MixedPrecisionPolicy()
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=output_dtype)

    options = dict(mesh=mesh, reshard_after_forward=cfg.reshard_after_forward,
                   offload_policy=CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy())
    for block in blocks(nnet):
        fully_shard(block, mp_policy=precision(None), **options)
    return fully_shard(nnet, mp_policy=precision(torch.float32), **options)


def _stand_in(module: nn.Module) -> nn.Module:
    """A shallow copy of `module` whose own parameters are new float32 CPU tensors of their full shapes (the
    children are left out): what `init_module` writes a module's initial values into."""
    copy = module.__class__.__new__(module.__class__)
    copy.__dict__ = dict(module.__dict__)
    copy._modules = {}
    copy._parameters = {n: None if p is None else nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device='cpu'),
                                                                requires_grad=False)
                        for n, p in module._parameters.items()}  # None: e.g. a Linear's absent bias
    return copy


@torch.no_grad()
def materialize(nnet: nn.Module, device: torch.device, seed: int):
    """Fill a meta-built, sharded network's shards on `device` with the per-module seeded values of the module
    docstring. Memory: this process's shards plus one module's full parameters on the CPU at a time."""
    nnet.to_empty(device=device)
    init_module = type(nnet).init_module
    for name, module in nnet.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not own:
            continue
        stand_in = _stand_in(module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(seed, zlib.crc32(name.encode())))
            init_module(stand_in)
        for n, p in own.items():
            full = stand_in._parameters[n].to(device)
            if isinstance(p, DTensor):  # src_data_rank=None: every process keeps its rows of its own copy
                full = distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local()
                p = p.to_local()
            p.copy_(full)


@torch.no_grad()
def copy_values(target: nn.Module, source: nn.Module):
    """target's parameters and buffers <- source's, shard by shard (both sharded the same way)."""
    for t, s in zip([*target.parameters(), *target.buffers()], [*source.parameters(), *source.buffers()]):
        local(t).copy_(local(s))


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the parameter); t itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def full(t: torch.Tensor) -> torch.Tensor:
    """A replicated DTensor's value as a plain tensor (the gradient norm of sharded gradients); t otherwise."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def sharded_ema(nnet: nn.Module, nnet_config, mesh, cfg, device: torch.device) -> nn.Module:
    """The EMA copy of a sharded `nnet`: built on the meta device, sharded the same way, filled with nnet's shards
    (it starts equal to the online network, as on the DDP path); frozen, in eval mode."""
    with torch.device('meta'):
        nnet_ema = build_nnet(nnet_config)
    shard(nnet_ema, mesh, cfg)
    nnet_ema.to_empty(device=device)
    copy_values(nnet_ema, nnet)
    return nnet_ema.requires_grad_(False).eval()


def build(config, device: torch.device, world_size: int):
    """(nnet, nnet_ema, mesh): the network of config.nnet and its EMA copy, both sharded the same way on `device`.
    Call after seeding the global generator with config.seed (libs.trainer does): meta_init=False draws the
    full network from it on every process, as the DDP path does."""
    cfg = config.fsdp
    mesh = device_mesh(cfg, world_size, device)
    if cfg.meta_init:
        with torch.device('meta'):
            nnet = build_nnet(config.nnet)
        shard(nnet, mesh, cfg)
        materialize(nnet, device, config.seed)
    else:
        nnet = shard(build_nnet(config.nnet).to(device), mesh, cfg)
    nnet_ema = sharded_ema(nnet, config.nnet, mesh, cfg, device)
    shards = sum(local(p).numel() for p in nnet.parameters())
    logger.info("FSDP2 over a %s mesh %s: %.2fM parameters here (%s, reshard after forward %s, CPU offload %s, "
                "%s initialisation)", 'x'.join(map(str, mesh.shape)), mesh.mesh_dim_names, shards / 1e6,
                cfg.mixed_precision, cfg.reshard_after_forward, cfg.cpu_offload,
                'per-module seeded meta-device' if cfg.meta_init else 'full-network')
    return nnet, nnet_ema, mesh


def full_state_dict(nnet: nn.Module, to_all: bool = False) -> dict:
    """The whole network's state dict, gathered (a collective: every process calls it). On the CPU of process 0
    only (the others get {}) unless `to_all`, which gives every process the full tensors on its device."""
    return get_model_state_dict(nnet, options=StateDictOptions(full_state_dict=True, cpu_offload=not to_all))


@contextlib.contextmanager
def unsharded_copy(nnet_ema: nn.Module, nnet_config, device):
    """A plain (unsharded) copy of a sharded EMA network for sampling (every process calls it: its forward then
    needs no collective, so processes may sample different numbers of batches, or one alone draws the grid);
    nnet_ema itself when it is not sharded. Costs one full copy of the network per process while in use."""
    if not any(isinstance(p, DTensor) for p in nnet_ema.parameters()):
        yield nnet_ema
        return
    state = full_state_dict(nnet_ema, to_all=True)
    with torch.device('meta'):
        copy = build_nnet(nnet_config)
    copy.load_state_dict(state, assign=True)
    copy.to(device).requires_grad_(False).eval()
    try:
        yield copy
    finally:
        del copy, state


def check_launch_precision(config, launch_precision: str):
    """ConfigError when a sharded run is launched with accelerate's mixed precision (`launch_precision`, from
    `accelerate launch --mixed_precision`): FSDP's policy (config.fsdp.mixed_precision) sets it instead."""
    if enabled(config) and launch_precision != 'no':
        raise ConfigError(f"config.fsdp.enabled=True with `accelerate launch --mixed_precision {launch_precision}`: "
                          f"sharded training sets its precision itself; launch with --mixed_precision no and set "
                          f"--config.fsdp.mixed_precision=bf16")


def load_full(nnet: nn.Module, nnet_config, load):
    """Load full weights into a sharded `nnet`: `load(plain)` fills a plain CPU network of nnet_config (e.g.
    libs.finetune.init_weights, which checks and adapts them), whose values every process then keeps its rows of.
    Costs one full network in host memory per process."""
    plain = build_nnet(nnet_config)
    load(plain)
    set_model_state_dict(nnet, plain.state_dict(), options=StateDictOptions(full_state_dict=True))

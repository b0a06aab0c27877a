"""The one training loop behind the four train*.py scripts; what differs between them lives in the `Family`
(libs/family.py). `train(config, workdir, family)` reads top to bottom: accelerate, model, data, resume, the hot
loop, then grids, checkpoints and evaluation at their intervals.

Hot loop rule: no host synchronisation per step. `train_step` seeds its noise from (seed, rank, step), so a
resumed run draws what the uninterrupted one did with no RNG state saved, and skips a step with non-finite
gradients on the device (fused AdamW's `found_inf`, the EMA's `applied`). The loss and the non-finite flags
stay on the device until every `log_interval` steps and every checkpoint, where `check_finite` reads them.
"""
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import math
import os
import time
from typing import Any

import torch
from absl import flags
from ml_collections import config_flags
from torchvision.utils import make_grid
from tqdm.auto import tqdm

from accelerate import Accelerator
from accelerate.utils import set_seed

from libs import fsdp, resume_policy, sharded_checkpoint, tracking, training_aids
from libs.autoencoder import autoencoder_of
from libs.checkpoint import checkpoint_path, checkpoint_problems, latest_checkpoint, resume, save_checkpoint
from libs.config_utils import (config_overrides, define_config_flag, paper_hyperparameters, parse_and_validate,
                               workdir_for)
from libs.data_loader import ResumableLoader, mix_seed, resolve_num_workers
from libs.datasets import dataset_kwargs, get_dataset
from libs.ema import EMAUpdater, make_ema
from libs.errors import ConfigError, MissingFileError, TrainingDivergedError, exit_on_user_error
from libs.evaluation import evaluate, generate_all
from libs.export import load_weights
from libs.family import guidance_scale
from libs.fatal import EmergencyCheckpoint, log_fatal_errors
from libs.finetune import init_weights
from libs.folder_score import MAX_SAMPLES as OFFLINE_SAMPLES
from libs.io_utils import atomic_write_bytes
from libs.logging_utils import log_once, setup_logging
from libs.metrics.suite import MetricOptions
from libs.nnet import build_nnet, load_nnet_state_dict
from libs.optim import build_lr_scheduler, build_optimizer
from libs.perf import configure_tf32, maybe_compile
from libs.preemption import StopRequested, StopSignals, resume_command
from libs.sample_grid import save_grid
from libs.sampling import Sampler
from libs.workdir_lock import WorkdirLock
from sde import Objective, build_diffusion

logger = logging.getLogger(__name__)


def write_json(obj, path):
    """Write `obj` as indented JSON, atomically."""
    atomic_write_bytes((json.dumps(obj, indent=1, sort_keys=True, default=str) + '\n').encode(), path)


def fid_unavailable(r) -> str:
    """'' when the Run can compute FID during training, else why not (said once; parse_and_validate checked
    config.fid.inception_weights)."""
    stat = r.config.fid.stat
    if not stat or not os.path.exists(stat):
        return (f"the FID reference statistics config.fid.stat={stat!r} are missing; make them with "
                f"tools/compute_fid_stats.py or fetch the published ones with tools/download.py (docs/evaluation.md)")
    if r.family.condition == 'text' and getattr(r.data, 'fid_contexts', None) is None:
        return 'the dataset gives no captions to sample with'
    return ''


@dataclasses.dataclass
class Record:
    """What a run has observed so far."""
    nonfinite: Any = None  # (n_steps + 1,) bool on the device: step s had a NaN/inf loss or gradients
    checked: int = 0  # nonfinite is read up to this step
    bad_steps: set = dataclasses.field(default_factory=set)  # the steps found non-finite so far
    history: dict = dataclasses.field(default_factory=lambda: {'fid': {}, 'score': {}})
    logged: list = dataclasses.field(default_factory=list)  # the metrics of every log line of this process's run
    sums: dict = dataclasses.field(default_factory=dict)  # the aids' loss terms summed since the last log (device)


def _recorded(name):
    """A Run attribute kept in its Record (run.history is run.record.history)."""
    return property(lambda r: getattr(r.record, name), lambda r, v: setattr(r.record, name, v))


@dataclasses.dataclass
class Run:
    """What the helpers of one training run share (built once by `train`)."""
    config: Any
    workdir: str
    family: Any
    accelerator: Any
    data: Any
    nnet: torch.nn.Module  # the bare online network (what is saved)
    nnet_ema: torch.nn.Module
    optimizer: Any
    lr_scheduler: Any
    loader: Any
    autoencoder: Any
    null: Any  # null label / empty context of guidance, or None
    train_nnet: Any = None  # the aids' wrap of nnet as prepared by accelerate (DDP, compiled): what train_step runs
    aids: list = dataclasses.field(default_factory=list)  # the training aids (libs/training_aids.py)
    record: Record = dataclasses.field(default_factory=Record)
    nonfinite, checked, bad_steps, history, logged = map(_recorded, ('nonfinite', 'checked', 'bad_steps', 'history',
                                                                     'logged'))

    @functools.cached_property
    def diffusion(self):
        return build_diffusion(self.family.time, Objective.of(self.config), self.null)

    @functools.cached_property
    def ema(self):
        """The EMAUpdater of nnet_ema."""
        return EMAUpdater(self.nnet_ema, self.nnet)

    @property
    def p_uncond(self) -> float:
        """The probability train_step drops the condition (guidance training)."""
        dataset = self.config.get('dataset')
        return float(dataset.p_uncond) if dataset and dataset.cfg else 0.0

    def __getattr__(self, name):  # an aid's own public objects, for notebooks and tests
        for aid in self.__dict__.get('aids', ()):
            if hasattr(aid, name):
                return getattr(aid, name)
        raise AttributeError(f"'Run' object has no attribute '{name}'")

    @property
    def ckpt_root(self):
        return os.path.join(self.workdir, 'ckpts')

    @property
    def device(self):
        return self.accelerator.device

    def forked_rng(self):
        """Evaluation draws from its own seeds and must not move the training generators."""
        return torch.random.fork_rng(devices=[self.device] if self.device.type == 'cuda' else [])

    def generate_fn(self, use, labels, contexts):
        """The EMA network's generate_fn (libs.sampling.Sampler) with the protocol `use` of Family.protocol."""
        sampler = Sampler.for_config(self.config, self.family, self.nnet_ema, self.device, self.autoencoder, self.null)
        return sampler.generate_fn(*self.family.protocol(self.config, use), labels=labels, contexts=contexts)


def train_step(r: Run, batch, step: int):
    """Optimizer step number step + 1 on a loader batch, or on a list of k equal micro-batches (gradient
    accumulation); returns (mean loss, grad_norm, applied): device tensors, no host sync. A step with
    non-finite gradients leaves the weights, EMA and optimizer as they were."""
    cfg, acc = r.config, r.accelerator
    torch.manual_seed(mix_seed(mix_seed(cfg.seed, acc.process_index), step))  # noise, t, dropout of this step
    batches = batch if isinstance(batch, list) else [batch]
    k, loss, terms = len(batches), 0.0, {}
    for i, micro_batch in enumerate(batches):
        micro_batch = {name: v.to(r.device, non_blocking=True) if torch.is_tensor(v) else v  # from pinned memory
                       for name, v in micro_batch.items()}
        x0, cond = r.family.prepare_batch(micro_batch, r.autoencoder)
        cond = r.family.drop_condition(cond, r.p_uncond, r.null)
        # Equal micro-batches: the mean of their mean losses is the batch's mean loss, so each backward gets
        # 1 / k of it. DDP all-reduces once, at the last backward (no_sync accumulates locally before it).
        with acc.no_sync(r.train_nnet) if i < k - 1 else contextlib.nullcontext():
            micro = total = r.diffusion.loss(r.train_nnet, x0, **cond).mean()
            for aid in r.aids:  # the aids' terms, on the same forward
                for name, (weight, term) in aid.losses(micro_batch).items():
                    total = total + weight * term
                    terms[name] = terms.get(name, 0.0) + term.detach() / k
            acc.backward(total / k)
        loss = loss + micro.detach() / k
    # The norm of the all-reduced gradients: the same on every process, so all skip the same steps. The aids'
    # extra parameters (in their wrap of the network) are clipped and stepped with it.
    grad_norm = acc.clip_grad_norm_(r.train_nnet.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    grad_norm = fsdp.full(grad_norm)  # sharded gradients (config.fsdp): their norm is a replicated DTensor
    applied = torch.isfinite(grad_norm)
    r.optimizer.optimizer.found_inf = (~applied).float()  # fused AdamW skips the update (fp16: the scaler sets it)
    r.optimizer.step()
    r.lr_scheduler.step()
    r.ema.update(cfg.ema_rate, applied)
    for aid in r.aids:
        aid.after_step(r, step + 1, applied)
    for name, term in terms.items():
        r.record.sums[name] = r.record.sums.get(name, 0.0) + torch.where(applied, term, 0.0)
    r.optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, applied


def check_finite(r: Run, step: int):
    """Read the non-finite flags of the steps since the last check (one host sync), log each, and raise
    TrainingDivergedError when they break config.train.max_nonfinite_in_a_row / max_nonfinite_in_window."""
    if step <= r.checked:  # every process has the same r.checked: all skip this collective together
        return
    t = r.config.train
    marked = r.accelerator.reduce(r.nonfinite[r.checked + 1:step + 1].to(torch.int32), 'sum')
    new = [r.checked + 1 + i for i in marked.nonzero().flatten().tolist()]
    r.checked = step
    for s in new:
        logger.warning("step %d: NaN/infinite loss or gradients; the step was skipped (weights, EMA and optimizer "
                       "unchanged)", s)
        r.bad_steps.add(s)
        in_a_row = next(k for k in itertools.count(1) if s - k not in r.bad_steps)
        in_window = sum(b > s - t.nonfinite_window for b in r.bad_steps)
        if in_a_row >= t.max_nonfinite_in_a_row or in_window >= t.max_nonfinite_in_window:
            good = latest_checkpoint(r.ckpt_root)
            raise TrainingDivergedError(
                f"the loss became NaN or infinite at step {s} ({in_a_row} step(s) in a row, {in_window} in the last "
                f"{t.nonfinite_window}; limits config.train.max_nonfinite_in_a_row={t.max_nonfinite_in_a_row}, "
                f"max_nonfinite_in_window={t.max_nonfinite_in_window}); nothing was saved after it. The last good "
                f"checkpoint is {good or 'none (no checkpoint yet)'}. Lower config.optimizer.lr or set "
                f"config.grad_clip (e.g. 1.0), and rerun the same command to resume from it.")


def checkpoint_options(r: Run) -> dict:
    """What every checkpoint of the run saves beside the networks and optimizer: train_state.pth, keep-last and
    the best FID's step that keep-last never deletes."""
    fids, scaler = r.history['fid'], r.accelerator.scaler
    return dict(lr_scheduler=r.lr_scheduler, keep_last=r.config.train.keep_last_ckpts or None,
                train_state={'data': r.loader.state_dict(), 'history': r.history,
                             'scaler': scaler.state_dict() if scaler is not None else None,
                             'config': r.config.to_dict(),  # what libs.resume_policy compares
                             **training_aids.state_dict(r.aids)},
                protect=(min(fids, key=fids.get),) if fids else ())


def write_checkpoint(r: Run, step: int) -> str:
    """Write ckpts/<step>.ckpt from this process alone, no collective (save(); libs.fatal's emergency one)."""
    return save_checkpoint(r.ckpt_root, step, nnet=r.nnet, nnet_ema=r.nnet_ema, optimizer=r.optimizer,
                           **checkpoint_options(r))


def save(r: Run, step: int) -> str:
    """Checkpoint ckpts/<step>.ckpt (rank 0 writes, all ranks take part; sharded runs: every rank writes its
    shards, libs/sharded_checkpoint.py); never after a divergence."""
    check_finite(r, step)
    if fsdp.enabled(r.config):
        return sharded_checkpoint.save(r.accelerator, r.ckpt_root, step, nnet=r.nnet, nnet_ema=r.nnet_ema,
                                       optimizer=r.optimizer, **checkpoint_options(r))
    path = checkpoint_path(r.ckpt_root, step)
    if r.accelerator.is_main_process:
        write_checkpoint(r, step)
    r.accelerator.wait_for_everyone()
    return path


def save_at_stop(r: Run, step: int, last_ckpt) -> str:
    """The checkpoint of the last finished step when a stop ends the run: `last_ckpt` when it is that step's,
    else written now. One process: save(). Several: the main process writes alone, with no collective (the
    others may be inside one of an interrupted evaluation until the launcher ends them)."""
    path = checkpoint_path(r.ckpt_root, step)
    if last_ckpt == path and os.path.isdir(path) and not checkpoint_problems(path):
        return path
    if r.accelerator.num_processes == 1:
        return save(r, step)
    if fsdp.enabled(r.config):  # no process holds the whole state: the last periodic checkpoint stands
        logger.warning("no checkpoint of step %d: a sharded run cannot write one from a process alone while the "
                       "others may be in a collective of the interrupted sampling", step)
        return latest_checkpoint(r.ckpt_root)
    if r.accelerator.is_main_process:
        write_checkpoint(r, step)
    return path


def redo_unfinished(r: Run, stop, step: int):
    """On resume at `step`: the grid and evaluation of that step that a stop interrupted (or that never ran),
    interruptible again: samples/<step>.png missing, or no score of the step in score.json."""
    cfg = r.config
    if (step % cfg.train.eval_interval == 0 or step == cfg.train.n_steps) and r.accelerator.is_main_process \
            and not os.path.exists(os.path.join(r.workdir, 'samples', f"{step}.png")):
        with for_sampling(r) as sampling, stop.interruptible(f"the sample grid of step {step}, redone"):
            write_grid(sampling, step)
    r.accelerator.wait_for_everyone()
    if (step % cfg.train.save_interval == 0 or step == cfg.train.n_steps) and step not in r.history['fid'] \
            and step not in r.history['score']:
        with for_sampling(r, needed=cfg.fid.n_samples > 0) as sampling, \
                stop.interruptible(f"the evaluation of step {step}, redone"):
            evaluate_checkpoint(sampling, step)


@contextlib.contextmanager
def for_sampling(r: Run, needed: bool = True):
    """r, or for a sharded run a shallow copy of r whose nnet_ema is the gathered, unsharded EMA network (every
    process enters: libs.fsdp.unsharded_copy), so that one process can draw the grid alone; needed=False: r."""
    if not needed:
        yield r
        return
    with fsdp.unsharded_copy(r.nnet_ema, r.config.nnet, r.device) as ema:
        yield r if ema is r.nnet_ema else dataclasses.replace(r, nnet_ema=ema)


def write_grid(r: Run, step: int):
    """samples/<step>.png from the EMA network: one row per class or prompt (main process only)."""
    g = r.config.grid
    labels, contexts, n = r.family.grid_conditions(r.config, getattr(r.data, 'vis_contexts', None), g.n_rows,
                                                   g.n_cols)
    with r.forked_rng(), r.accelerator.autocast():
        images = r.generate_fn('grid', labels, contexts)(torch.arange(n))
    save_grid(images, os.path.join(r.workdir, 'samples', f"{step}.png"), g.n_cols)
    tracking.log_image(r.accelerator.trackers, 'samples', make_grid(images.float().cpu(), nrow=g.n_cols), step)


def sample_scores(r: Run, use: str, n: int, fid: bool):
    """(FID result of libs.evaluation.evaluate or None, the dataset's sample metric or None) of n images of the
    EMA network with the protocol `use` of Family.protocol; FID only when `fid` and its files are there."""
    cfg, fid_result, metric = r.config, None, None
    labels = r.family.sample_labels(cfg, n)
    gen = r.generate_fn(use, labels, getattr(r.data, 'fid_contexts', None))
    with r.forked_rng(), r.accelerator.autocast():
        if fid:
            try:
                fid_result = evaluate(r.accelerator, gen, n, cfg.sample.mini_batch_size, cfg.fid.stat, cfg.seed,
                                      metrics=MetricOptions.from_config(cfg, always=('fid',)))
            except MissingFileError as e:
                log_once(logger, f"FID skipped: {e}", logging.WARNING)
        if hasattr(r.data, 'sample_metric'):  # the dataset's offline score (digits, an image folder): not FID
            m = min(n, OFFLINE_SAMPLES)
            metric = r.data.sample_metric(generate_all(r.accelerator, gen, m, cfg.sample.mini_batch_size),
                                          None if labels is None else labels[:m])
    return fid_result, metric


def evaluate_checkpoint(r: Run, step: int):
    """FID (when possible) and the dataset's sample metric of the EMA network at `step`, with the 'fid'
    protocol of Family.protocol; into r.history and <workdir>/score.json. config.fid.n_samples=0: nothing."""
    cfg = r.config
    if cfg.fid.n_samples == 0:
        return
    reason = fid_unavailable(r)
    if reason:
        # A dataset that defines no statistics (digits: it has its own score) is not a problem to warn about.
        level = logging.WARNING if cfg.fid.stat or not hasattr(r.data, 'sample_metric') else logging.INFO
        log_once(logger, f"FID skipped during training: {reason}. Training goes on.", level)
    fid, score = sample_scores(r, 'fid', cfg.fid.n_samples, fid=not reason)
    logged = dict(score or {})
    if fid is not None:
        logged.update({k: v for k, v in fid.items() if k != 'n'})  # every metric of config.metrics.names
        logged['fid'] = r.history['fid'][step] = float(fid['fid'])
        logger.info("step %d: FID-%d %.3f (%d DPM-Solver steps, guidance scale %g)", step, fid['n'], fid['fid'],
                    cfg.fid.steps, r.family.protocol(cfg, 'fid')[2])
    if score is not None:
        r.history['score'][step] = score
        logger.info("step %d: %s", step, ', '.join(f"{k} {v:.4f}" for k, v in score.items()))
    if r.accelerator.is_main_process:
        write_json({'step': step, **r.history}, os.path.join(r.workdir, 'score.json'))
    r.accelerator.log({f"eval/{k}": v for k, v in logged.items()}, step=step)


def final_evaluation(r: Run):
    """Evaluate with the 'sample' protocol (config.sample, guided when configured): the best-FID checkpoint's
    EMA network when FID was computed, otherwise (datasets with a sample metric, e.g. digits) the final EMA
    network. Writes <workdir>/final_eval.json."""
    if not r.history['fid'] and not hasattr(r.data, 'sample_metric'):
        return None
    s = r.config.sample
    result = {'sample': {k: s[k] for k in ('algorithm', 'sample_steps', 'n_samples', 'cfg', 'scale')}}
    if r.history['fid']:
        result['checkpoint'] = checkpoint_path(r.ckpt_root, min(r.history['fid'], key=r.history['fid'].get))
        load_nnet_state_dict(r.nnet_ema, load_weights(result['checkpoint'])[0])
    fid, metric = sample_scores(r, 'sample', s.n_samples, fid=bool(r.history['fid']))
    result.update({**(fid or {}), **(metric or {})})
    logger.info("final evaluation (%s, %d steps, guidance scale %g, %d samples): %s", s.algorithm, s.sample_steps,
                guidance_scale(r.config), s.n_samples, {k: v for k, v in result.items() if k != 'sample'})
    if r.accelerator.is_main_process:
        write_json(result, os.path.join(r.workdir, 'final_eval.json'))
    return result


def train(config, workdir: str, family):
    """Train `config` in `workdir` (ckpts/, samples/, train.log, score.json); resumes from the latest
    complete checkpoint there. Returns {'step', 'checkpoint', 'preempted', 'score', 'fid', 'final', 'run'}
    ('run': the Run with the networks, optimizer, scheduler and logged metrics, for notebooks and tests)."""
    family = family.for_config(config)  # before any work: a config of another family names its script

    # Setup accelerate: DDP over processes; mixed precision from `accelerate launch --mixed_precision`.
    configure_tf32(config.tf32)
    # cpu=True without CUDA lets torchrun-started processes (`accelerate launch --multi_gpu`) form a gloo group;
    # accelerate's own `--cpu --num_processes N` starts a single process unless MPI is set up.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), **tracking.accelerator_kwargs(config, workdir))
    parse_and_validate(config, world_size=accelerator.num_processes)  # before any file is written
    fsdp.check_launch_precision(config, accelerator.mixed_precision)
    # One run per workdir (libs/workdir_lock.py); whatever ends the run is written to train.log (libs/fatal.py).
    with WorkdirLock(accelerator, workdir), log_fatal_errors(os.path.join(workdir, 'train.log'),
                                                              accelerator.process_index):
        return _train(config, workdir, family, accelerator)


def _train(config, workdir: str, family, accelerator):
    """train() once the config is valid and the workdir is this run's."""
    device, is_main = accelerator.device, accelerator.is_main_process
    if is_main:
        for folder in ('ckpts', 'samples'):
            os.makedirs(os.path.join(workdir, folder), exist_ok=True)
    accelerator.wait_for_everyone()
    setup_logging(is_main, os.path.join(workdir, 'train.log'))
    k = config.train.grad_accum_steps
    local_batch = config.train.batch_size // (accelerator.num_processes * k)  # per process per micro-batch
    logger.info("%d process(es) on %s, mixed precision %s, global batch %d (%d per process x %d micro-batch(es)), %s",
                accelerator.num_processes, device, accelerator.mixed_precision, config.train.batch_size, local_batch,
                k, family)

    # Setup data:
    data = get_dataset(config.dataset.name, **dataset_kwargs(config))
    autoencoder = (autoencoder_of(config, image_shape=data.source_image_shape()).to(device)
                   if family.data == 'latents' else None)
    family.check(config, data, autoencoder)
    carried = paper_hyperparameters(config) if config.dataset.name == 'image_folder' else []
    if carried and is_main:  # a paper config on one's own data: what it brings along, once
        logger.warning("this config trains your image folder with the paper's ImageNet-scale values of: %s. Set "
                       "them for your data, or start from configs/own_data_cpu.py (README, 'Your own data')",
                       '; '.join(carried))
    loader = ResumableLoader(
        data.train, batch_size=local_batch, rank=accelerator.process_index, world_size=accelerator.num_processes,
        seed=config.seed, pin_memory=config.dataloader.pin_memory,
        num_workers=resolve_num_workers(config.dataloader.num_workers, int(os.environ.get('LOCAL_WORLD_SIZE', 1))),
        persistent_workers=config.dataloader.persistent_workers)

    # Create model: the same initialisation on every process (and for any number of processes); the EMA
    # copy starts equal to the online network, as the original's.
    set_seed(config.seed)
    sharded = fsdp.enabled(config)
    if sharded:  # parameters, gradients, optimizer state and EMA split over the processes (libs/fsdp.py)
        nnet, nnet_ema, _ = fsdp.build(config, device, accelerator.num_processes)
    else:
        nnet = build_nnet(config.nnet).to(device)
        nnet_ema = make_ema(nnet)
    aids = training_aids.build(config, nnet, data, device)
    trained = training_aids.wrap(aids, nnet)  # the network and the aids' own trainable parameters
    optimizer = build_optimizer(trained, config.optimizer)
    # Not prepared by accelerate, which would step it once per process per optimizer step.
    lr_scheduler = build_lr_scheduler(optimizer, config.lr_scheduler, config.train.n_steps)
    if sharded:  # accelerate would wrap the network in DDP: the optimizer alone goes through it
        train_nnet, optimizer = trained, accelerator.prepare(optimizer)
    else:
        train_nnet, optimizer = accelerator.prepare(trained, optimizer)
    logger.info("network %s: %.2fM parameters", config.nnet.name, sum(p.numel() for p in nnet.parameters()) / 1e6)
    r = Run(config=config, workdir=workdir, family=family, accelerator=accelerator, data=data, nnet=nnet,
            nnet_ema=nnet_ema, optimizer=optimizer, lr_scheduler=lr_scheduler, loader=loader, autoencoder=autoencoder,
            null=family.null_condition(config, getattr(data, 'empty_context', None)),
            train_nnet=maybe_compile(train_nnet, config.compile), aids=aids,
            record=Record(nonfinite=torch.zeros(config.train.n_steps + 1, dtype=torch.bool, device=device)))

    # Resume: network, EMA, optimizer, scheduler, step, data position (the noise is seeded per step). What
    # changed in the config since the checkpoint is refused or applied before any step (libs/resume_policy.py).
    changes = resume_policy.check(resume_policy.saved_config(r.ckpt_root, workdir), config.to_dict())
    fresh = ([{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups],
             list(lr_scheduler.base_lrs))
    last_ckpt, state = (sharded_checkpoint.resume if sharded else resume)(
        r.ckpt_root, nnet=nnet, nnet_ema=nnet_ema, optimizer=optimizer, lr_scheduler=lr_scheduler)
    step = r.checked = state['step'] if state else 0
    if state:
        # A checkpoint of the original code has no data position: continue after the samples its steps used.
        loader.load_state_dict(state.get('data', {'position': step * config.train.batch_size}))
        if state.get('scaler') is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(state['scaler'])
        r.history = resume_policy.merged_history(state.get('history', r.history), workdir, step)
        resume_policy.apply(changes, optimizer, *fresh, lr_scheduler, loader.position, config.train.batch_size)
        training_aids.load_state_dict(aids, state, last_ckpt)
        logger.info("resuming at step %d from %s%s", step, last_ckpt,
                    f" (--init_from '{config.init.path}' ignored: the run already started)" if config.init.path else '')
    elif config.init.path and sharded:  # the same, through a full CPU copy (libs.fsdp.load_full)
        fsdp.load_full(nnet, config.nnet, lambda plain: init_weights(plain, config.init.path, resize=config.init.resize,
                                                                     null_last=config.dataset.cfg))
        fsdp.copy_values(nnet_ema, nnet)
    elif config.init.path:  # a new run from given weights: fresh optimizer, step 0, the EMA starts at them
        init_weights(nnet, config.init.path, resize=config.init.resize, null_last=config.dataset.cfg)
        nnet_ema.load_state_dict(nnet.state_dict())
    if is_main:
        write_json(config.to_dict(), resume_policy.config_record_path(workdir, step))
    tracking.start_trackers(accelerator, config, workdir)

    # Train:
    n_steps, t = config.train.n_steps, config.train
    loss_sum = torch.zeros((), device=device)
    last_log_step, last_log_time, preempted = step, time.time(), False
    r.train_nnet.train()
    bar = tqdm(total=n_steps, initial=step, disable=not is_main, dynamic_ncols=True, desc='train')
    # The loader's workers start under the handlers, then ignore stop signals; they end with the block. An I/O
    # or data error saves the last finished step first (libs/fatal.py). Grids and evaluations are interruptible:
    # a stop there ends the block at once (stop.stopped), the step is saved below and the work reruns on resume.
    with contextlib.closing(bar), StopSignals() as stop, contextlib.closing(iter(loader)) as data_iter, \
            EmergencyCheckpoint(r, sharded_checkpoint.emergency_write if sharded
                                else lambda s: write_checkpoint(r, s), step) as emergency:
        if state:
            redo_unfinished(r, stop, step)
        while step < n_steps:
            loss, grad_norm, applied = train_step(r, [next(data_iter) for _ in range(k)], step)
            step = emergency.step = step + 1
            r.nonfinite[step] = ~torch.isfinite(loss) | (~applied if accelerator.scaler is None else False)
            loss_sum += torch.where(applied, loss, 0.0)
            bar.update(1)

            log_now = step % t.log_interval == 0 or step == n_steps
            if log_now:  # the hot loop's one host sync per log_interval
                check_finite(r, step)
                mean_loss, mean_norm = accelerator.reduce(torch.stack([loss_sum, grad_norm.float()]), 'mean').tolist()
                now, n = time.time(), step - last_log_step
                metrics = {'loss': mean_loss / n, 'lr': lr_scheduler.get_last_lr()[0], 'grad_norm': mean_norm,
                           'images_per_s': n * t.batch_size / max(now - last_log_time, 1e-9)}
                for name, total in r.record.sums.items():  # the aids' loss terms
                    metrics[name] = accelerator.reduce(total, 'mean').item() / n
                r.record.sums.clear()
                logger.info("step %d/%d: %s", step, n_steps, ', '.join(f"{k} {v:.4g}" for k, v in metrics.items()))
                r.logged.append({'step': step, **metrics})
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                accelerator.log({f"train/{name}": v for name, v in metrics.items()}, step=step)
                loss_sum.zero_()
                last_log_step, last_log_time = step, now

            if step % t.eval_interval == 0 or step == n_steps:  # sample grid
                with for_sampling(r) as sampling:
                    if is_main:
                        with stop.interruptible(f"the sample grid of step {step}"):
                            write_grid(sampling, step)
                accelerator.wait_for_everyone()
            if step % t.save_interval == 0 or step == n_steps:  # checkpoint, then its evaluation
                last_ckpt = save(r, step)
                with for_sampling(r, needed=config.fid.n_samples > 0) as sampling, \
                        stop.interruptible(f"the evaluation of step {step}"):
                    evaluate_checkpoint(sampling, step)
                last_log_time = time.time()  # evaluation time is not training throughput

            # Stop signal: a checkpoint of this step, then exit (processes agree on logging steps only).
            if stop.should_stop(accelerator, sync=log_now):
                if last_ckpt != checkpoint_path(r.ckpt_root, step):
                    last_ckpt = save(r, step)  # every process is here: the collective save
                raise StopRequested(stop.received)

    final = None
    if not stop.stopped:  # final evaluation: the best checkpoint by FID, with config.sample (guided when configured)
        with stop, stop.interruptible("the final evaluation"), for_sampling(r) as sampling:
            final = final_evaluation(sampling)
    if stop.stopped:
        last_ckpt, preempted = save_at_stop(r, step, last_ckpt), True
        logger.warning("training stopped at step %d (%s); checkpoint saved to '%s'. To resume, rerun the same "
                       "command: %s", step, stop.received, last_ckpt, resume_command())
    else:
        accelerator.log({f"final/{name}": v for name, v in (final or {}).items() if isinstance(v, (int, float))},
                        step=step)
        logger.info("done at step %d; last checkpoint %s", step, last_ckpt)
    accelerator.end_training()
    return {'step': step, 'checkpoint': last_ckpt, 'preempted': preempted, 'final': final,
            'score': r.history['score'].get(step), 'fid': r.history['fid'].get(step), 'run': r}


# -- command line shared by the four train*.py scripts ----------------------------------------------

def define_flags():
    """--config (file + --config.a.b=value overrides), --workdir, --init_from, --dry_run."""
    define_config_flag('config')
    flags.DEFINE_string('workdir', None, "run directory (ckpts/, samples/, train.log); default "
                                         "workdir/<config name>/<hparams from the overrides>")
    flags.DEFINE_string('init_from', None, "start a new run from these weights (fresh optimizer, step 0): a "
                        "ckpts/<step>.ckpt directory, a .pth or an exported folder; ignored when the workdir has a "
                        "checkpoint. --config.init.resize=True adapts the label / position embeddings to the config")
    flags.DEFINE_bool('dry_run', False, "check the config, its files, the dataset and the network, write the "
                      "config to the workdir, and exit without training")


def dry_run(config, workdir: str, family):
    """What train() checks before its first step (config, files, dataset, autoencoder, network), without
    training; writes the resolved config to <workdir>/config.json."""
    parse_and_validate(config, world_size=int(os.environ.get('WORLD_SIZE', 1)))
    family = family.for_config(config)
    data = get_dataset(config.dataset.name, **dataset_kwargs(config))
    autoencoder = autoencoder_of(config, image_shape=data.source_image_shape()) if family.data == 'latents' else None
    family.check(config, data, autoencoder)
    meta = fsdp.enabled(config) and config.fsdp.meta_init and not config.init.path  # no full copy of a large one
    with torch.device('meta') if meta else contextlib.nullcontext():
        nnet = build_nnet(config.nnet)
    training_aids.build(config, nnet, data, 'cpu')  # what each aid checks of the network, its files and the data
    if config.init.path:  # the weights fit the network (or can be adapted to it)
        init_weights(nnet, config.init.path, resize=config.init.resize, null_last=config.dataset.cfg)
    build_lr_scheduler(build_optimizer(nnet, config.optimizer), config.lr_scheduler, config.train.n_steps)
    # Never over a run's own record (libs/resume_policy.py): a workdir that has one gets config.dry-run.json.
    path = os.path.join(workdir, 'config.json')
    path = os.path.join(workdir, 'config.dry-run.json') if os.path.exists(path) else path
    write_json(config.to_dict(), path)
    logger.info("dry run: the config, its files, the dataset and the network are fine; config written to %s", path)


def main_for(family):
    """The absl main of a train*.py script that trains `family`."""
    def main(argv):
        FLAGS, config = flags.FLAGS, flags.FLAGS.config
        if config is None:
            raise ConfigError("no --config given: name a config file, e.g. --config=configs/digits_uvit_tiny.py "
                              "(the CPU demo; configs/ holds the paper's), plus any --config.a.b=value overrides")
        config.init.path = FLAGS.init_from or config.init.path
        workdir = FLAGS.workdir or workdir_for(config_flags.get_config_filename(FLAGS['config']), config_overrides())
        if FLAGS.dry_run:
            setup_logging(True, None)
            return dry_run(config, workdir, family)
        train(config, workdir, family)
    return exit_on_user_error(main)

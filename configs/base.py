"""Shared defaults of every training config (one place).

Each paper config calls `get_config()` from here and states only what differs, with the values
of the original release (baofff/U-ViT, configs/*.py). Keys are the original's, so the
original's override flags (`--config.nnet.depth=16`, `--config.train.batch_size=512`) work
unchanged; keys the original did not have are marked "ours".
"""
import ml_collections


def d(**kwargs):
    """A ConfigDict from keyword arguments (the original configs' helper)."""
    return ml_collections.ConfigDict(initial_dictionary=kwargs)


def get_config():
    config = ml_collections.ConfigDict()

    config.seed = 1234  # every upstream config; process r seeds its generators with seed + r
    config.pred = 'noise_pred'  # the network regresses the noise eps (LSimple); the discrete scripts ignore it
    config.z_shape = None  # (C, h, w) of the autoencoder latent; None = pixel space (train.py)
    # ours: the diffusion this config trains and samples: 'continuous' (VP-SDE; train.py, train_ldm.py) or
    # 'discrete' (Stable Diffusion's 1000 betas; train_ldm_discrete.py, train_t2i_discrete.py). The paper's
    # U-ViT-H ImageNet and MS-COCO configs set 'discrete', as the scripts the original ran them with.
    config.diffusion = 'continuous'
    # ours: the training objective (sde.Objective; docs/samplers.md). The default is the paper's: the VP
    # diffusion of config.diffusion, noise prediction, t uniform. The sampler reads it from the config saved
    # with the model (checkpoint run's config.json, exported config.json): it is never a sampling flag.
    config.objective = d(
        path='vp',  # 'vp' (config.diffusion's schedule) | 'linear' (flow matching, x_t = (1 - t) x0 + t eps)
        prediction='noise',  # 'vp': 'noise' | 'v' | 'x0'; 'linear': 'velocity' (eps - x0)
        time_dist='uniform',  # training t: 'uniform' | 'logit_normal' (sigmoid of N(logit_mean, logit_std^2))
        logit_mean=0.0,
        logit_std=1.0,
        shift=1.0,  # 'linear': time shift s t / (1 + (s - 1) t) in training and sampling (e.g. 3 for 512 px latents)
        # ours, 'linear': > 0 derives the shift from the generated dimension d = C H W, s = sqrt(d / shift_base_dim)
        # (SD3; RAE uses 4096); 0 = the given shift
        shift_base_dim=0.0,
        # 'meanflow' (prediction 'average_velocity') and 'shortcut' (prediction 'velocity'): few-step objectives;
        # their network takes a second time token (config.nnet.second_time=True; docs/samplers.md)
        two_time_fraction=0.25,  # share of the batch with r != t (MeanFlow) / on self-consistency (shortcut)
        weight_power=1.0,  # MeanFlow's adaptive loss weight 1 / (||delta||^2 + weight_eps)^p; 0 = plain MSE
        weight_eps=1e-3,
        cfg_omega=1.0,  # MeanFlow's guidance inside the target (omega, kappa; 1, 0 = none), for cfg_t_min <= t <= cfg_t_max
        cfg_kappa=0.0,
        cfg_t_min=0.0,
        cfg_t_max=1.0,
        second_time='t_minus_r',  # MeanFlow's second time input: 't_minus_r' | 'r'
        shortcut_steps=128,  # shortcut models' finest grid M: step sizes 1/M .. 1 in powers of 2
    )

    # The autoencoder of latent configs (Stable Diffusion's KL-f8 by default); only the latent scripts read it.
    config.autoencoder = d(
        # path of autoencoder_kl.pth, or (ours) any diffusers autoencoder: a local folder or a Hub id in the
        # local cache, 'org/repo[/subfolder]' (docs/latents.md); '' = none (pixel-space configs)
        pretrained_path='',
        scale_factor=0.18215,  # Stable Diffusion's latent scaling (libs/autoencoder.py get_model default)
        # ours: z = (latent - shift) * scale from 'fixed' (scale_factor, shift 0: the paper's), 'model' (the
        # diffusers model's scaling_factor / shift_factor / latents_mean, latents_std) or 'data' (per-channel
        # mean / std of the extracted latents, latent_stats; '' = <dataset.path>/latent_stats.json)
        latent_scaling='fixed',
        latent_stats='',
    )

    config.train = d(
        n_steps=500000,  # optimizer steps
        batch_size=128,  # GLOBAL batch: split evenly over the processes (ConfigError if it does not divide)
        mode='cond',  # 'cond' (class labels) | 'uncond'; train.py only
        log_interval=10,  # steps between log lines (loss, lr, grad norm, images/s): also the host-sync period
        eval_interval=5000,  # steps between sample grids in <workdir>/samples/<step>.png
        save_interval=50000,  # steps between checkpoints (+ FID when the reference statistics exist)
        keep_last_ckpts=0,  # ours: keep only the last K checkpoints (never the best-FID one); 0 = keep all
        # ours: a step whose loss or gradients are NaN/inf is skipped (weights, EMA, optimizer unchanged) and
        # logged; the run stops, naming the last good checkpoint, at this many such steps in a row, or this
        # many within nonfinite_window steps (checked every log_interval: no per-step host sync)
        max_nonfinite_in_a_row=3,
        max_nonfinite_in_window=10,
        nonfinite_window=1000,
        # ours: micro-batches per optimizer step (gradient accumulation): each forward sees
        # batch_size / (processes x grad_accum_steps) samples; gradients are all-reduced once per step. Every
        # step count (n_steps, intervals, warm-up, EMA, checkpoints) counts optimizer steps.
        grad_accum_steps=1,
    )

    # ours: start a NEW run from these weights (fresh optimizer, step 0, EMA = these weights); ignored when the
    # workdir has a checkpoint to resume. Set by --init_from.
    config.init = d(
        path='',  # a ckpts/<step>.ckpt directory (its EMA weights), a .pth state dict or an exported folder
        resize=False,  # adapt the label embedding (other classes) and position embedding (other resolution)
    )

    config.optimizer = d(
        name='adamw',
        lr=0.0002,  # peak learning rate, reached after the warm-up
        weight_decay=0.03,  # decoupled (AdamW) decay
        betas=(0.99, 0.99),  # the ImageNet configs' (beta1, beta2)
        no_decay_for_embeddings_norms_biases=False,  # ours: True exempts pos_embed, norms and biases from
        #                                              weight decay; False = the original (decay on everything)
    )

    config.lr_scheduler = d(
        name='customized',  # 'customized': factor min(step / warmup_steps, 1) (first step at lr 0, then
        #                     constant, as the original); 'cosine': the same warm-up, then cosine to 0 at n_steps
        warmup_steps=5000,  # steps
    )

    config.ema_rate = 0.9999  # ours (the original hard-codes it): ema <- rate * ema + (1 - rate) * online
    # ours: post-hoc EMA (Karras et al. 2024, EDM2): power-function EMAs of these relative widths are kept beside
    # the fixed-rate EMA and written to <workdir>/posthoc_ema/<step>.pth every snapshot_interval steps;
    # tools/posthoc_ema.py reconstructs the EMA of any width from them. snapshot_interval=0: off (nothing kept).
    config.posthoc_ema = d(
        sigma_rels=(0.05, 0.10),  # EDM2's two stored widths (std of the averaging profile / training length)
        snapshot_interval=0,  # steps between snapshots; e.g. 1/100 of n_steps
    )
    # ours: representation alignment (REPA, Yu et al. 2025; docs/training.md): the patch tokens of one U-ViT
    # block, through an MLP projector, are pulled towards a frozen encoder's patch features of the clean image.
    config.repa = d(
        enabled=False,
        encoder='dinov2_vitb14',  # dinov2_vit{s,b,l,g}14 | 'timm:<name>' | 'torchvision:<vit name>' | 'torchscript'
        weights='',  # the encoder's weights file; '' = the torch hub cache (DINOv2 only)
        resolution=224,  # the encoder's input size in pixels (DINOv2: 224 -> a 16 x 16 patch grid)
        # The middle block: in a U-shaped network with long skips the in-blocks' tokens also feed the decoder
        # directly, and the U-REPA study (2025) found aligning the middle stage works best for such networks.
        block='mid_block',  # a module name: 'mid_block', 'in_blocks.<i>', 'out_blocks.<i>'
        projector_dim=2048,  # hidden width of the projector MLP (REPA's)
        weight=0.5,  # lambda of loss = diffusion loss + lambda * alignment loss (REPA's 0.5)
    )
    # ours: fully sharded training (FSDP2, docs/distributed.md): parameters, gradients, AdamW state and EMA split
    # over the processes instead of replicated (DDP, the default). One shard unit per U-ViT block plus the root.
    config.fsdp = d(
        enabled=False,
        reshard_after_forward=True,  # free each block's gathered weights after its forward (False: keep them for
        #                              the backward: one all-gather less per block, more memory)
        replicate=1,  # HSDP: replica groups (e.g. nodes); shards within a group, replicas across. 1 = plain FSDP
        mixed_precision='bf16',  # 'bf16': bf16 compute, float32 master weights and gradient reduction; 'no': fp32
        cpu_offload=False,  # keep the shards and AdamW state in host memory (slow; for models beyond the GPUs)
        meta_init=False,  # build on the meta device, each process draws only its shards (per-module seeds: other
        #                   initial values than the default full build, the same for any number of processes)
    )
    # ours: more training aids (docs/DESIGN.md, the training-aid seam), each 'package.module:ClassName' of a class
    # with its own config section; REPA and post-hoc EMA are built in.
    config.training_aids = ()
    config.grad_clip = 0.0  # ours: max global L2 norm of the gradients; 0 = no clipping (as every paper config)
    config.compile = False  # ours: torch.compile the network (first steps are slow while it compiles)
    # ours: TF32 for float32 matmuls AND convolutions on Ampere+ GPUs (no effect on the CPU), in training and in
    # the eval/sampling scripts. The original left PyTorch's defaults: matmul TF32 off, cuDNN convolution TF32
    # on. Turned on here for speed: its runs were fp16 mixed precision, where the heavy matmuls do not use TF32
    # at all, so it changes only the few float32 ops (~1e-3 relative). False = fp32 matmuls and convolutions.
    config.tf32 = True

    # config.nnet is set whole by each config: it is exactly the original's network dict.
    config.nnet = d(name='uvit')

    config.dataset = d(
        name='',  # registry name in libs/datasets (get_dataset); other keys are passed to it as keyword arguments
        cfg=False,  # train with classifier-free guidance dropout of the condition
        p_uncond=0.0,  # probability of replacing the condition by the null label / empty context
    )

    # Which numbers are guided (scale s of eps_c + s * (eps_c - eps_u), 0 = unguided):
    # - eval*.py and <workdir>/final_eval.json: config.sample (guided with sample.scale when sample.cfg);
    # - FID of every checkpoint during training (score.json): unguided for class models, guided with
    #   sample.scale (when sample.cfg) for text-to-image ones, as the original's train scripts;
    # - sample grids: grid.scale (default: sample.scale when sample.cfg);
    # - sample_class_cond.py / sample_t2i_discrete.py: sample.scale when sample.cfg, or --scale.
    config.sample = d(
        sample_steps=50,  # solver steps (= network evaluations) of the final evaluation
        n_samples=50000,  # images scored by the final evaluation (the paper's FID-50k)
        mini_batch_size=50,  # images per process per call
        algorithm='dpm_solver',  # the paper protocol of the script's time kind (see libs/sampling.py)
        cfg=False,  # guided sampling (needs a model trained with dataset.cfg)
        scale=0.0,  # guidance scale s of eps_c + s * (eps_c - eps_u) (the original's convention)
        # ours: guidance only where the noise level sigma = s_t / a_t (EDM's sigma, any path) is in
        # (guidance_sigma_min, guidance_sigma_max] (Kynkaanniemi et al. 2024); both 0 = every step (the paper)
        guidance_sigma_min=0.0,
        guidance_sigma_max=0.0,  # 0 = no upper limit
        # ours: whose sigma decides the interval: 'per_step' (the step's start, for every evaluation of the step:
        # the authors' sampler, whose FIDs are the comparison) | 'per_evaluation' (each network evaluation's)
        guidance_interval_rule='per_step',
        # ours: autoguidance (Karras et al. 2024): eps_u is the conditional prediction of this weaker network
        # of the same objective (a ckpts/<step>.ckpt directory, an exported folder, or a .pth of config.nnet's
        # architecture) instead of the unconditional branch; '' = classifier-free guidance
        guide_path='',
        path='',  # folder to also keep eval*.py's sample PNGs in; '' = none are written (FID is computed in-process)
    )

    # ours: sample grids written every eval_interval (from the EMA network).
    config.grid = d(
        n_rows=10,  # class models: one row per class (at most n_rows classes, evenly spaced); text: prompts
        n_cols=10,  # images per row
        steps=50,  # solver steps
        algorithm='',  # '' = the original's grid sampler: the probability-flow ODE for continuous time,
        #                DPM-Solver for discrete time
        scale=-1.0,  # guidance scale for grids; < 0 = config.sample.scale when config.sample.cfg, else 0
    )

    # FID: the reference statistics (read by training and eval*.py; no training data is opened for them), and the
    # FID of every checkpoint during training (the original: 10k samples, DPM-Solver 50 steps, guided as above).
    config.fid = d(
        # ours (the original's datasets named it): .npz of the reference 'mu' and 'sigma'; '' = no FID
        stat='',
        n_samples=10000,  # ours: images per checkpoint; 0 = no FID (nor sample metric) during training
        steps=50,  # ours: DPM-Solver steps
        inception_weights=None,  # path of pt_inception-2015-12-05 weights; None = the default location
    )

    # ours: what an evaluation computes beside FID, from which files, and what it writes (docs/evaluation.md).
    # Read by eval*.py and, for names / labels / reference / resize, by training's periodic evaluation too.
    config.metrics = d(
        names='fid,is',  # comma-separated subset of fid,is,sfid,prc,kid,fd_dinov2,clip_score
        labels='uniform',  # class labels of the samples: 'uniform' (random, the original) | 'balanced' (n/K each)
        seeds='',  # eval*.py: comma-separated seeds, one evaluation each, reported with their spread; '' = seed
        npz='',  # eval*.py: also write the scored samples as an ADM-suite .npz here ('' = none)
        json='',  # eval*.py: the JSON record of the evaluation; '' = <--output_path>.json (none without it)
        reference='',  # reference batch / statistics .npz of every metric; '' = fid.stat
        resize='pytorch-fid',  # the Inception network's resize: 'pytorch-fid' (the paper's FIDs) | 'adm'
        kid_subsets=100,  # KID: subsets (torch-fidelity's defaults)
        kid_subset_size=1000,  # KID: features per subset
        prc_k=3,  # precision/recall: k of the k-NN radii (ADM's evaluator)
        prc_arithmetic='float64',  # precision/recall distances: 'float64' (the formula) | 'adm' (ADM's float16)
        dinov2_weights='',  # dinov2_vitl14_pretrain.pth; '' = <torch hub dir>/checkpoints/
        dinov2_repo='',  # the facebookresearch/dinov2 hub code; '' = <torch hub dir>/facebookresearch_dinov2_main
        clip='',  # CLIP model folder or hub id for the CLIP score; '' = openai/clip-vit-large-patch14
    )

    # ours: experiment trackers (through accelerate): 'tensorboard' (<workdir>/tensorboard/) | 'wandb' | 'all' |
    # '' (none); offline by default: no account or network needed.
    config.log_with = 'tensorboard'
    config.wandb = d(  # the wandb tracker's settings; `project` also names the TensorBoard run folder
        mode='offline',  # 'offline' writes <workdir>/wandb, to be synced later with `wandb sync`
        project='uvit',
    )

    config.dataloader = d(
        num_workers=-1,  # worker processes per training process; -1 = min(8, CPU cores per process)
        pin_memory=True,  # page-locked host batches for faster host-to-GPU copies (ignored without a GPU)
        persistent_workers=True,  # keep workers alive (the sampler is infinite, so they are never restarted)
    )

    return config

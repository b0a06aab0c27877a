"""A tiny class-conditional U-ViT on scikit-learn's bundled handwritten digits: the CPU demo.

    python train.py --config=configs/digits_uvit_tiny.py

Trains on 2 CPU cores in about five minutes (no download, no GPU) and writes a sample grid (one
row per digit) to <workdir>/samples/<step>.png and the digit score to <workdir>/score.json and
final_eval.json: digit_accuracy (a classifier trained on real digits reads the sample as the
class it was sampled for; chance = 0.1) and pixel_fd (Frechet distance to the real digits in
8x8 pixel space; lower is better).
"""
from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.seed = 1234
    config.train.update(
        n_steps=1500,  # ~5 min on 2 otherwise idle CPU cores
        batch_size=64,  # global batch; 1,797 images, so 28 optimizer steps per epoch
        mode='cond',
        log_interval=50,
        eval_interval=500,  # a grid every 500 steps shows the progress
        save_interval=1500,  # one checkpoint (+ score) at the end
    )
    config.optimizer.update(lr=0.002, weight_decay=0.03, betas=(0.9, 0.99))  # a small net tolerates a larger lr
    config.lr_scheduler.update(name='customized', warmup_steps=100)
    # The native 8x8 digits, 2x2 patches: 16 tokens of width 96, 7 blocks (depth 6). Upsampled inputs
    # (resolution 16) cost as much per step but sample worse: the noise to predict is then independent per
    # upsampled pixel while the image is constant over 2x2 blocks, which wastes the tiny network's capacity.
    # num_classes = 10 digits + the null label 10 of guidance training.
    config.nnet = d(name='uvit', img_size=8, patch_size=2, in_chans=1, embed_dim=96, depth=6, num_heads=4,
                    mlp_ratio=4, qkv_bias=False, mlp_time_embed=False, num_classes=11)
    config.dataset.update(name='digits', resolution=8, cfg=True, p_uncond=0.1)
    # The EMA keeps weight rate^n_steps on the random initialisation: 0.9999 (or even 0.999: 22% after 1,500
    # steps) gives noise images in so short a run; 0.99 averages over the last ~100 steps.
    config.ema_rate = 0.99
    config.grid.update(n_rows=10, n_cols=10, steps=50, scale=-1.0)
    # The score: 1,000 samples (enough for a 64-d covariance), DPM-Solver 25 steps, guidance 1.
    config.sample.update(sample_steps=25, n_samples=1000, mini_batch_size=500, algorithm='dpm_solver', cfg=True,
                         scale=1.0)
    config.fid.update(n_samples=1000, steps=25)  # unguided score of each checkpoint (digits have no FID)
    config.dataloader.update(num_workers=0, pin_memory=False)  # in-memory tensors: workers only add start-up time
    return config

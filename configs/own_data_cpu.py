"""Your own labelled images on a CPU: the template to start from (no GPU, no download).

    python train.py --config=configs/own_data_cpu.py --config.dataset.path=/data/my_images \\
        --config.dataset.resolution=14 --config.nnet.num_classes=11

On real MNIST at 14 px the default 2,000 steps take ~11 min on 2 CPU cores and draw the asked digit 0.95-0.98
of the time (5 seeds; benchmarks/README.md). What you set (everything else is what learned fastest here):
- config.dataset.path: your image folder, one subfolder per class (docs/datasets.md);
- config.dataset.resolution: the training size in pixels, a multiple of the patch size below; 12-16 px trains
  in minutes on a CPU (28 px digits: 14, an exact halving); the network follows it (nnet.img_size is the same
  value, and the patch grows with it so that the network always sees 7x7 to 8x8 tokens and costs the same);
- config.nnet.num_classes: your number of classes + 1 (the null label of guidance training); the first run
  names the number if it is wrong;
- config.dataset.random_flip: leave False for digits, letters or anything with a handedness; True for photos.

Why not a paper config: they are sized for GPUs (130M+ parameters: minutes per step here), warm up for 5,000
steps, use betas (0.99, 0.99) and an EMA of 0.9999 (the EMA still holds the random initialisation after a
short run) and evaluate 10,000-50,000 samples. This one is a 1.5M-parameter U-ViT trained with flow matching
(linear path, velocity prediction, logit-normal time): on real MNIST the same network with the paper's
noise-prediction objective drew the asked digit only ~0.2 of the time after 4,000 steps (benchmarks/README.md,
both objectives' figures there). Each checkpoint is scored offline, against a
classifier fit on your folder (`folder_accuracy`) and by a Frechet distance of small grey pixel thumbnails
(`pixel_fd`): no Inception weights, and these are not FID.
"""
import ml_collections

from configs.base import d, get_config as base_config


def get_config():
    config = base_config()
    config.seed = 1234
    resolution = ml_collections.FieldReference(16)  # one value: dataset.resolution and nnet.img_size
    config.dataset.update(name='image_folder', path='', resolution=resolution, cfg=True, p_uncond=0.1,
                          random_flip=False)
    # Patch 2 up to 16 px, 4 up to 32 px, 8 up to 64 px: 49-64 tokens of width 128 at every size.
    config.nnet = d(name='uvit', img_size=resolution, patch_size=(resolution + 15) // 16 * 2, in_chans=3,
                    embed_dim=128, depth=6, num_heads=4, mlp_ratio=4, qkv_bias=False, mlp_time_embed=False,
                    num_classes=11)  # your classes + 1
    config.objective.update(path='linear', prediction='velocity', time_dist='logit_normal')
    config.train.update(n_steps=2000, batch_size=64, mode='cond', log_interval=50, eval_interval=500,
                        save_interval=500)
    config.optimizer.update(lr=1e-3, weight_decay=0.03, betas=(0.9, 0.99))
    config.lr_scheduler.update(name='customized', warmup_steps=200)
    config.ema_rate = 0.995  # averages the last ~200 steps; 0.9999 would still be mostly the initialisation
    # Heun, 13 steps (25 network calls); the final evaluation guided with scale 1 (U-ViT's convention).
    config.sample.update(algorithm='heun', sample_steps=13, n_samples=500, mini_batch_size=250, cfg=True,
                         scale=1.0)
    config.fid.update(stat='', n_samples=300, steps=13)  # each checkpoint: the offline score of 300 samples
    config.grid.update(n_rows=10, n_cols=4, steps=13)
    config.log_with = ''
    config.dataloader.update(num_workers=1, pin_memory=False)
    return config

"""The CPU digits demo trained with MeanFlow (sde.MeanFlow; Geng et al. 2025, arXiv 2505.13447): one network
call draws a digit.

    python train.py --config=configs/digits_uvit_tiny_meanflow.py
    python sample_class_cond.py --config=configs/digits_uvit_tiny_meanflow.py --nnet_path=<workdir>/ckpts/3000.ckpt --steps=1

configs/digits_uvit_tiny_flow.py with the objective changed: the U-ViT gets a second time token (t - r), the
network predicts the average velocity u(z_t, r, t), 25% of each batch has r != t (logit-normal times, the
paper's ImageNet setting), adaptive loss weight p = 1, and guidance inside the target (omega = 2: the guided
field of U-ViT scale 1 is learnt, so sampling is unguided and ONE call is one forward). Twice the epsilon demo's
steps (3,000). Sampled with the 'meanflow' sampler in 1 step; `--steps=k` takes k network calls.
"""
from configs.digits_uvit_tiny_flow import get_config as flow_config


def get_config():
    config = flow_config()
    config.train.update(n_steps=3000, eval_interval=1000, save_interval=1000)
    config.nnet.second_time = True
    config.objective.update(path='meanflow', prediction='average_velocity', time_dist='logit_normal',
                            logit_mean=-0.4, logit_std=1.0, two_time_fraction=0.25, weight_power=1.0,
                            cfg_omega=2.0, cfg_kappa=0.0)
    config.sample.update(algorithm='meanflow', sample_steps=1, cfg=False)  # the guidance is in the network
    config.fid.update(steps=1)
    config.grid.update(steps=1, scale=0.0)
    return config

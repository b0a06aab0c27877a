"""The CPU digits demo trained as a shortcut model (sde.Shortcut; Frans et al. 2024, arXiv 2410.12557): the
network is conditioned on the step size d and samples in 1, 2, 4 ... network calls.

    python train.py --config=configs/digits_uvit_tiny_shortcut.py
    python sample_class_cond.py --config=configs/digits_uvit_tiny_shortcut.py --nnet_path=<workdir>/ckpts/3000.ckpt --steps=1

configs/digits_uvit_tiny_flow.py with the objective changed: a second time token (the step size d), flow
matching at d = 0 on 3/4 of each batch and self-consistency (two steps of d = one step of 2d, d = 1/128 .. 1/2)
on 1/4, the paper's proportion; no JVP. 3,000 steps like the MeanFlow demo. Sampled with the 'shortcut' sampler
(d = 1 / steps), guided with U-ViT scale 1 as the flow demo (one batched forward of both branches per call).
"""
from configs.digits_uvit_tiny_flow import get_config as flow_config


def get_config():
    config = flow_config()
    config.train.update(n_steps=3000, eval_interval=1000, save_interval=1000)
    config.nnet.second_time = True
    config.objective.update(path='shortcut', prediction='velocity', two_time_fraction=0.25, shortcut_steps=128)
    config.sample.update(algorithm='shortcut', sample_steps=1)
    config.fid.update(steps=1)
    config.grid.update(steps=1)
    return config

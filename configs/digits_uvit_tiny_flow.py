"""The CPU digits demo trained with flow matching: configs/digits_uvit_tiny.py with one section changed.

    python train.py --config=configs/digits_uvit_tiny_flow.py

The same network, data, optimizer and step count as the epsilon demo; the objective is flow matching on
the linear path x_t = (1 - t) x0 + t eps with velocity prediction (sde.LinearFlow), sampled with Heun's
method (13 steps: 25 network calls, the epsilon demo's DPM-Solver budget) and guidance scale 1 in U-ViT's
convention. The same as a one-key-per-field override of the epsilon demo:
--config.objective.path=linear --config.objective.prediction=velocity --config.sample.algorithm=heun
--config.sample.sample_steps=13. JiT's x-prediction on the same path (the network outputs the clean digit, the loss
is on the implied velocity; benchmarks/README.md compares the two): --config.objective.prediction=x0.
"""
from configs.digits_uvit_tiny import get_config as digits_config


def get_config():
    config = digits_config()
    config.objective.update(path='linear', prediction='velocity', time_dist='uniform')
    config.sample.update(algorithm='heun', sample_steps=13)  # 2 calls per step, the last one Euler: 25 calls
    config.fid.update(steps=13)  # the unguided score of each checkpoint, with the same sampler
    config.grid.update(steps=13)
    return config

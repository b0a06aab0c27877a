"""Evaluate U-ViT text-to-image latent models with discrete time: MS-COCO.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval_t2i_discrete.py \
        --config=configs/mscoco_uvit_small.py --nnet_path=mscoco_uvit_small.pth --output_path=eval.log

Samples config.sample.n_samples images with the config's protocol and logs FID and Inception
Score; the engine (shared by the four eval scripts and training) is libs/evaluation.py. Reads the
weights, the autoencoder, the MS-COCO val caption features
(<config.dataset.path>/val, empty_context.npy) and the FID statistics config.fid.stat, never the training data.
A config of another family (config.diffusion, z_shape, network) stops with the name of its script.
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import TEXT_LATENTS_DISCRETE

define_flags()

if __name__ == '__main__':
    app.run(main_for(TEXT_LATENTS_DISCRETE))

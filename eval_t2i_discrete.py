"""Evaluate U-ViT text-to-image latent models with discrete time: MS-COCO.

    accelerate launch --multi_gpu --num_processes 8 --mixed_precision fp16 eval_t2i_discrete.py \
        --config=configs/mscoco_uvit_small.py --nnet_path=mscoco_uvit_small.pth --output_path=eval.log

As eval_ldm_discrete.py, each sample conditioned on an MS-COCO val caption's CLIP features
(<config.dataset.path>/val, and empty_context.npy for guidance).
"""
from absl import app

from libs.evaluation import define_flags, main_for
from libs.family import TEXT_LATENTS_DISCRETE

define_flags()

if __name__ == '__main__':
    app.run(main_for(TEXT_LATENTS_DISCRETE))

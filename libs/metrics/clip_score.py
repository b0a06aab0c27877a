"""CLIP score of text-to-image samples (Hessel et al. 2021, arXiv 2104.08718; the scale of torchmetrics' CLIPScore).

    CLIP score = mean over images of 100 * max(cos(E_image, E_caption), 0)

with E the projected CLIP embeddings (CLIP ViT-L/14, `openai/clip-vit-large-patch14`, the model DALL-E 2,
GLIDE-style and most text-to-image tables use). Images are prepared by the model's own CLIPImageProcessor
(shorter side resized to 224 bicubically, centre crop, CLIP's normalisation), as torchmetrics does.
Weights are read from a local folder or the Hugging Face cache only, as libs/clip.py.
"""
import logging

import torch

from libs.clip import CLIP_VERSION, LOCAL_CLIP_DIR, _resolve
from libs.errors import InputError, MissingFileError

logger = logging.getLogger(__name__)


class CLIPScorer(torch.nn.Module):
    """(images (B, 3, H, W) in [0, 1], B prompts) -> (B,) float64 per-image scores 100 max(cos, 0)."""

    def __init__(self, model, processor):
        super().__init__()
        self.model, self.processor = model.eval().requires_grad_(False), processor

    def train(self, mode=True):
        return super().train(False)

    @torch.no_grad()
    def forward(self, images, prompts):
        if len(prompts) != images.shape[0]:
            raise InputError(f"CLIP score needs one prompt per image, got {len(prompts)} for {images.shape[0]}")
        device = next(self.model.parameters()).device
        pixels = images.mul(255).round().to(torch.uint8).cpu()
        inputs = self.processor(text=list(prompts), images=list(pixels), return_tensors="pt", padding=True,
                                truncation=True)
        inputs = {k: v.to(device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        img, txt = (getattr(e, "pooler_output", e) for e in (img, txt))
        cos = torch.nn.functional.cosine_similarity(img.double(), txt.double(), dim=-1)
        return (100 * cos).clamp_min(0)


def load_clip_scorer(version=CLIP_VERSION, device=None):
    """CLIPScorer of a local folder or a Hugging Face id in the local cache; MissingFileError if absent."""
    from transformers import CLIPModel, CLIPProcessor  # heavy

    source = _resolve(version)
    try:
        model = CLIPModel.from_pretrained(source, local_files_only=True)
        processor = CLIPProcessor.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError) as e:
        raise MissingFileError(
            f"CLIP model '{version}' (image and text towers) not found locally ({type(e).__name__}); put "
            f"{CLIP_VERSION} in {LOCAL_CLIP_DIR}/ (`huggingface-cli download {CLIP_VERSION} --local-dir "
            f"{LOCAL_CLIP_DIR}`) or give its folder (--config.metrics.clip, tools/evaluator.py --clip)") from e
    logger.info("loaded CLIP %s for the CLIP score", source)
    return CLIPScorer(model.to(device or "cpu"), processor)

"""The frozen CLIP text encoder that turns prompts into U-ViT's text tokens.

U-ViT's MS-COCO models (Bao et al. 2023, section 5.3) condition on the last hidden state of CLIP
ViT-L/14's text transformer (Radford et al. 2021): prompts are tokenised, padded or truncated to
77 tokens, and every token's 768-d final feature is one "word" for the network.

Never touches the network unless asked: the weights are looked up in a local directory or the
Hugging Face cache only (`local_files_only`), so an offline machine fails at once with a message
saying where to put them instead of hanging on retries.
"""
import logging
import os

import torch
import torch.nn as nn

from libs.errors import InputError, MissingFileError

logger = logging.getLogger(__name__)

CLIP_VERSION = "openai/clip-vit-large-patch14"
CLIP_MAX_LENGTH = 77  # CLIP's context length; U-ViT's num_clip_token
# A local copy here is used before the Hugging Face cache when `version` is the default id.
LOCAL_CLIP_DIR = os.path.join("assets", "clip-vit-large-patch14")


def _resolve(version):
    if os.path.isdir(version):
        return version
    if version == CLIP_VERSION and os.path.isdir(LOCAL_CLIP_DIR):
        return LOCAL_CLIP_DIR
    return version


class FrozenCLIPEmbedder(nn.Module):
    """Prompts -> CLIP text features (B, max_length, hidden) float32; frozen, eval mode.

    version: a Hugging Face model id (looked up in the local cache) or a local directory holding
        a CLIPTokenizer (vocab.json, merges.txt) and a CLIPTextModel (config.json + weights).
    device: where the text model runs; outputs live there too.
    max_length: tokens per prompt after padding ('max_length') and truncation.
    allow_download: fetch missing weights from the Hugging Face hub (off by default, see module doc).
    """

    def __init__(self, version=CLIP_VERSION, device="cpu", max_length=CLIP_MAX_LENGTH, allow_download=False):
        super().__init__()
        from transformers import CLIPTextModel, CLIPTokenizer  # heavy

        source = _resolve(version)
        try:  # a folder that does not exist fails here too, as a hub id not in the cache
            self.tokenizer = CLIPTokenizer.from_pretrained(source, local_files_only=not allow_download)
            self.transformer = CLIPTextModel.from_pretrained(source, local_files_only=not allow_download)
        except (OSError, ValueError) as e:
            raise MissingFileError(
                f"CLIP text encoder '{version}' not found locally ({type(e).__name__}: {str(e).splitlines()[0]}). "
                f"Put the files of {CLIP_VERSION} (tokenizer + text model) in {LOCAL_CLIP_DIR}/, e.g. "
                f"`huggingface-cli download {CLIP_VERSION} --local-dir {LOCAL_CLIP_DIR}`, or in the Hugging Face "
                "cache, or pass a local directory as `version` (or allow_download=True where the hub is reachable)."
            ) from e
        self.version = version
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.transformer.to(self.device)
        self.requires_grad_(False)
        super().train(False)
        logger.info("loaded CLIP text encoder %s (hidden %d) on %s", source, self.hidden_size, self.device)

    @property
    def hidden_size(self):
        return self.transformer.config.hidden_size

    def train(self, mode=True):
        """Frozen: stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def forward(self, text):
        """text: a prompt or a list of B prompts -> (B, max_length, hidden) float32 on self.device."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
            raise InputError(f"prompts must be a string or a non-empty list of strings; got {text!r:.80}.")
        tokens = self.tokenizer(list(text), truncation=True, max_length=self.max_length, padding="max_length",
                                return_length=False, return_overflowing_tokens=False, return_tensors="pt")
        input_ids = tokens["input_ids"].to(self.device)
        return self.transformer(input_ids=input_ids).last_hidden_state.float()

    def encode(self, text):
        """Alias of forward, the original's name."""
        return self(text)

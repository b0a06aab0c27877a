"""Tiny random CLIP text encoder + tokenizer and KL autoencoder saved to disk: stand-ins for the real weights, shared by benchmarks/bench_features.py and the tests."""
import json
import os

import torch

from libs.autoencoder import FrozenAutoencoderKL


def _byte_chars():
    # CLIP's BPE works on a byte-to-unicode table; printable ASCII maps to itself.
    return [chr(c) for c in range(ord("!"), ord("~") + 1)]


def write_tiny_clip(folder, hidden_size=32, seed=0):
    """Save a random CLIPTextModel (2 layers, `hidden_size` wide) and a CLIPTokenizer with a small
    character-level vocabulary plus a few merges to `folder`; return the folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # heavy

    os.makedirs(folder, exist_ok=True)
    chars = _byte_chars()
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [("t", "h"), ("th", "e</w>"), ("c", "a"), ("ca", "t</w>"), ("d", "o"), ("do", "g</w>")]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                              pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(seed)
    CLIPTextModel(config).save_pretrained(folder)
    return folder


# A KL autoencoder with the full downsampling factor 8 (4 levels) but narrow and shallow, so
# encoding a 32x32 image costs milliseconds on a CPU. GroupNorm(32) needs widths that are multiples of 32.
TINY_AE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                        ch_mult=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], dropout=0.0)


def save_self_describing(model, path):
    """Write a FrozenAutoencoderKL as ``{'ddconfig', 'embed_dim', 'state_dict'}``, loadable by
    libs.autoencoder.get_model with its own architecture."""

    ddconfig = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.ddconfig.items()}
    torch.save({"ddconfig": ddconfig, "embed_dim": model.embed_dim,
                "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}, path)


def write_tiny_autoencoder(path, seed=0):
    """Save a random self-describing autoencoder checkpoint loadable by libs.autoencoder.get_model."""


    torch.manual_seed(seed)
    save_self_describing(FrozenAutoencoderKL(TINY_AE_DDCONFIG, 4), path)
    return path

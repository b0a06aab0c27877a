"""FrozenCLIPEmbedder on a tiny random CLIP saved by the test, compared with transformers used directly."""
import time

import pytest
import torch

from libs.clip import FrozenCLIPEmbedder
from libs.errors import InputError, MissingFileError
from benchmarks.tiny_models import write_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return write_tiny_clip(str(tmp_path_factory.mktemp("clip")), hidden_size=32)


@pytest.fixture(scope="module")
def embedder(clip_dir):
    return FrozenCLIPEmbedder(clip_dir, device="cpu", max_length=77)


def test_shape_and_reference(embedder, clip_dir):
    from transformers import CLIPTextModel, CLIPTokenizer

    prompts = ["the cat", "a dog on the grass!"]
    out = embedder(prompts)
    assert out.shape == (2, 77, 32) and out.dtype == torch.float32
    # Independent path: token ids padded by hand with the end-of-text id, then the text model.
    tok = CLIPTokenizer.from_pretrained(clip_dir)
    model = CLIPTextModel.from_pretrained(clip_dir).eval()
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    rows = []
    for p in prompts:
        ids = tok(p)["input_ids"]
        assert ids[0] == tok.convert_tokens_to_ids("<|startoftext|>") and ids[-1] == eot
        rows.append(ids + [eot] * (77 - len(ids)))
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(rows)).last_hidden_state
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_batch_independent_and_single_string(embedder):
    batch = embedder(["the cat", "the dog"])
    torch.testing.assert_close(embedder("the dog")[0], batch[1], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch[0], batch[1])


def test_truncation_to_max_length(embedder):
    long = "the cat " * 100
    out = embedder([long, "the cat"])
    assert out.shape == (2, 77, 32)
    # CLIP's text transformer is causal: the first tokens of a prompt do not see later ones.
    torch.testing.assert_close(out[0, :3], out[1, :3], atol=1e-5, rtol=1e-5)


def test_frozen(embedder):
    assert not any(p.requires_grad for p in embedder.parameters())
    embedder.train()
    assert not embedder.transformer.training


def test_missing_model_fails_fast_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_cache"))
    start = time.time()
    with pytest.raises(MissingFileError, match="clip-vit-large-patch14"):
        FrozenCLIPEmbedder("openai/clip-vit-large-patch14-not-there")
    with pytest.raises(MissingFileError, match="assets/clip-vit-large-patch14"):
        FrozenCLIPEmbedder(str(tmp_path / "no_such_dir"))
    assert time.time() - start < 30


def test_bad_prompts(embedder):
    with pytest.raises(InputError):
        embedder([])
    with pytest.raises(InputError):
        embedder([1, 2])

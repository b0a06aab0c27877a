"""KL-f8 autoencoder: key layout of the release, numerics against diffusers, loading and the latent interface.

diffusers.AutoencoderKL is an independent implementation of the same architecture; converting its
random weights into ours and comparing outputs checks the architecture and the key conversion at once.
"""
import json
import os

import pytest
import torch

from libs import autoencoder as ae
from libs.errors import CheckpointError, InputError, MissingFileError
from benchmarks.tiny_models import save_self_describing

diffusers = pytest.importorskip("diffusers")

# Small but structurally complete: 4 levels (so latents are H/8), GroupNorm(32) needs widths % 32 == 0.
TINY = dict(ae.SD_KL_F8_DDCONFIG, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=32)


def tiny_diffusers_vae():
    widths = tuple(TINY["ch"] * m for m in TINY["ch_mult"])
    return diffusers.AutoencoderKL(
        block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
        up_block_types=("UpDecoderBlock2D",) * len(widths), latent_channels=4,
        layers_per_block=TINY["num_res_blocks"], norm_num_groups=32, sample_size=32).eval()


def randomise(model, seed=0):
    """Distinct random values in every tensor (GroupNorm affine included) so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    vae = tiny_diffusers_vae()
    ours = ae.FrozenAutoencoderKL(TINY, 4)
    ae.load_strict(ours, ae.diffusers_to_ours_state_dict(vae.state_dict(), len(TINY["ch_mult"])))
    return vae, ours


def test_full_sd_config_matches_release_key_list(reference_dir):
    ref = json.load(open(os.path.join(reference_dir, "autoencoder_kl_keys.json")))
    with torch.device("meta"):
        model = ae.FrozenAutoencoderKL(ae.SD_KL_F8_DDCONFIG, ae.SD_EMBED_DIM)
    ours = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    theirs = [(e["key"], e["shape"]) for e in ref["state_dict"]]
    assert ours == theirs
    assert len(ours) == ref["num_state_dict_entries"] == 248
    assert sum(p.numel() for p in model.parameters()) == ref["num_params"] == 83_653_863
    assert sum(p.numel() for p in model.encoder.parameters()) == ref["num_params_encoder"]
    assert sum(p.numel() for p in model.decoder.parameters()) == ref["num_params_decoder"]
    assert ae.SD_KL_F8_DDCONFIG == {k: tuple(v) if isinstance(v, list) else v for k, v in ref["ddconfig"].items()}
    assert ae.SD_LATENT_SCALE == ref["scale_factor_default"]


def test_numerics_match_diffusers(pair):
    vae, ours = pair
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        moments = ours.encode_moments(x)
        assert moments.shape == (2, 8, 4, 4)
        torch.testing.assert_close(moments, vae.quant_conv(vae.encoder(x)), atol=1e-5, rtol=1e-4)
        # decode() divides by scale_factor; diffusers decodes unscaled latents.
        torch.testing.assert_close(ours.decode(ours.scale_factor * z), vae.decode(z).sample, atol=1e-4, rtol=1e-4)


def test_key_conversion_is_one_to_one_onto_our_layout():
    n = len(TINY["ch_mult"])
    theirs = randomise(tiny_diffusers_vae()).state_dict()
    ours_sd = ae.FrozenAutoencoderKL(TINY, 4).state_dict()
    converted = ae.diffusers_to_ours_state_dict(theirs, n)
    # As many keys as diffusers has (no two collapse), exactly ours (onto), with our shapes.
    assert len(converted) == len(theirs) == len(ours_sd)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in ours_sd.items()}
    # Values travel unchanged (attention projections only gain two trailing unit dims).
    originals = sorted(v.flatten().tolist()[:3] for v in theirs.values())
    assert sorted(v.flatten().tolist()[:3] for v in converted.values()) == originals


def test_legacy_diffusers_attention_names_convert():
    n = len(TINY["ch_mult"])
    theirs = tiny_diffusers_vae().state_dict()
    legacy = {}
    for k, v in theirs.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert legacy.keys() != theirs.keys()
    a, b = ae.diffusers_to_ours_state_dict(legacy, n), ae.diffusers_to_ours_state_dict(theirs, n)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_diffusers_key_is_rejected():
    with pytest.raises(CheckpointError, match="no counterpart"):
        ae.diffusers_to_ours_key("encoder.down_blocks.0.attentions.0.to_q.weight", 4)


def test_original_layout_roundtrip_strict(tmp_path, pair):
    _, ours = pair
    path = tmp_path / "autoencoder_kl.pth"
    torch.save(ours.state_dict(), path)  # the release's layout: a plain state dict
    reloaded = ae.FrozenAutoencoderKL(TINY, 4, pretrained_path=str(path))
    x = torch.rand(1, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_moments(x), ours.encode_moments(x), atol=0, rtol=0)
        z = reloaded.encode(x)
        assert z.shape == (1, 4, 2, 3)
        assert reloaded.decode(z).shape == (1, 3, 16, 24)


def test_get_model_reads_self_describing_checkpoint(tmp_path, pair):
    _, ours = pair
    path = tmp_path / "tiny_ae.pth"
    save_self_describing(ours, str(path))
    model = ae.get_model(str(path), scale_factor=0.23010)
    assert model.scale_factor == 0.23010
    assert tuple(model.ddconfig["ch_mult"]) == TINY["ch_mult"]
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.encode_moments(x), ours.encode_moments(x), atol=0, rtol=0)


def test_get_model_reads_diffusers_directory_and_file(tmp_path, pair):
    vae, ours = pair
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    for path in (tmp_path / "vae", tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        model = ae.get_model(str(path))
        with torch.no_grad():
            torch.testing.assert_close(model.encode_moments(x), ours.encode_moments(x), atol=0, rtol=0)


def test_sample_has_documented_mean_and_scale():
    model = ae.FrozenAutoencoderKL(TINY, 4, scale_factor=0.5)
    n = 20000
    mean = torch.tensor([0.3, -1.0, 2.0, 0.0]).view(1, 4, 1, 1).expand(n, 4, 1, 1)
    logvar = torch.tensor([0.0, -2.0, 1.0, 50.0]).view(1, 4, 1, 1).expand(n, 4, 1, 1)  # 50 is clamped to 20
    z = model.sample(torch.cat([mean, logvar], 1), generator=torch.Generator().manual_seed(0))
    expected_std = 0.5 * torch.exp(0.5 * torch.tensor([0.0, -2.0, 1.0, 20.0]))
    std = z.std(dim=0).flatten()
    torch.testing.assert_close(std, expected_std, rtol=0.03, atol=0)
    # Standard error of the mean is std / sqrt(n); 5 of them is a safe bound.
    assert ((z.mean(dim=0).flatten() - 0.5 * mean[0].flatten()).abs() <= 5 * expected_std / n ** 0.5).all()
    # Seeded sampling is reproducible.
    m = torch.cat([mean[:3], logvar[:3]], 1)
    assert torch.equal(model.sample(m, torch.Generator().manual_seed(3)), model.sample(m, torch.Generator().manual_seed(3)))


def test_frozen_and_stays_in_eval():
    model = ae.FrozenAutoencoderKL(TINY, 4)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())


def test_decode_in_chunks_equals_decode(pair):
    _, ours = pair
    z = torch.randn(5, 4, 2, 2)
    with torch.no_grad():
        torch.testing.assert_close(ours.decode_in_chunks(z, chunk=2), ours.decode(z), atol=1e-5, rtol=1e-5)


def test_bf16_autocast(pair):
    _, ours = pair
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = ours.decode(ours.encode_moments(x)[:, :4])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours.decode(ours.encode_moments(x)[:, :4])
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_errors(tmp_path, pair):
    _, ours = pair
    with pytest.raises(MissingFileError, match="assets/stable-diffusion"):
        ae.get_model(str(tmp_path / "nope.pth"))
    corrupt = tmp_path / "corrupt.pth"
    torch.save(ours.state_dict(), corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        ae.FrozenAutoencoderKL(TINY, 4, pretrained_path=str(corrupt))
    other = tmp_path / "other.pth"
    torch.save(ae.FrozenAutoencoderKL(dict(TINY, ch_mult=(1, 2, 2, 4)), 4).state_dict(), other)
    with pytest.raises(CheckpointError, match="another shape"):
        ae.FrozenAutoencoderKL(TINY, 4, pretrained_path=str(other))
    nan = tmp_path / "nan.pth"
    sd = dict(ours.state_dict())
    sd["quant_conv.bias"] = torch.full_like(sd["quant_conv.bias"], float("nan"))
    torch.save(sd, nan)
    with pytest.raises(CheckpointError, match="NaN"):
        ae.FrozenAutoencoderKL(TINY, 4, pretrained_path=str(nan))
    with pytest.raises(InputError, match="multiples of 8"):
        ours.encode_moments(torch.zeros(1, 3, 12, 16))
    with pytest.raises(InputError, match=r"\(B, 3, H, W\)"):
        ours.encode_moments(torch.zeros(3, 16, 16))
    with pytest.raises(InputError, match="NaN"):
        ours.encode_moments(torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(InputError, match="latents"):
        ours.decode(torch.zeros(1, 8, 2, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_matches_fp32(pair, dtype):
    _, ours = pair
    model = ae.FrozenAutoencoderKL(TINY, 4)
    ae.load_strict(model, ours.state_dict())
    model = model.cuda()
    x = (torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1).cuda()
    with torch.no_grad():
        ref_m = model.encode_moments(x)
        ref_x = model.decode_in_chunks(ref_m[:, :4], chunk=3)
        with torch.autocast("cuda", dtype=dtype):
            m = model.encode_moments(x)
            out = model.decode_in_chunks(m[:, :4], chunk=3)
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    assert torch.isfinite(out).all()
    assert (m.float() - ref_m).abs().max() <= tol * ref_m.abs().max()
    assert (out.float() - ref_x).abs().max() <= tol * ref_x.abs().max() + tol

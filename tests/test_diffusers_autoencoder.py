"""Any diffusers autoencoder through the project (libs/diffusers_autoencoder.py, libs/autoencoder.autoencoder_of):
tiny random 16-channel AutoencoderKL and AutoencoderDC saved as folders, encoded and decoded through the project
against diffusers' own calls; latent scaling from the model and from the data; the Hub cache; the one-line
refusals; the SD KL-f8 family still on its own loader."""
import pytest
import torch

from configs.base import get_config as base_config
from libs import autoencoder as ae
from libs.diffusers_autoencoder import DiffusersAutoencoder
from libs.errors import ConfigError, MissingFileError
from libs.latent_stats import LatentStats, sums
from tests import tiny_autoencoders as tiny

X = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vae")
    return {"kl16": tiny.save_kl16(tmp / "kl16"), "dc": tiny.save_dcae(tmp / "dc")}


def latent_config(path, z_shape, **autoencoder):
    config = base_config()
    config.z_shape = z_shape
    config.autoencoder.update(pretrained_path=path, **autoencoder)
    return config


def test_kl16_encode_sample_decode_equal_diffusers(folders):
    ours = ae.autoencoder_of(latent_config(folders["kl16"], (16, 8, 8), latent_scaling="model"))
    assert isinstance(ours, DiffusersAutoencoder) and (ours.embed_dim, ours.downsample_factor) == (16, 8)
    theirs = tiny.diffusers.AutoencoderKL.from_pretrained(folders["kl16"]).eval()
    with torch.no_grad():
        posterior = theirs.encode(X).latent_dist
        moments = ours.encode_moments(X)
        torch.testing.assert_close(moments, posterior.parameters)
        # diffusers' pipelines: latents = (sample - shift_factor) * scaling_factor.
        expected = (posterior.sample(torch.Generator().manual_seed(5)) - tiny.KL16_SHIFT) * tiny.KL16_SCALE
        torch.testing.assert_close(ours.sample(moments, torch.Generator().manual_seed(5)), expected)
        z = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode(z), theirs.decode(z / tiny.KL16_SCALE + tiny.KL16_SHIFT).sample)


def test_dcae_is_deterministic_and_equals_diffusers(folders):
    ours = ae.autoencoder_of(latent_config(folders["dc"], (32, 2, 2), latent_scaling="model"))
    assert not ours.stochastic and ours.moment_channels == 32 and ours.downsample_factor == 32
    theirs = tiny.diffusers.AutoencoderDC.from_pretrained(folders["dc"]).eval()
    with torch.no_grad():
        latent = theirs.encode(X).latent
        torch.testing.assert_close(ours.encode_moments(X), latent)
        torch.testing.assert_close(ours.encode(X), latent * tiny.DC_SCALE)  # no noise, no shift
        z = torch.randn(2, 32, 2, 2, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours.decode_in_chunks(z, 1), theirs.decode(z / tiny.DC_SCALE).sample)


def test_data_scaling_uses_per_channel_statistics(folders):
    model = tiny.diffusers.AutoencoderDC.from_pretrained(folders["dc"]).eval()
    with torch.no_grad():
        latent = model.encode(torch.cat([X, X.flip(-1)])).latent
    # Statistics combined from two disjoint parts equal those of the whole (computed here by torch directly).
    stats = LatentStats.combine([sums(latent[:1]), sums(latent[1:])])
    per_channel = latent.double().transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(stats.mean, per_channel.mean(1))
    torch.testing.assert_close(stats.std, per_channel.std(1, unbiased=False))
    ours = ae.get_model(folders["dc"], latent_scaling="data", stats=stats)
    with torch.no_grad():
        z = ours.encode(torch.cat([X, X.flip(-1)]))
    flat = z.double().transpose(0, 1).reshape(32, -1)
    torch.testing.assert_close(flat.mean(1), torch.zeros(32, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(flat.std(1, unbiased=False), torch.ones(32, dtype=torch.float64), atol=1e-5, rtol=0)


def test_stats_file_roundtrip_and_missing_file(tmp_path, folders):
    stats = LatentStats(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([2.0, 0.25], dtype=torch.float64), 7)
    stats.save(str(tmp_path / "latent_stats.json"))
    back = LatentStats.load(str(tmp_path / "latent_stats.json"))
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std) and back.count == 7
    config = latent_config(folders["dc"], (32, 2, 2), latent_scaling="data")
    config.dataset.path = str(tmp_path / "nowhere")
    with pytest.raises(MissingFileError, match="latent_stats.json") as e:
        ae.autoencoder_of(config)
    assert "\n" not in str(e.value)
    config.autoencoder.latent_stats = str(tmp_path / "latent_stats.json")  # 2 channels for an 8-channel model
    with pytest.raises(ConfigError, match="2 / 2 channels do not fit the 32-channel"):
        ae.autoencoder_of(config)


def test_z_shape_that_disagrees_with_the_model_is_one_line(folders):
    with pytest.raises(ConfigError) as e:
        ae.autoencoder_of(latent_config(folders["kl16"], (4, 8, 8), latent_scaling="model"))
    msg = str(e.value)
    assert "(4, 8, 8)" in msg and "(16, 8, 8)" in msg and "\n" not in msg
    with pytest.raises(ConfigError, match=r"gives \(32, 8, 8\) latents of 256x256 images"):
        ae.autoencoder_of(latent_config(folders["dc"], (32, 2, 2), latent_scaling="model"), image_shape=(3, 256, 256))


def test_hub_id_resolves_from_the_local_cache_only(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tiny.make_hub_cache(str(tmp_path / "hub"), "someone/tiny-flux", tiny.tiny_kl16(), subfolder="vae")
    ours = ae.get_model("someone/tiny-flux/vae", latent_scaling="model")
    assert isinstance(ours, DiffusersAutoencoder) and ours.embed_dim == 16
    with pytest.raises(MissingFileError, match="huggingface-cli download someone/absent") as e:
        ae.get_model("someone/absent/vae", latent_scaling="model")
    assert "\n" not in str(e.value)


def test_sd_kl_f8_family_keeps_its_own_loader(tmp_path):
    """A diffusers folder of the SD KL-f8 architecture (4 channels, quant convs) still loads into
    FrozenAutoencoderKL with the config's scale factor: the paper configs' path is unchanged."""
    widths = (32, 32, 32, 32)
    vae = tiny.diffusers.AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * 4,
                                       up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                                       layers_per_block=1, norm_num_groups=32, sample_size=32)
    folder = tiny.save(vae, tmp_path / "sd")
    model = ae.autoencoder_of(latent_config(folder, (4, 4, 4)))
    assert type(model) is ae.FrozenAutoencoderKL and model.scale_factor == ae.SD_LATENT_SCALE


def test_unsupported_diffusers_class_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "AutoencoderTiny"}')
    with pytest.raises(ConfigError, match="AutoencoderTiny.*supported autoencoders: AutoencoderKL, AutoencoderDC"):
        ae.get_model(str(tmp_path), latent_scaling="model")

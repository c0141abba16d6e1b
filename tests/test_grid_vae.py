"""The grid VAE: the 3-D pixel shuffle, the shapes through the network, its field, save and load, and
the one interface both families share (shapeflow.models.families)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shapeflow import config
from shapeflow.models import families
from shapeflow.models.grid_vae import (
    PRESETS,
    GridVAE,
    GridVAEConfig,
    grid_vae_config,
    pixel_shuffle_3d,
    pixel_unshuffle_3d,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_pixel_shuffle_3d_inverts_the_unshuffle_and_moves_channels_to_neighbouring_cells():
    x = torch.randn(2, 5, 4, 6, 8)
    assert torch.equal(pixel_shuffle_3d(pixel_unshuffle_3d(x, 2), 2), x)
    y = torch.randn(2, 16, 3, 3, 3)
    assert torch.equal(pixel_unshuffle_3d(pixel_shuffle_3d(y, 2), 2), y)
    # Channel (c, i, j, k) of cell (d, h, w) lands at cell (2d + i, 2h + j, 2w + k) of channel c.
    z = torch.arange(8.0).view(1, 8, 1, 1, 1)
    out = pixel_shuffle_3d(z, 2)[0, 0]
    assert [out[i, j, k].item() for i in (0, 1) for j in (0, 1) for k in (0, 1)] == list(range(8))
    with pytest.raises(ValueError, match="not a multiple"):
        pixel_shuffle_3d(torch.zeros(1, 9, 2, 2, 2), 2)


def test_latents_are_the_cells_of_a_grid_and_the_field_has_one_value_per_query():
    model = GridVAE(grid_vae_config("tiny")).eval()
    c = model.config
    grid = torch.randn(2, 1, c.resolution, c.resolution, c.resolution) * 0.05
    posterior = model.encode(grid)
    assert posterior.mode().shape == (2, c.latent_side**3, c.latent_channels) == (2, 512, 8)
    decoded = model.decode(posterior.mode())
    assert decoded.features.shape == (2, c.feature_channels, c.resolution, c.resolution, c.resolution)
    assert model.query(decoded, torch.rand(2, 100, 3) * 2 - 1).shape == (2, 100)
    with pytest.raises(ValueError, match="reads 32\\^3 grids"):
        model.encode(torch.zeros(1, 1, 16, 16, 16))


def test_the_field_at_a_cell_centre_is_the_coarse_field_there_until_the_fine_stage_learns():
    model = GridVAE(grid_vae_config("tiny")).eval()
    c = model.config
    with torch.no_grad():
        decoded = model.decode(torch.randn(1, c.num_latents, c.latent_channels))
        index = torch.tensor([[0, 0, 0], [5, 17, 30], [31, 31, 31]])
        centres = -1.0 + (index.float() + 0.5) * (2.0 / c.resolution)
        field = model.query(decoded, centres[None])[0]  # the fine stage's last layer starts at zero
        coarse = model.coarse(decoded)[0][tuple(index.T)]
    torch.testing.assert_close(field, coarse, atol=1e-6, rtol=0)
    # x indexes the grid's first axis: moving a query along x follows the coarse field along axis 0.
    assert not torch.allclose(model.coarse(decoded)[0, 0, 0, 1], model.coarse(decoded)[0, 1, 0, 0])


def test_save_and_load_through_the_family_interface_give_the_same_field(tmp_path):
    model = GridVAE(grid_vae_config("tiny")).eval()
    families.save_vae(model, tmp_path / "vae", {"steps": 0})
    loaded = families.load_vae(tmp_path / "vae")
    assert isinstance(loaded, GridVAE) and families.family_of(loaded) == "grid"
    assert families.load_config(tmp_path / "vae") == model.config
    z = torch.randn(1, model.config.num_latents, model.config.latent_channels)
    q = torch.rand(1, 50, 3) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model.query(model.decode(z), q), loaded.query(loaded.decode(z), q))
    assert families.token_grid(loaded.config) == 8


def test_presets_and_bad_configs_are_named():
    assert PRESETS["local"].latent_side == 16 and PRESETS["local"].latent_channels == 8  # TRELLIS's 16^3 x 8
    with pytest.raises(ValueError, match="multiple of 2\\^2"):
        GridVAEConfig(resolution=30).check()
    with pytest.raises(ValueError, match="unknown grid VAE preset"):
        families.vae_config("grid", "huge")
    with pytest.raises(ValueError, match="unknown VAE family"):
        families.vae_config("voxel", "tiny")
    assert families.vae_config("grid", "tiny", {"channels": [8, 8, 8]}).latent_side == 4


def test_the_grid_family_refuses_samples_without_grids():
    model = GridVAE(grid_vae_config("tiny"))
    with pytest.raises(ValueError, match="train_vae.family: grid"):
        families.encoder_inputs(model, {"surface_points": np.zeros((4, 3))}, config.VAEDataParams(), 0)
    grid = np.zeros((32, 32, 32), dtype=np.float16)
    inputs = families.encoder_inputs(model, {"grid_sdf": grid}, config.VAEDataParams(), 0)
    assert inputs["grid"].shape == (1, 1, 32, 32, 32) and inputs["grid"].dtype == torch.float32


def test_the_registered_vae_encodes_grids_for_the_grid_family():
    from shapeflow.pyfunc_model import ShapeflowModel

    model = ShapeflowModel()
    model.kind, model.vae = "vae", GridVAE(grid_vae_config("tiny")).eval()
    latents = model.encode({"grid_sdf": np.zeros((2, 32, 32, 32), dtype=np.float32)})
    assert latents.shape == (2, 512, 8)
    with pytest.raises(ValueError, match="expected \\(batch, 32, 32, 32\\) grids"):
        model.encode(np.zeros((2, 16, 16, 16), dtype=np.float32))

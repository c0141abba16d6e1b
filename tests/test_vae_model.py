"""The VecSet VAE's pieces: shapes, farthest points, the posterior, the loss, save and load."""

from __future__ import annotations

import pytest
import torch

from shapeflow.models.layers import FourierEmbedder, farthest_point_indices
from shapeflow.models.vae import (
    PRESETS,
    DiagonalGaussian,
    VecSetVAE,
    field_loss,
    load_pretrained,
    save_pretrained,
    vae_config,
)

SMALL = {"num_latents": 16, "latent_channels": 8, "width": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1}


def cloud(batch: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normals = torch.nn.functional.normalize(torch.randn(batch, n, 3, generator=g), dim=-1)
    return 0.5 * normals, normals  # points on a sphere of radius 0.5


def test_forward_gives_one_distance_per_query_and_latents_of_the_configured_size():
    model = VecSetVAE(vae_config("tiny", SMALL))
    points, normals = cloud(2, 256)
    queries = torch.rand(2, 100, 3) * 2 - 1
    pred, posterior = model(points, normals, queries)
    assert pred.shape == (2, 100)
    assert posterior.mean.shape == (2, 16, 8)
    assert posterior.kl().shape == (2,)


def test_sharp_branch_reads_the_salient_points_and_needs_them():
    model = VecSetVAE(vae_config("tiny", SMALL | {"sharp_branch": True, "sharp_latents": 4}))
    points, normals = cloud(1, 128)
    sharp, sharp_normals = cloud(1, 64, seed=1)
    queries = torch.rand(1, 10, 3)
    model.eval()
    with torch.no_grad():
        a = model(points, normals, queries, sharp, sharp_normals, sample_posterior=False)[0]
        b = model(points, normals, queries, sharp * 0.5, sharp_normals, sample_posterior=False)[0]
        with pytest.raises(ValueError, match="sharp_points are required"):
            model(points, normals, queries)
    assert not torch.allclose(a, b)


def test_anchored_latents_start_with_the_surface_points_they_were_picked_at():
    model = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True}))
    points, normals = cloud(2, 256)
    latents = model.encode(points, normals).mode()
    assert latents.shape == (2, 16, 8 + 3) and model.config.latent_dim == 11
    anchors = latents[..., :3]
    # Every anchor is one of the input points (an FPS pick), and they spread over the sphere.
    assert (anchors[:, :, None] - points[:, None]).norm(dim=-1).amin(dim=-1).max() < 1e-6
    assert torch.pdist(anchors[0]).min() > 0.1


def test_anchored_query_decoder_reads_only_the_tokens_near_a_query():
    torch.manual_seed(0)
    # No decoder self-attention, so that a token's code reaches the field only through the query decoder.
    model = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "dec_layers": 0, "neighbours": 4})).eval()
    points, normals = cloud(1, 256)
    with torch.no_grad():
        latents = model.encode(points, normals).mode()
        near = latents[0, 0, :3] * 1.02  # just outside the first anchor
        far = -near  # the other side of the sphere
        queries = torch.stack([near, far])[None]
        before = model.query(model.decode(latents), queries)
        changed = latents.clone()
        changed[0, 0, 3:] += 5.0  # a different code for the first token only
        after = model.query(model.decode(changed), queries)
    shift = (after - before).abs()[0]
    assert shift[0] > 1e-3 and shift[1] == 0.0


@pytest.mark.parametrize("spread", [0.02, 0.3, 2.0])
def test_nearest_tokens_of_a_chunk_of_queries_are_those_of_a_full_search(spread):
    from shapeflow.models.vae import _k_smallest, _near_candidates, _nearest

    g = torch.Generator().manual_seed(1)
    anchors = torch.rand(1, 512, 3, generator=g) * 2 - 1
    queries = (torch.rand(1, 2048, 3, generator=g) - 0.5) * spread + 0.1  # close together, or not
    found = _nearest(queries, anchors, 8).sort(-1).values
    assert torch.equal(found, _k_smallest(queries, anchors, 8).sort(-1).values)
    if spread < 0.5:  # a compact chunk compares with a fraction of the tokens
        assert 2 * len(_near_candidates(queries[0], anchors[0], 8)) <= anchors.shape[1]


def test_presets_have_the_published_size_for_base():
    base = PRESETS["base"]
    assert 512 <= base.num_latents <= 2048 and 32 <= base.latent_channels <= 64
    assert 512 <= base.width <= 768 and (base.enc_layers, base.dec_layers) == (8, 16)


def test_unknown_preset_or_field_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown VAE preset 'huge'"):
        vae_config("huge")
    with pytest.raises(ValueError, match=r"unknown VAE config key\(s\) \['widht'\]"):
        vae_config("tiny", {"widht": 64})
    with pytest.raises(ValueError, match="multiple of heads"):
        vae_config("tiny", {"width": 30, "heads": 4})


def test_farthest_points_spread_over_the_cloud():
    # Two tight clusters far apart: the second pick must come from the other cluster.
    a = torch.randn(1, 50, 3) * 0.01
    points = torch.cat([a, a + 1.0], dim=1)
    idx = farthest_point_indices(points, 2)
    assert (idx[0, 0] < 50) != (idx[0, 1] < 50)
    assert len(set(farthest_point_indices(points, 20)[0].tolist())) == 20


def test_fourier_features_size_and_values():
    emb = FourierEmbedder(num_freqs=4)
    x = torch.tensor([[0.25, -0.5, 1.0]])
    out = emb(x)
    assert out.shape == (1, emb.out_dim) == (1, 27)
    assert torch.allclose(out[0, :3], x[0])
    assert torch.allclose(out[0, 3], torch.sin(torch.tensor(torch.pi * 0.25)))


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    prior = DiagonalGaussian(torch.zeros(1, 4, 6))
    assert torch.allclose(prior.kl(), torch.zeros(1))
    assert (DiagonalGaussian(torch.ones(1, 4, 6)).kl() > 0).all()
    shifted = DiagonalGaussian(torch.cat([torch.full((1, 4, 3), 2.0), torch.zeros(1, 4, 3)], -1))
    assert torch.allclose(shifted.kl(), torch.tensor([2.0]))  # 0.5 * mean^2


@pytest.mark.parametrize("kind", ["l1", "mse", "bce"])
def test_loss_pushes_a_wrong_sign_towards_the_right_one(kind):
    sdf = torch.tensor([-0.5, 0.5])  # far inside, far outside
    pred = torch.tensor([0.8, -0.8], requires_grad=True)  # both wrong, beyond the truncation
    field_loss(pred, sdf, kind, truncation=0.1).sum().backward()
    assert pred.grad[0] > 0 and pred.grad[1] < 0  # gradient descent moves each towards its sign


def test_truncated_regression_ignores_distance_beyond_the_truncation():
    sdf = torch.tensor([0.3, 0.9])
    pred = torch.tensor([0.1, 0.1])
    assert torch.allclose(field_loss(pred, sdf, "l1", 0.1), torch.zeros(2))


def test_save_and_load_give_the_same_field(tmp_path):
    model = VecSetVAE(vae_config("tiny", SMALL)).eval()
    save_pretrained(model, tmp_path / "vae", {"steps": 3})
    loaded = load_pretrained(tmp_path / "vae")
    points, normals = cloud(1, 64)
    queries = torch.rand(1, 20, 3)
    with torch.no_grad():
        a = model(points, normals, queries, sample_posterior=False)[0]
        b = loaded(points, normals, queries, sample_posterior=False)[0]
    assert torch.equal(a, b)
    assert loaded.config == model.config


def test_loading_a_missing_model_says_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="dvc repro train_vae"):
        load_pretrained(tmp_path / "nothing")


def test_farthest_points_do_not_depend_on_the_order_of_the_points():
    points = torch.rand(1, 300, 3)
    order = torch.randperm(300)
    a = points[0, farthest_point_indices(points, 16)[0]]
    b = points[0, order][farthest_point_indices(points[:, order], 16)[0]]
    assert torch.equal(a, b)


def test_local_point_reader_describes_a_patch_the_same_wherever_it_sits():
    torch.manual_seed(0)
    model = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "encoder_neighbours": 8})).eval()
    points, normals = cloud(1, 256)
    anchors = points[:, :16]
    reader = model.encoder.reader
    with torch.no_grad():
        here = reader(anchors, points, normals)
        moved = reader(anchors + 0.3, points + 0.3, normals)  # the same patches, translated
        turned = reader(anchors, points, -normals)  # the same points facing the other way
    assert here.shape == (1, 16, 32)
    assert torch.allclose(here, moved, atol=1e-5)
    assert not torch.allclose(here, turned, atol=1e-3)


def test_encoder_neighbours_need_anchored_latents():
    with pytest.raises(ValueError, match="needs anchored"):
        vae_config("tiny", {"encoder_neighbours": 8})


def test_output_scale_multiplies_the_field():
    torch.manual_seed(0)
    base = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "output_scale": 1.0})).eval()
    scaled = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "output_scale": 0.1})).eval()
    scaled.load_state_dict(base.state_dict())
    points, normals = cloud(1, 256)
    queries = torch.rand(1, 20, 3) * 2 - 1
    with torch.no_grad():
        a = base(points, normals, queries, sample_posterior=False)[0]
        b = scaled(points, normals, queries, sample_posterior=False)[0]
    assert torch.allclose(b, 0.1 * a, atol=1e-6)
    with pytest.raises(ValueError, match="output_scale must be positive"):
        vae_config("tiny", {"output_scale": 0.0})


def test_plane_term_is_the_distance_to_the_nearest_tokens_plane():
    torch.manual_seed(0)
    model = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "planes": True, "neighbours": 1})).eval()
    dec = model.query_decoder
    torch.nn.init.zeros_(dec.out.weight)
    torch.nn.init.zeros_(dec.out.bias)  # only the plane term is left in the field
    points, normals = cloud(1, 256)
    with torch.no_grad():
        decoded = model.decode(model.encode(points, normals).mode())
        plane = dec.to_plane(dec.norm_tok(decoded.tokens))[0, 0]
        normal, offset = torch.nn.functional.normalize(plane[:3], dim=0), plane[3]
        anchor = decoded.anchors[0, 0]
        # Queries that stay nearest to the first anchor, on either side of its plane.
        queries = torch.stack([anchor + 0.01 * normal, anchor - 0.01 * normal])[None]
        field = model.query(decoded, queries)[0]
    reach = dec.log_reach.exp()
    expected = reach * torch.tanh((torch.tensor([0.01, -0.01]) + offset) / reach)
    assert torch.allclose(field, expected, atol=1e-5)
    with pytest.raises(ValueError, match="planes needs anchored"):
        vae_config("tiny", {"planes": True})


def reference_local_field(dec, queries: torch.Tensor, decoded) -> torch.Tensor:
    """The local query decoder as its docstring states it, one (query, neighbour) pair at a time:
    hidden = gelu(U LN(token) + R fourier(offset) + P fourier(plane distance)), values and logits from
    one Linear per pair, a softmax per head over the neighbours, then the field head and the plane blend."""
    f = torch.nn.functional
    normed = dec.norm_tok(decoded.tokens)[0]
    tokens, plane = dec.from_token(normed), dec.to_plane(normed)
    normal, offset = f.normalize(plane[:, :3], dim=-1), plane[:, 3]
    anchors = decoded.anchors[0]
    width, heads = tokens.shape[-1], dec.heads
    out = []
    for point in queries[0]:
        near = (anchors - point).norm(dim=-1).topk(dec.k, largest=False).indices
        rel = point - anchors[near]  # (k, 3)
        dist = (normal[near] * rel).sum(-1, keepdim=True) + offset[near, None]
        hidden = f.gelu(tokens[near] + dec.rel(rel) + dec.from_plane(dec.plane_fourier(dist)))
        value, logit, plane_logit = dec.to_value_logit(hidden).split([width, heads, 1], dim=-1)
        weight = logit.softmax(dim=0)  # (k, heads)
        x = (weight[:, :, None] * value.view(-1, heads, width // heads)).sum(0).flatten()
        blend = (plane_logit.softmax(dim=0) * dist).sum()
        reach = dec.log_reach.exp()
        out.append(dec._field(x[None, None])[0, 0] + reach * torch.tanh(blend / reach))
    return torch.stack(out)[None]


def test_local_query_decoder_computes_the_per_pair_attention_it_describes():
    # The decoder pools the hidden vectors before the value map instead of mapping every pair: the
    # field, and its gradients in training, must be those of the per-pair formula.
    torch.manual_seed(0)
    model = VecSetVAE(vae_config("tiny", SMALL | {"anchored": True, "planes": True, "neighbours": 4}))
    points, normals = cloud(1, 256)
    queries = torch.rand(1, 30, 3) * 2 - 1
    decoded = model.decode(model.encode(points, normals).mode())
    fast = model.query(decoded, queries)
    slow = reference_local_field(model.query_decoder, queries, decoded)
    assert torch.allclose(fast, slow, atol=1e-5)
    weight = model.query_decoder.to_value_logit.weight
    (grad_fast,) = torch.autograd.grad(fast.square().sum(), weight, retain_graph=True)
    (grad_slow,) = torch.autograd.grad(slow.square().sum(), weight)
    assert torch.allclose(grad_fast, grad_slow, atol=1e-5)

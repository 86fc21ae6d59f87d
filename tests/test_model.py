"""PCM-Net: preset shapes, salient concepts, marked patches, replace vs append, positions, types, noise."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcm.model import PCMNet, PCMNetConfig, load_preset

D, N = 8, 4  # joint width, patches; patch width W = 2D (see `known_model`)


def head_identity() -> dict[str, torch.Tensor]:
    """A CLIP head under which a patch [x, -x] maps to the direction of x (mean 0, so LN only rescales)."""
    proj = torch.cat([torch.eye(D), torch.zeros(D, D)], dim=0)  # [2D, D]
    return {"ln_post.weight": torch.ones(2 * D), "ln_post.bias": torch.zeros(2 * D), "proj": proj}


def as_patch(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, -x], dim=-1)


def known_model(**overrides) -> PCMNet:
    """Orthonormal concepts e0..e5; K=3, M=2; every dropout off so the embedding is exact."""
    values = dict(d_embed=D, d_width=2 * D, n_patches=N, d_model=32, n_heads=4, n_enc_layers=2, n_dec_layers=1,
                  d_ff=64, embed_dropout=0, dropout=0, attn_dropout=0, decoder_dropout=0, output_dropout=0,
                  top_k=3, top_m=2)
    cfg = PCMNetConfig(**{**values, **overrides})
    torch.manual_seed(0)
    return PCMNet(cfg, vocab_size=11, concept_bank=torch.eye(D)[:6], clip_head=head_identity())


def known_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """g most similar to concepts 2, 4, 0 (in that order); patch 0 = e2 (cos 1), patch 1 ~ e4 (cos .96),
    patch 2 = e5 (not salient), patch 3 ~ e0 (cos .89): the top-2 pairs mark patches 0 and 1."""
    e = torch.eye(D)
    g = F.normalize(3 * e[2] + 2 * e[4] + 1 * e[0] + 0.1 * e[6], dim=-1)
    xs = [e[2], F.normalize(e[4] + 0.3 * e[1], dim=-1), e[5], F.normalize(e[0] + 0.5 * e[3], dim=-1)]
    v = as_patch(torch.stack(xs))                                           # [N, 2D]
    return torch.stack([g, g]), torch.stack([v, 3 * v])                     # scale does not change LN output


def expected_token(model: PCMNet, x: torch.Tensor) -> torch.Tensor:
    return model.embed_norm(F.relu(x))


def test_salient_concepts_are_the_top_k_by_similarity():
    model = known_model()
    g, _ = known_inputs()
    assert model.salient_concepts(g).tolist() == [[2, 4, 0], [2, 4, 0]]


def test_top_m_pairs_mark_exactly_their_patches_and_textual_patches_follow_affinity():
    model = known_model()
    g, v = known_inputs()
    plan = model.mixup_plan(g, v)
    assert plan.marked.tolist() == [[True, True, False, False]] * 2
    # Patch 0 matches concept 2 exactly: with tau = 0.01 its textual patch is (almost) c2.
    assert torch.allclose(plan.textual[:, 0], torch.eye(D)[2].expand(2, D), atol=1e-6)
    # Patch 2 is orthogonal to every salient concept: its textual patch is their uniform mean.
    assert torch.allclose(plan.textual[0, 2], torch.eye(D)[[2, 4, 0]].mean(0), atol=1e-6)


def test_at_most_m_patches_even_when_pairs_share_a_patch():
    model = known_model(top_m=3)
    e = torch.eye(D)
    g = F.normalize(3 * e[2] + 2 * e[4] + e[0], dim=-1)[None]
    # Patch 0 is close to both c2 and c4: the top-3 pairs are (0, c2), (0, c4), (1, c0) -> 2 patches.
    xs = [F.normalize(e[2] + 0.9 * e[4], dim=-1), e[0], e[5], e[6]]
    plan = model.mixup_plan(g, as_patch(torch.stack(xs))[None])
    assert plan.marked.tolist() == [[True, True, False, False]]


def test_training_replaces_marked_patches_with_type_1_tokens():
    model = known_model(noise=False).train()
    g, v = known_inputs()
    x, pad = model.embed(g, v)
    assert x.shape == (2, 1 + N, 32) and not pad.any()
    plan = model.mixup_plan(g, v)
    pos, typ = model.position.weight, model.token_type.weight
    for j in range(N):
        if plan.marked[0, j]:
            want = model.w_textual(plan.textual[:, j]) + pos[1 + j] + typ[1]
        else:
            want = model.w_visual(v[:, j]) + pos[1 + j] + typ[0]
        assert torch.allclose(x[:, 1 + j], expected_token(model, want), atol=1e-5), j
    assert torch.allclose(x[:, 0], expected_token(model, model.w_global(g) + pos[0] + typ[0]), atol=1e-5)


def test_inference_appends_textual_tokens_and_masks_the_unmarked_ones():
    model = known_model().eval()
    g, v = known_inputs()
    x, pad = model.embed(g, v)
    assert x.shape == (2, 1 + 2 * N, 32)
    assert pad.tolist() == [[False] * (1 + N) + [False, False, True, True]] * 2
    plan = model.mixup_plan(g, v)
    pos, typ = model.position.weight, model.token_type.weight
    for j in range(N):  # visual tokens untouched, even the marked ones
        assert torch.allclose(x[:, 1 + j], expected_token(model, model.w_visual(v[:, j]) + pos[1 + j] + typ[0]), atol=1e-5)
        # textual token j reuses patch j's position and has type 1
        want = model.w_textual(plan.textual[:, j]) + pos[1 + j] + typ[1]
        assert torch.allclose(x[:, 1 + N + j], expected_token(model, want), atol=1e-5)
    memory, memory_pad = model.encode(g, v)
    assert memory.shape == (2, 1 + 2 * N, 32) and torch.equal(memory_pad, pad)


def test_masked_textual_tokens_do_not_influence_the_memory():
    model = known_model().eval()
    g, v = known_inputs()
    memory, pad = model.encode(g, v)
    # Change the frozen textual patch of an unmarked position: nothing that is attended changes.
    plan = model.mixup_plan(g, v)
    plan.textual[:, 2] += 5.0
    orig = model.mixup_plan
    model.mixup_plan = lambda *_: plan
    try:
        memory2, _ = model.encode(g, v)
    finally:
        model.mixup_plan = orig
    keep = ~pad
    assert torch.allclose(memory[keep], memory2[keep], atol=1e-5)


def test_pcm_off_keeps_plain_visual_tokens_in_both_modes():
    model = known_model(pcm=False, noise=False)
    assert model.w_textual is None
    g, v = known_inputs()
    for mode in (model.train(), model.eval()):
        x, pad = mode.embed(g, v)
        assert x.shape == (2, 1 + N, 32) and not pad.any()
        assert torch.allclose(x[:, 1], expected_token(model, model.w_visual(v[:, 0]) + model.position.weight[1]
                                                      + model.token_type.weight[0]), atol=1e-5)


def test_noise_is_injected_at_training_only_with_the_configured_variance():
    model = known_model(noise_variance=0.016)
    g, _ = known_inputs()
    torch.manual_seed(5)
    noisy = model.train().noisy_global(g)
    torch.manual_seed(5)
    want = F.normalize(F.normalize(g, dim=-1) + torch.randn_like(g) * math.sqrt(0.016), dim=-1)
    assert torch.allclose(noisy, want, atol=1e-6) and not torch.allclose(noisy, g, atol=1e-3)
    assert torch.allclose(model.eval().noisy_global(g), g, atol=1e-6)
    assert torch.allclose(known_model(noise=False).train().noisy_global(g), g, atol=1e-6)


def test_noise_reaches_the_global_token_but_not_the_salient_detection():
    model = known_model(noise_variance=100.0).train()  # noise that would scramble any detection it touched
    g, v = known_inputs()
    clean = known_model(noise=False).train()
    torch.manual_seed(1)
    x, _ = model.embed(g, v)
    x_clean, _ = clean.embed(g, v)
    assert not torch.allclose(x[:, 0], x_clean[:, 0], atol=1e-3)      # global token is noisy
    assert torch.allclose(x[:, 1:], x_clean[:, 1:], atol=1e-5)        # the same patches replaced, same textual patches


def test_inter_layer_global_feature_replaces_token_0():
    model = known_model().eval()
    g, v = known_inputs()
    x, pad = model.embed(g, v)
    gs = [x[:, 0]]
    for layer in model.encoder:
        x = layer(x, src_key_padding_mask=pad)
        gs.append(x[:, 0])
    memory, _ = model.encode(g, v)
    assert torch.allclose(memory[:, 0], model.global_norm(model.global_fuse(torch.cat(gs, -1))), atol=1e-5)
    assert torch.allclose(memory[:, 1:], x[:, 1:], atol=1e-5)


def test_decoder_is_causal():
    model = known_model().eval()
    g, v = known_inputs()
    memory, pad = model.encode(g, v)
    a = torch.tensor([[1, 5, 6, 7], [1, 5, 6, 7]])
    b = a.clone()
    b[:, 3] = 9
    la, lb = model.decode(a, memory, pad), model.decode(b, memory, pad)
    assert torch.allclose(la[:, :3], lb[:, :3], atol=1e-5) and not torch.allclose(la[:, 3], lb[:, 3])


@pytest.mark.parametrize("preset,shapes", [("vitl14", (768, 1024, 64)), ("vitb32", (512, 768, 49)),
                                           ("tiny", (16, 24, 4))])
def test_preset_shapes(preset, shapes):
    d_embed, d_width, n = shapes
    cfg = load_preset(preset).with_data_shapes(d_embed, d_width, n, "test")
    head = {"ln_post.weight": torch.ones(d_width), "ln_post.bias": torch.zeros(d_width),
            "proj": torch.randn(d_width, d_embed)}
    model = PCMNet(cfg, 50, torch.randn(12, d_embed), head)
    g, v, tok = torch.randn(2, d_embed), torch.randn(2, n, d_width), torch.randint(0, 50, (2, 21))
    assert model.train()(g, v, tok).shape == (2, 21, 50)
    memory, pad = model.eval().encode(g, v)
    assert memory.shape == (2, 1 + 2 * n, cfg.d_model) and pad.shape == (2, 1 + 2 * n)
    assert int((~pad[:, 1 + n:]).sum(1).max()) <= cfg.top_m


def test_paper_values_in_presets():
    l14, b32 = load_preset("vitl14"), load_preset("vitb32")
    for cfg in (l14, b32):
        assert (cfg.d_model, cfg.n_heads, cfg.n_enc_layers, cfg.n_dec_layers, cfg.d_ff) == (512, 8, 3, 3, 2048)
        assert (cfg.top_k, cfg.top_m, cfg.tau, cfg.noise_variance, cfg.max_len) == (5, 5, 0.01, 0.016, 20)
        assert (cfg.embed_dropout, cfg.attn_dropout, cfg.output_dropout) == (0.5, 0.3, 0.5)
    assert (l14.dropout, b32.dropout) == (0.25, 0.2)
    assert (l14.d_embed, l14.d_width, l14.n_patches) == (768, 1024, 64)


def test_attention_dropout_is_its_own_setting():
    model = known_model(attn_dropout=0.3, dropout=0.2, decoder_dropout=None)
    layer = model.encoder[0]
    assert layer.self_attn.dropout == 0.3 and layer.dropout.p == 0.2
    dec = model.decoder[0]  # the decoder shares both settings, as in the release
    assert dec.self_attn.dropout == dec.multihead_attn.dropout == 0.3 and dec.dropout.p == 0.2


def test_mixup_decisions_ignore_autocast():
    model = known_model()
    g, v = torch.randn(4, model.cfg.d_embed), torch.randn(4, model.cfg.n_patches, model.cfg.d_width)
    plain = model.mixup_plan(g, v)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = model.mixup_plan(g, v)
    assert torch.equal(plain.salient, cast.salient) and torch.equal(plain.marked, cast.marked)
    assert cast.textual.dtype == torch.float32


def test_shape_mismatch_names_the_preset_fields():
    with pytest.raises(ValueError, match=r"d_embed=768 but the data has 16.*vitb32"):
        load_preset("vitl14").with_data_shapes(16, 1024, 64, "enc")


def test_vocab_keeps_hyphenated_words_and_bans_specials():
    from pcm.vocab import Vocab, tokenize

    assert tokenize("A man in a T-shirt eats a hot-dog.") == ["a", "man", "in", "a", "t-shirt", "eats", "a", "hot-dog"]
    v = Vocab.build(["a t-shirt"])
    assert set(v.banned) == {v.pad, v.bos, v.unk} and v.eos not in v.banned

"""model.py: sizes, the hub key layout, checkpoint loading, pos-embed resizing, masking, attention, drop path."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as M
import weights as W


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def small(**kw):
    kw = {"arch": "vit_small", "img_size": 224, "num_register_tokens": 4, "ffn": "mlp", **kw}
    m = M.ViT(**kw)
    with torch.no_grad():  # random LayerScale so every block matters (the init 1e-5 hides errors)
        for b in m.blocks:
            b.ls1.gamma.normal_(0, 0.5)
            b.ls2.gamma.normal_(0, 0.5)
    return m.eval()


# -- sizes and layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("img_size,expected", [(518, 1_136_486_912), (224, 1_134_777_344)])
def test_giant2_reg4_swiglu_parameter_count(img_size, expected):
    with torch.device("meta"):
        m = M.ViT("vit_giant2", img_size=img_size, ffn="swiglu", num_register_tokens=4)
    assert n_params(m) == expected


def test_smaller_archs_parameter_counts():
    # RECIPE.md §1.1 (224 grid); heads: §3
    with torch.device("meta"):
        assert n_params(M.ViT("vit_small", img_size=224, ffn="mlp", num_register_tokens=4)) == 21_630_720
        assert n_params(M.DINOHead(1536, 131072)) == 58_593_664
    assert M.swiglu_hidden(1536) == 4096 and M.swiglu_hidden(384) == 1024 and M.swiglu_hidden(1024) == 2736


def test_state_dict_has_exactly_the_hub_keys_and_shapes():
    with torch.device("meta"):
        m = M.ViT("vit_giant2", img_size=518, ffn="swiglu", num_register_tokens=4)
    D = 1536
    expected = {"cls_token": (1, 1, D), "pos_embed": (1, 1370, D), "register_tokens": (1, 4, D), "mask_token": (1, D),
                "patch_embed.proj.weight": (D, 3, 14, 14), "patch_embed.proj.bias": (D,),
                "norm.weight": (D,), "norm.bias": (D,)}
    for i in range(40):
        b = f"blocks.{i}."
        expected.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                         b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                         b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                         b + "mlp.w12.weight": (8192, D), b + "mlp.w12.bias": (8192,), b + "mlp.w3.weight": (D, 4096),
                         b + "mlp.w3.bias": (D,), b + "ls2.gamma": (D,)})
    got = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert got == expected and len(got) == 568
    mlp_keys = [k for k in M.ViT("vit_small", num_register_tokens=0).state_dict() if k.startswith("blocks.0.mlp")]
    assert sorted(mlp_keys) == ["blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias",
                                "blocks.0.mlp.fc2.weight"]


def test_head_layout_init_and_weight_norm():
    h = M.DINOHead(384, n_prototypes=1000, hidden_dim=64, bottleneck_dim=32)
    assert sorted(h.state_dict()) == sorted(["mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                             "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g",
                                             "last_layer.weight_v"])
    assert torch.all(h.last_layer.weight_g == 1) and h.last_layer.weight_g.requires_grad
    assert torch.all(h.mlp[0].bias == 0) and abs(h.mlp[0].weight.std().item() - 0.02) < 0.003
    with torch.no_grad():
        h.last_layer.weight_g.uniform_(0.5, 2.0)
    z = F.normalize(torch.randn(7, 32), dim=-1)
    # logits = z . (g * v/|v|): each prototype row has norm g, so |logit| <= g for a unit z
    v = h.last_layer.weight_v
    expected = z @ (h.last_layer.weight_g * v / v.norm(dim=1, keepdim=True)).T
    assert torch.allclose(h.last_layer(z), expected, atol=1e-6)
    assert h(torch.randn(7, 384)).shape == (7, 1000)


# -- forward ------------------------------------------------------------------------------------------------------

def test_forward_features_keys_and_shapes():
    m = small()
    x = torch.randn(2, 3, 224, 224)
    out = m.forward_features(x)
    assert set(out) == {"x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm", "masks"}
    assert out["x_norm_clstoken"].shape == (2, 384) and out["x_norm_regtokens"].shape == (2, 4, 384)
    assert out["x_norm_patchtokens"].shape == (2, 256, 384) and out["x_prenorm"].shape == (2, 261, 384)
    assert torch.allclose(m.norm(out["x_prenorm"])[:, 0], out["x_norm_clstoken"])
    assert torch.equal(m(x), out["x_norm_clstoken"])


def test_token_layout_and_pos_embed_only_on_cls_and_patches():
    m = small()
    x = torch.randn(2, 3, 224, 224)
    t = m.prepare_tokens(x)
    patches = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    assert torch.allclose(t[:, 0], (m.cls_token + m.pos_embed[:, :1])[0].expand(2, -1))
    assert torch.equal(t[:, 1:5], m.register_tokens.expand(2, -1, -1))  # registers get no pos-embed
    assert torch.allclose(t[:, 5:], patches + m.pos_embed[:, 1:], atol=1e-6)


def test_masks_replace_exactly_the_masked_patch_inputs():
    m = small()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        m.mask_token.normal_()
    masks = torch.zeros(2, 256, dtype=torch.bool)
    masks[0, [3, 17, 200]] = True
    masks[1, 100:140] = True
    a, b = m.prepare_tokens(x), m.prepare_tokens(x, masks)
    changed = (a != b).any(-1)  # (B, 1 + 4 + 256)
    assert torch.equal(changed[:, 5:], masks) and not changed[:, :5].any()
    # a masked token is mask_token + its position embedding
    assert torch.allclose(b[0, 5 + 17], m.mask_token[0] + m.pos_embed[0, 1 + 17], atol=1e-6)
    out = m.forward_features(x, masks)
    assert out["masks"] is masks


@pytest.mark.parametrize("size,grid", [(224, 16), (98, 7), (518, 37)])
def test_pos_embed_is_bicubic_antialias_resized_to_the_input_grid(size, grid):
    m = small(img_size=518)  # hub layout: a 37x37 stored grid
    x = torch.randn(1, 3, size, size)
    t = m.prepare_tokens(x)
    patches = F.conv2d(x, m.patch_embed.proj.weight, m.patch_embed.proj.bias, stride=14).flatten(2).transpose(1, 2)
    stored = m.pos_embed[:, 1:].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    if grid == 37:
        ref = m.pos_embed[:, 1:]
    else:
        ref = F.interpolate(stored, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
        ref = ref.permute(0, 2, 3, 1).reshape(1, grid * grid, 384)
    assert t.shape[1] == 1 + 4 + grid * grid
    assert torch.allclose(t[:, 5:] - patches, ref, atol=1e-5)


def test_resize_of_a_smooth_pos_embed_stays_smooth():
    # a pos-embed linear in the patch column is sampled, not scrambled: columns stay ordered after 16 -> 7
    G = 16
    col = torch.linspace(-1, 1, G).repeat(G)
    pe = torch.cat([torch.zeros(1, 1), col[None]], dim=1)[..., None].repeat(1, 1, 4)
    out = M.resize_pos_embed(pe, (7, 7))[0, 1:, 0].reshape(7, 7)
    assert torch.all(out[:, 1:] > out[:, :-1]) and torch.allclose(out, out[:1].expand(7, 7), atol=1e-6)
    assert torch.allclose(out.mean(), torch.tensor(0.0), atol=1e-6)  # symmetric, like the input


def test_sdpa_attention_equals_explicit_softmax_attention():
    attn = M.Attention(64, num_heads=4)
    x = torch.randn(3, 10, 64)
    q, k, v = attn.qkv(x).reshape(3, 10, 3, 4, 16).unbind(2)  # (B, N, heads, hd)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(16), dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(3, 10, 64))
    assert torch.allclose(attn(x), ref, atol=1e-5)


def test_list_input_equals_separate_calls():
    m = small()
    g, l = torch.randn(2, 3, 224, 224), torch.randn(4, 3, 98, 98)
    masks = torch.rand(2, 256) < 0.3
    outs = m.forward_features([g, l], [masks, None])
    a, b = m.forward_features(g, masks), m.forward_features(l)
    for k in ("x_norm_clstoken", "x_norm_patchtokens"):
        assert torch.allclose(outs[0][k], a[k], atol=1e-6) and torch.allclose(outs[1][k], b[k], atol=1e-6)


# -- stochastic depth ---------------------------------------------------------------------------------------------

def test_batch_subset_drop_path_touches_a_subset_and_is_unbiased():
    b, p = 10, 0.4
    x = torch.randn(b, 3, 2)
    seen = []

    def branch(xs):
        seen.append(xs.shape[0])
        return torch.ones_like(xs)

    out = M.add_residual_on_subset(x, branch, p)
    subset = max(int(b * (1 - p)), 1)
    assert seen == [subset] == [6]
    delta = (out - x)[:, 0, 0]
    assert torch.allclose(delta[delta != 0], torch.full((subset,), b / subset))
    assert (delta != 0).sum() == subset
    # expectation over draws = x + branch(x): each row is kept with prob subset/b and scaled by b/subset
    mean = torch.stack([M.add_residual_on_subset(x, torch.ones_like, p) for _ in range(4000)]).mean(0)
    assert torch.allclose(mean, x + 1, atol=0.05)


@pytest.mark.parametrize("p,batch", [(0.4, 20), (0.1, 20), (0.05, 20), (0.5, 3), (0.9, 4)])
def test_drop_path_runs_each_branch_on_dinov2s_subset_at_any_rate(p, batch):
    # DINOv2's training (list) forward: both residual branches of a block see max(int(b (1 - p)), 1) samples for
    # any p > 0 (ViT-S's 0.1 included); in eval mode, or at p = 0, every sample
    blk = M.Block(32, 2, "mlp", 4.0, 1.0, drop_path_rate=p).train()
    seen = []
    blk.attn.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    blk.mlp.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
    blk(torch.randn(batch, 5, 32))
    assert seen == [max(int(batch * (1 - p)), 1)] * 2
    seen.clear()
    blk.drop_path_rate = 0.0
    blk(torch.randn(batch, 5, 32))
    assert seen == [batch, batch]
    blk.eval()
    blk.drop_path_rate = p
    x = torch.randn(4, 5, 32)
    assert torch.allclose(blk(x), x + blk.attn_branch(x) + blk.ffn_branch(x + blk.attn_branch(x)), atol=1e-6)


@pytest.mark.parametrize("bf16", [False, True])
def test_recompute_modes_give_the_same_gradients(bf16):
    # 'selective' reruns the elementwise ops of each block and 'full' the whole block in the backward pass; with
    # the batch-subset drop path the recomputation must reuse the same random subsets, and under autocast the
    # same weight casts (autocast caches them across the crop sizes)
    torch.manual_seed(1)
    m = small(drop_path_rate=0.4, depth=4).train()
    x = [torch.randn(2, 3, 56, 56), torch.randn(5, 3, 28, 28)]  # 5 x 0.6 kept by the subset drop path: 3
    w = torch.randn(5, 4, 384)
    grads = {}
    for mode in ("none", "selective", "full"):
        m.recompute = mode
        m.zero_grad()
        torch.manual_seed(3)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = m.forward_features(x)
        # a random projection: a plain sum of layer-normed tokens is constant, so its gradient is rounding noise
        (out[0]["x_norm_clstoken"].square().sum() + (out[1]["x_norm_patchtokens"] * w).sum()).backward()
        grads[mode] = [p.grad.clone() for p in m.parameters() if p.grad is not None]  # mask_token: unused
    for mode in ("selective", "full"):
        for a, b in zip(grads["none"], grads[mode]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="recompute"):
        small(recompute="some")


def test_recompute_modes_hold_less_memory_after_the_forward_pass():
    # net bytes the CPU allocator holds once the forward pass is done: what autograd keeps for backward
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    m = small().train()
    x = torch.randn(4, 3, 56, 56)
    held = {}
    for mode in ("none", "selective", "full"):
        m.recompute = mode
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = m.forward_features(x)["x_norm_clstoken"].sum()
        held[mode] = sum(e.self_cpu_memory_usage for e in prof.events())
        del out
    block_inputs = 12 * 4 * (16 + 5) * 384 * 4  # 'full': each block's fp32 input, (B, 1 + 4 + 4 * 4, D)
    assert block_inputs <= held["full"] < 1.2 * block_inputs
    assert held["full"] < held["selective"] < 0.7 * held["none"]


def test_bf16_autocast_forward_is_finite():
    m = small()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.forward_features(torch.randn(2, 3, 98, 98))
    assert torch.isfinite(out["x_norm_clstoken"].float()).all()


# -- loading ------------------------------------------------------------------------------------------------------

def test_hub_file_loads_strict_and_resizes_to_a_training_grid(tmp_path):
    hub = small(img_size=518)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(hub.state_dict(), path)
    m = W.load_backbone(str(path))
    assert (m.arch, m.ffn, m.num_register_tokens, m.pos_embed.shape[1]) == ("vit_small", "mlp", 4, 1370)
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(m.eval()(x), hub(x))
    m224 = W.load_backbone(str(path), img_size=224).eval()  # pos-embed resized once, 37x37 -> 16x16
    assert m224.pos_embed.shape[1] == 257
    assert torch.allclose(m224(x), hub(x), atol=1e-5)  # same interpolation as the 518 model does at run time


def test_openmidnight_chunked_teacher_loads_to_the_same_weights(tmp_path):
    src = small(ffn="swiglu")
    teacher = {}
    for k, v in src.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            k = f"blocks.{i // 3}.{i}." + k.split(".", 2)[2]  # 4 chunks of 3 blocks, global index kept
        teacher["backbone." + k] = v
    for head in ("dino_head", "ibot_head"):
        for k, v in M.DINOHead(384, 100, 64, 32).state_dict().items():
            teacher[f"{head}.{k}"] = v
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    m = W.load_backbone(str(path))
    assert m.ffn == "swiglu" and len(m.blocks) == 12
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_wrong_arch_checkpoint_fails_with_a_clear_message(tmp_path):
    path = tmp_path / "vits.pth"
    torch.save(small().state_dict(), path)
    with pytest.raises(ValueError, match="vit_small") as e:
        W.load_backbone(str(path), arch="vit_base")
    assert "mis-shaped" in str(e.value) and "probable cause" in str(e.value)
    with pytest.raises(ValueError, match="register tokens") as e:
        W.load_backbone(str(path), num_register_tokens=0)
    assert "unexpected keys: register_tokens" in str(e.value)
    with pytest.raises(ValueError, match="FFN"):
        W.load_backbone(str(path), ffn="swiglu")
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        W.load_backbone(str(tmp_path / "nope.pth"))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="no ViT backbone"):
        W.load_backbone(str(tmp_path / "junk.pth"))


@pytest.mark.parametrize("train_mode,selective", [(True, False), (True, True), (False, False)])
def test_a_block_traces_without_graph_breaks(train_mode, selective):
    # torch.compile sees one graph per block for both crop sizes, batch-subset drop path (randperm, index_add)
    # and the selective-recompute checkpoint included
    blk = M.Block(64, 4, "swiglu", 4.0, 1e-5, drop_path_rate=0.4).train(train_mode)
    blk.recompute = "selective" if selective else "none"
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(blk)([torch.randn(6, 10, 64), torch.randn(12, 5, 64)])
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_compiled_block_with_recompute_matches_eager(mode):
    # the GPU default (torch.compile + selective recompute) and the full fallback, compiled by inductor for the
    # CPU: the same forward and gradients as the eager block, with the same drop-path subsets
    torch.manual_seed(0)
    eager = M.Block(64, 4, "swiglu", 4.0, 0.5, drop_path_rate=0.4).train()
    compiled = M.Block(64, 4, "swiglu", 4.0, 0.5, drop_path_rate=0.4).train()
    compiled.load_state_dict(eager.state_dict())
    compiled.recompute = mode
    compiled.compile()
    torch._dynamo.reset()
    x = [torch.randn(10, 9, 64), torch.randn(20, 5, 64)]
    w = [torch.randn(10, 9, 64), torch.randn(20, 5, 64)]
    grads = []
    for blk in (eager, compiled):
        torch.manual_seed(5)
        xs = [t.clone().requires_grad_() for t in x]
        out = blk(xs)
        sum((o * wi).sum() for o, wi in zip(out, w)).backward()
        grads.append([o.detach() for o in out] + [t.grad for t in xs] + [p.grad for p in blk.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)

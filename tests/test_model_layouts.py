"""model.py's loader for the public pathology ViTs: timm's VisionTransformer (UNI, UNI-2-h, Virchow2, H-optimus-0,
Prov-GigaPath) and Hugging Face's Dinov2Model / Dinov2WithRegistersModel (Phikon-v2, Midnight, Hibou-style), each
checked against the source library's forward written out here on the source's own tensor names; shape inference at
the public sizes; folders, config.json and safetensors; exports; training from such a checkpoint; errors."""
import json
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

import model as M
import weights as W
import train
from conftest import tiny_train_args

# The published configurations (timm kwargs / HF config.json, at 224 px). FFN hidden = the gated width of a SwiGLU:
# timm's SwiGLUPacked fc1 has twice as many rows (Virchow2: int(1280 * 5.3375) = 6832 -> 3416; UNI-2-h, H-optimus-0,
# Prov-GigaPath: int(1536 * 5.33334) = 8192 -> 4096, which is DINOv2's swiglu_hidden(1536)).
# name: (layout, width, depth, heads, patch, registers, ffn, FFN hidden, LayerScale, timm no_embed_class)
PUBLIC = {
    "UNI": ("timm", 1024, 24, 16, 16, 0, "mlp", 4096, True, False),
    "UNI-2-h": ("timm", 1536, 24, 24, 14, 8, "swiglu", 4096, True, True),
    "Virchow2": ("timm", 1280, 32, 16, 14, 4, "swiglu", 3416, True, False),
    "H-optimus-0": ("timm", 1536, 40, 24, 14, 4, "swiglu", 4096, True, True),
    "Prov-GigaPath": ("timm", 1536, 40, 24, 16, 0, "swiglu", 4096, True, False),
    "Phikon-v2": ("hf", 1024, 24, 16, 16, 0, "mlp", 4096, True, None),
    "Midnight": ("hf", 1536, 40, 24, 14, 0, "swiglu", 4096, True, None),
    "Dinov2WithRegisters ViT-B (Hibou-B's size)": ("hf", 768, 12, 12, 14, 4, "mlp", 3072, True, None),
}
# The same structure at width 64 (4 heads of 16), 2 blocks and a 4x4 grid: what the numerical tests load.
SMALL = {
    "UNI": dict(layout="timm", patch=16, regs=0, ffn="mlp", hidden=256),
    "UNI-2-h": dict(layout="timm", patch=14, regs=8, ffn="swiglu", hidden=176, no_embed_class=True),
    "Virchow2": dict(layout="timm", patch=14, regs=4, ffn="swiglu", hidden=170),  # registers with positions
    "H-optimus-0": dict(layout="timm", patch=14, regs=4, ffn="swiglu", hidden=176, no_embed_class=True),
    "Prov-GigaPath": dict(layout="timm", patch=16, regs=0, ffn="swiglu", hidden=176),
    "timm without LayerScale or qkv bias": dict(layout="timm", patch=14, regs=0, ffn="mlp", hidden=256,
                                                layerscale=False, qkv_bias=False),
    "Phikon-v2": dict(layout="hf", patch=16, regs=0, ffn="mlp", hidden=256),
    "Midnight": dict(layout="hf", patch=14, regs=0, ffn="swiglu", hidden=176),
    "Dinov2WithRegisters (Hibou-style)": dict(layout="hf", patch=14, regs=4, ffn="mlp", hidden=256),
}
D, DEPTH, HEADS, GRID = 64, 2, 4, 4


def rand(*shape):
    return 0.3 * torch.randn(*shape)


def meta(*shape):
    return torch.empty(*shape, device="meta")


def timm_state(D=D, depth=DEPTH, patch=14, grid=GRID, regs=0, ffn="mlp", hidden=256, layerscale=True,
               no_embed_class=False, qkv_bias=True, new=rand):
    """timm's VisionTransformer names and shapes (num_classes=0, class token, optional reg_token)."""
    fc1 = 2 * hidden if ffn == "swiglu" else hidden  # SwiGLUPacked: fc1 -> [gate; value]
    sd = {"cls_token": new(1, 1, D), "patch_embed.proj.weight": new(D, 3, patch, patch),
          "patch_embed.proj.bias": new(D), "pos_embed": new(1, grid * grid + (0 if no_embed_class else 1 + regs), D),
          "norm.weight": new(D), "norm.bias": new(D)}
    if regs:
        sd["reg_token"] = new(1, regs, D)
    for i in range(depth):
        b = f"blocks.{i}."
        sd.update({b + "norm1.weight": new(D), b + "norm1.bias": new(D), b + "attn.qkv.weight": new(3 * D, D),
                   b + "attn.proj.weight": new(D, D), b + "attn.proj.bias": new(D), b + "norm2.weight": new(D),
                   b + "norm2.bias": new(D), b + "mlp.fc1.weight": new(fc1, D), b + "mlp.fc1.bias": new(fc1),
                   b + "mlp.fc2.weight": new(D, hidden), b + "mlp.fc2.bias": new(D)})
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = new(3 * D)
        if layerscale:
            sd[b + "ls1.gamma"], sd[b + "ls2.gamma"] = new(D), new(D)
    return sd


def hf_state(D=D, depth=DEPTH, patch=14, grid=GRID, regs=0, ffn="mlp", hidden=256, new=rand):
    """Hugging Face's Dinov2Model / Dinov2WithRegistersModel names and shapes, as save_pretrained writes them."""
    e = "embeddings."
    sd = {e + "cls_token": new(1, 1, D), e + "mask_token": new(1, D),
          e + "position_embeddings": new(1, 1 + grid ** 2, D),
          e + "patch_embeddings.projection.weight": new(D, 3, patch, patch),
          e + "patch_embeddings.projection.bias": new(D), "layernorm.weight": new(D), "layernorm.bias": new(D)}
    if regs:
        sd[e + "register_tokens"] = new(1, regs, D)
    mlp = {"mlp.fc1.weight": (hidden, D), "mlp.fc1.bias": (hidden,), "mlp.fc2.weight": (D, hidden),
           "mlp.fc2.bias": (D,)} if ffn == "mlp" else \
        {"mlp.weights_in.weight": (2 * hidden, D), "mlp.weights_in.bias": (2 * hidden,),
         "mlp.weights_out.weight": (D, hidden), "mlp.weights_out.bias": (D,)}
    for i in range(depth):
        b = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            sd[f"{b}attention.attention.{n}.weight"], sd[f"{b}attention.attention.{n}.bias"] = new(D, D), new(D)
        sd.update({b + "attention.output.dense.weight": new(D, D), b + "attention.output.dense.bias": new(D),
                   **{b + k: new(D) for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
                                              "layer_scale1.lambda1", "layer_scale2.lambda1")},
                   **{b + k: new(*s) for k, s in mlp.items()}})
    return sd


def state(name, new=rand):
    s = dict(SMALL[name])
    layout = s.pop("layout")
    return timm_state(new=new, **s) if layout == "timm" else \
        hf_state(new=new, **{k: v for k, v in s.items() if k in ("patch", "regs", "ffn", "hidden")})


def reference_forward(sd, layout, x, heads, patch, regs=0, ffn="mlp", no_embed_class=False, **_):
    """The source library's forward on its own names (timm's VisionTransformer.forward_features, transformers'
    Dinov2(WithRegisters)Model.last_hidden_state): returns the normed CLS token and patch tokens."""
    hf = layout == "hf"
    get = (lambda k: sd["embeddings." + k]) if hf else (lambda k: sd[k])
    B, Dm = x.shape[0], get("cls_token").shape[-1]
    proj = "patch_embeddings.projection" if hf else "patch_embed.proj"
    t = F.conv2d(x, get(proj + ".weight"), get(proj + ".bias"), stride=patch).flatten(2).transpose(1, 2)
    cls = get("cls_token").expand(B, -1, -1)
    reg = [get("register_tokens" if hf else "reg_token").expand(B, -1, -1)] if regs else []
    if hf:  # positions for the CLS and the patches, then the registers go in after the CLS
        t = torch.cat([cls, t], 1) + get("position_embeddings")
        t = torch.cat([t[:, :1], *reg, t[:, 1:]], 1)
    elif no_embed_class:  # positions for the patches only
        t = torch.cat([cls, *reg, t + get("pos_embed")], 1)
    else:  # positions for the CLS, the registers and the patches
        t = torch.cat([cls, *reg, t], 1) + get("pos_embed")
    N, hd = t.shape[1], Dm // heads
    depth = len({k.split(".")[2 if hf else 1] for k in sd if k.startswith("encoder.layer." if hf else "blocks.")})
    for i in range(depth):
        b = f"encoder.layer.{i}." if hf else f"blocks.{i}."
        w = lambda k: sd.get(b + k)  # noqa: E731
        h = F.layer_norm(t, (Dm,), w("norm1.weight"), w("norm1.bias"), eps=1e-6)
        if hf:
            q, k, v = (F.linear(h, w(f"attention.attention.{n}.weight"), w(f"attention.attention.{n}.bias"))
                       for n in ("query", "key", "value"))
            proj, ls1, ls2 = "attention.output.dense", w("layer_scale1.lambda1"), w("layer_scale2.lambda1")
        else:
            q, k, v = F.linear(h, w("attn.qkv.weight"), w("attn.qkv.bias")).chunk(3, dim=-1)
            proj, ls1, ls2 = "attn.proj", sd.get(b + "ls1.gamma", 1.0), sd.get(b + "ls2.gamma", 1.0)
        q, k, v = (z.reshape(B, N, heads, hd).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
        t = t + ls1 * F.linear(a.transpose(1, 2).reshape(B, N, Dm), w(proj + ".weight"), w(proj + ".bias"))
        h = F.layer_norm(t, (Dm,), w("norm2.weight"), w("norm2.bias"), eps=1e-6)
        if ffn == "mlp":  # exact (erf) GELU, as nn.GELU and transformers' "gelu"
            h = F.linear(F.gelu(F.linear(h, w("mlp.fc1.weight"), w("mlp.fc1.bias"))), w("mlp.fc2.weight"),
                         w("mlp.fc2.bias"))
        else:  # SwiGLU: the first half of the packed projection is gated (timm SwiGLUPacked, HF weights_in)
            i_, o_ = ("mlp.weights_in", "mlp.weights_out") if hf else ("mlp.fc1", "mlp.fc2")
            gate, value = F.linear(h, w(i_ + ".weight"), w(i_ + ".bias")).chunk(2, dim=-1)
            h = F.linear(F.silu(gate) * value, w(o_ + ".weight"), w(o_ + ".bias"))
        t = t + ls2 * h
    t = F.layer_norm(t, (Dm,), sd["layernorm.weight" if hf else "norm.weight"],
                     sd["layernorm.bias" if hf else "norm.bias"], eps=1e-6)
    return t[:, 0], t[:, 1 + regs:]


def image(name, batch=2):
    return torch.randn(batch, 3, GRID * SMALL[name]["patch"], GRID * SMALL[name]["patch"])


def tokens(m, x):
    with torch.no_grad():
        out = m.eval().forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


# -- the public configurations ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", PUBLIC)
def test_public_configuration_is_inferred_and_builds_the_hub_layout_exactly(name):
    layout, width, depth, heads, patch, regs, ffn, hidden, layerscale, no_embed_class = PUBLIC[name]
    grid = 224 // patch
    if layout == "timm":
        sd = timm_state(width, depth, patch, grid, regs, ffn, hidden, layerscale, no_embed_class, new=meta)
    else:
        sd = hf_state(width, depth, patch, grid, regs, ffn, hidden, new=meta)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no config.json: the heads are assumed from the width
        hub, cfg = W.read_checkpoint(sd)
    assert (cfg["embed_dim"], cfg["depth"], cfg["num_heads"], cfg["patch_size"], cfg["img_size"]) == \
        (width, depth, heads, patch, 224)  # the width-based guess of the heads is right for every public model
    assert (cfg["num_register_tokens"], cfg["ffn"], cfg["ffn_hidden"]) == (regs, ffn, hidden)
    with torch.device("meta"):
        m = M.ViT(**cfg)
    # the converted checkpoint has exactly the names and shapes of the model: a strict load both ways
    assert {k: tuple(v.shape) for k, v in hub.items()} == {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert hub["pos_embed"].shape[1] == 1 + grid * grid and hub["mask_token"].shape == (1, width)


# -- each layout is the source's function -------------------------------------------------------------------------

@pytest.mark.parametrize("name", SMALL)
def test_layout_loads_strict_and_is_the_sources_forward(name):
    sd = state(name)
    x = image(name)
    m = W.load_backbone(sd, num_heads=HEADS)
    assert m.num_register_tokens == SMALL[name]["regs"] and m.ffn == SMALL[name]["ffn"]
    ref_cls, ref_patch = reference_forward(sd, heads=HEADS, x=x, **SMALL[name])
    cls, patch = tokens(m, x)
    torch.testing.assert_close(cls, ref_cls, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patch, ref_patch, atol=1e-5, rtol=1e-5)
    # a wrong head count is a different function: the comparison can fail
    assert not torch.allclose(tokens(W.load_backbone(sd, num_heads=2), x)[0], ref_cls, atol=1e-3)


def test_transformers_in_memory_names_load_as_the_saved_ones():
    # transformers >= 5 names the modules q/k/v/o_proj and splits the SwiGLU into gate/up/down_proj; a state dict
    # taken from such a model in memory is the same model as the file save_pretrained writes
    saved = state("Midnight")
    renamed = {}
    for k, v in saved.items():
        k = k.replace("attention.attention.query", "attention.q_proj").replace("attention.attention.key",
                                                                                "attention.k_proj")
        k = k.replace("attention.attention.value", "attention.v_proj").replace("attention.output.dense",
                                                                                "attention.o_proj")
        if "mlp.weights_in" in k:
            renamed[k.replace("weights_in", "gate_proj")], renamed[k.replace("weights_in", "up_proj")] = v.chunk(2)
            continue
        renamed[k.replace("mlp.weights_out", "mlp.down_proj")] = v
    x = image("Midnight")
    a, b = W.load_backbone(saved, num_heads=HEADS), W.load_backbone(renamed, num_heads=HEADS)
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    torch.testing.assert_close(tokens(b, x)[0], reference_forward(saved, heads=HEADS, x=x, **SMALL["Midnight"])[0],
                               atol=1e-5, rtol=1e-5)


def test_timms_split_swiglu_loads_as_its_packed_one():
    # timm's SwiGLU (fc1_g gated, fc1_x, fc2) is the same FFN as SwiGLUPacked's fc1 = [gate; value]
    packed = state("H-optimus-0")
    split = {}
    for k, v in packed.items():
        if ".mlp.fc1." in k:
            split[k.replace("fc1", "fc1_g")], split[k.replace("fc1", "fc1_x")] = v.chunk(2)
        else:
            split[k] = v
    a, b = W.load_backbone(packed, num_heads=HEADS), W.load_backbone(split, num_heads=HEADS)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


def test_export_is_the_dinov2_hub_layout_and_loads_back_to_the_same_model(tmp_path):
    # Virchow2's layout: packed SwiGLU and registers with positions, which the hub layout holds in other tensors
    m = W.load_backbone(state("Virchow2"), num_heads=HEADS)
    torch.save(m.state_dict(), tmp_path / "teacher_backbone.pth")
    export = torch.load(tmp_path / "teacher_backbone.pth", weights_only=True)
    assert not any(k.startswith(("reg_token", "embeddings.")) or ".fc1." in k for k in export)
    fresh = M.ViT(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=14, img_size=56, num_register_tokens=4,
                  ffn="swiglu", ffn_hidden=170)
    fresh.load_state_dict(export, strict=True)  # exactly the hub names and shapes
    back = W.load_backbone(str(tmp_path / "teacher_backbone.pth"), num_heads=HEADS)
    x = image("Virchow2")
    assert all(torch.equal(a, b) for a, b in zip(tokens(back, x), tokens(m, x)))


# -- the model folder timm loads (export.py) ---------------------------------------------------------------------
# What timm reads, from its source (timm 1.0.16-1.0.31): config.json's top-level fields (_hub.py
# load_model_config_from_path / _parse_model_cfg), PretrainedCfg's fields (_pretrained.py; an unknown one is a
# TypeError), VisionTransformer's keyword arguments that model_args may set (vision_transformer.py), and its DINOv2
# architectures: (width, depth, heads, FFN, registers); *_reg4_* ones also set no_embed_class.
TIMM_CONFIG_KEYS = {"architecture", "num_classes", "label_names", "label_descriptions", "model_args", "pretrained_cfg"}
TIMM_PRETRAINED_CFG = {"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "architecture", "tag",
                       "custom_load", "input_size", "test_input_size", "min_input_size", "fixed_input_size",
                       "interpolation", "crop_pct", "test_crop_pct", "crop_mode", "mean", "std", "num_classes",
                       "label_offset", "label_names", "label_descriptions", "pool_size", "test_pool_size",
                       "first_conv", "classifier", "license", "description", "origin_url", "paper_name", "paper_ids",
                       "notes"}
TIMM_VIT_ARGS = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
                 "mlp_ratio", "qkv_bias", "qk_norm", "init_values", "class_token", "pos_embed", "no_embed_class",
                 "reg_tokens", "pre_norm", "final_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad"}
TIMM_DINOV2 = {f"vit_{size}_patch14{reg}_dinov2": (D, depth, heads, ffn, 4 if reg else 0)
               for size, D, depth, heads, ffn in (("small", 384, 12, 6, "mlp"), ("base", 768, 12, 12, "mlp"),
                                                  ("large", 1024, 24, 16, "mlp"), ("giant", 1536, 40, 24, "swiglu"))
               for reg in ("", "_reg4")}


def timm_convert_dinov2(sd):
    """timm's _convert_dinov2, which its checkpoint_filter_fn applies when mask_token is present: mask_token
    dropped; with registers, reg_token = register_tokens and the CLS row of pos_embed added to cls_token and cut
    from pos_embed; mlp.w12 / mlp.w3 renamed fc1 / fc2."""
    sd, out = dict(sd), {}
    sd.pop("mask_token")
    if "register_tokens" in sd:
        out["reg_token"] = sd.pop("register_tokens")
        out["cls_token"] = sd.pop("cls_token") + sd["pos_embed"][:, 0]
        out["pos_embed"] = sd.pop("pos_embed")[:, 1:]
    for k, v in sd.items():
        out[k.replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")] = v
    return out


@pytest.mark.parametrize("ffn,regs,patch", [("mlp", 4, 14), ("swiglu", 4, 14), ("mlp", 0, 14), ("swiglu", 0, 16)])
def test_model_folder_is_what_timm_reads_and_converts_to_the_same_model(tmp_path, ffn, regs, patch):
    import export
    torch.manual_seed(0)
    m = M.ViT(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=patch, img_size=GRID * patch,
              num_register_tokens=regs, ffn=ffn, layerscale_init=0.5)
    sd = m.state_dict()
    export.write_model_folder(str(tmp_path), sd, W.infer_config(sd, HEADS), "half")
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(config) <= TIMM_CONFIG_KEYS and set(config["pretrained_cfg"]) <= TIMM_PRETRAINED_CFG
    assert set(config["model_args"]) <= TIMM_VIT_ARGS and config["num_classes"] == 0
    width, _, _, arch_ffn, arch_regs = TIMM_DINOV2[config["architecture"]]
    assert arch_ffn == ffn and bool(arch_regs) == bool(regs)  # the matching family: its FFN, registers or not
    args = config["model_args"]
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["patch_size"], args.get("reg_tokens", 0)) == \
        (D, DEPTH, HEADS, patch, regs) and args["img_size"] == GRID * patch  # built at the weights' own grid
    fc1 = int(D * args["mlp_ratio"])  # timm's FFN width; SwiGLUPacked's fc1 holds [gate; value]
    assert fc1 == sd["blocks.0.mlp." + ("w12" if ffn == "swiglu" else "fc1") + ".weight"].shape[0]
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, GRID * patch, GRID * patch] and pre["fixed_input_size"] and pre["num_classes"] == 0
    assert (pre["mean"], pre["std"]) == ([0.5] * 3, [0.5] * 3)  # the run's normalisation ("half": Midnight's)
    # the weights as timm's converter turns them: its model's names and shapes, and its forward gives our tokens
    converted = timm_convert_dinov2(torch.load(tmp_path / "pytorch_model.bin", weights_only=True))
    hidden = fc1 // 2 if ffn == "swiglu" else fc1
    expected = timm_state(D, DEPTH, patch, GRID, regs, ffn, hidden, no_embed_class=bool(regs), new=meta)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in expected.items()}
    x = torch.randn(2, 3, GRID * patch, GRID * patch)
    ref = reference_forward(converted, "timm", x, HEADS, patch, regs, ffn, no_embed_class=bool(regs))
    for a, b in zip(tokens(m, x), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    back = W.load_backbone(str(tmp_path))  # nanopath reads the folder too, heads from model_args
    assert back.num_heads == HEADS and all(torch.equal(a, b) for a, b in zip(tokens(back, x), tokens(m, x)))
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n") and "## Intended use" in card and "## Load it" in card


# -- files, folders, config.json ----------------------------------------------------------------------------------

def test_snapshot_folders_take_the_heads_from_config_json(tmp_path):
    # Hugging Face: num_attention_heads; timm: model_args.num_heads, else the architecture's name at its own width
    hf = tmp_path / "phikon"
    hf.mkdir()
    sd = state("Phikon-v2")
    torch.save(sd, hf / "pytorch_model.bin")
    (hf / "config.json").write_text(json.dumps({"model_type": "dinov2", "num_attention_heads": HEADS,
                                                "hidden_act": "gelu", "layer_norm_eps": 1e-6}))
    x = image("Phikon-v2")
    m = W.load_backbone(str(hf))
    assert m.num_heads == HEADS and not m.interpolate_antialias  # transformers' Dinov2Model resizes without it
    torch.testing.assert_close(tokens(m, x)[0], reference_forward(sd, heads=HEADS, x=x, **SMALL["Phikon-v2"])[0],
                               atol=1e-5, rtol=1e-5)
    timm_dir = tmp_path / "uni"
    timm_dir.mkdir()
    torch.save(state("UNI"), timm_dir / "pytorch_model.bin")
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_large_patch16_224",
                                                      "model_args": {"num_heads": 8}}))
    assert W.load_backbone(str(timm_dir / "pytorch_model.bin")).num_heads == 8  # the file's folder is read too
    (timm_dir / "config.json").write_text(json.dumps({"architecture": "vit_huge_patch14_224"}))
    torch.save(timm_state(D=1280, depth=1, grid=2, hidden=64), timm_dir / "pytorch_model.bin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the name gives the heads: nothing is assumed
        assert W.load_backbone(str(timm_dir)).num_heads == 16


def test_without_config_json_the_heads_are_assumed_with_a_warning():
    with pytest.warns(UserWarning, match="assuming 1 heads of 64 for width 64.*pass num_heads="):
        _, cfg = W.read_checkpoint(state("UNI"))
    assert cfg["num_heads"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # DINOv2's own sizes need no guess
        with torch.device("meta"):
            hub = M.ViT("vit_small", num_register_tokens=4).state_dict()
        assert W.read_checkpoint(hub)[1]["num_heads"] == 6


def test_safetensors_file_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = state("Dinov2WithRegisters (Hibou-style)")
    safetensors.save_file(sd, str(tmp_path / "model.safetensors"))
    x = image("Dinov2WithRegisters (Hibou-style)")
    m = W.load_backbone(str(tmp_path / "model.safetensors"), num_heads=HEADS)
    ref = reference_forward(sd, heads=HEADS, x=x, **SMALL["Dinov2WithRegisters (Hibou-style)"])
    torch.testing.assert_close(tokens(m, x)[1], ref[1], atol=1e-5, rtol=1e-5)


def test_missing_safetensors_package_is_named(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now fails
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        W.load_backbone(str(tmp_path))


# -- errors -------------------------------------------------------------------------------------------------------

def test_a_checkpoint_that_is_not_a_vit_says_what_it_holds(tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "fc.weight": torch.zeros(9, 64)}
    torch.save(resnet, tmp_path / "resnet.pth")
    with pytest.raises(ValueError, match=r"no ViT backbone.*3 tensors: conv1\.weight \(64, 3, 7, 7\)"):
        W.load_backbone(str(tmp_path / "resnet.pth"))
    sd = state("UNI")
    sd["norm_pre.weight"] = torch.ones(D)  # a CLIP-style ViT
    with pytest.raises(ValueError, match=r"pre_norm.*cannot be loaded"):
        W.load_backbone(sd, num_heads=HEADS)
    sd = state("UNI")
    sd["fc_norm.weight"], sd["fc_norm.bias"] = sd.pop("norm.weight"), sd.pop("norm.bias")  # global_pool="avg"
    with pytest.raises(ValueError, match="global_pool avg"):
        W.load_backbone(sd, num_heads=HEADS)
    sd = {k.replace("mlp.fc1", "mlp.lin_in"): v for k, v in state("UNI").items()}  # an unknown FFN naming
    with pytest.raises(ValueError, match=r"cannot tell the FFN.*blocks\.0\.mlp\.lin_in\.bias"):
        W.load_backbone(sd, num_heads=HEADS)
    (tmp_path / "two").mkdir()
    for f in ("a.pth", "b.pth"):
        torch.save(state("UNI"), tmp_path / "two" / f)
    with pytest.raises(ValueError, match="2 weights files"):
        W.load_backbone(str(tmp_path / "two"))


def test_a_classification_head_is_dropped_with_a_warning():
    sd = state("UNI")
    sd["head.weight"], sd["head.bias"] = torch.zeros(1000, D), torch.zeros(1000)
    with pytest.warns(UserWarning, match=r"classification head \(head\.weight \(1000, 64\)"):
        m = W.load_backbone(sd, num_heads=HEADS)
    x = image("UNI")
    torch.testing.assert_close(tokens(m, x)[0], reference_forward(sd, heads=HEADS, x=x, **SMALL["UNI"])[0],
                               atol=1e-5, rtol=1e-5)


# -- training from a public model's layout ------------------------------------------------------------------------

def snapshot(folder, sd, config):
    os.makedirs(folder)
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return str(folder)


@pytest.mark.parametrize("name,extra", [("UNI-2-h", []), ("Phikon-v2", ["--patch-size", 16, "--global-size", 64,
                                                                        "--local-size", 32])])
def test_training_continues_from_a_timm_or_hf_checkpoint_and_exports_the_hub_layout(small_store, tmp_path, name,
                                                                                    extra):
    # the vits preset says ViT-S, MLP, 4 registers, patch 14: the checkpoint's architecture wins where the flags
    # were left at the preset's defaults (UNI-2-h: 8 registers, SwiGLU), and flags given explicitly must agree
    sd = state(name)
    config = {"model_args": {"num_heads": HEADS}} if SMALL[name]["layout"] == "timm" else \
        {"model_type": "dinov2", "num_attention_heads": HEADS}
    init = snapshot(tmp_path / "init", sd, config)
    out = tmp_path / "run"
    argv = tiny_train_args(small_store, out, "--init", init, "--steps", 2, *extra)
    student, teacher = train.build_models(train.parse_args(argv))  # crops of 4x4 patches: the stored grid
    x = image(name)
    ref_cls, _ = reference_forward(sd, heads=HEADS, x=x, **SMALL[name])
    for m in (student.backbone, teacher.backbone):  # both start as the checkpoint's function
        torch.testing.assert_close(tokens(m, x)[0], ref_cls, atol=1e-5, rtol=1e-5)
    train.main(argv)
    args = json.loads((out / "args.json").read_text())  # the run records the architecture it trained
    assert (args["arch"], args["registers"], args["ffn"], args["patch_size"]) == \
        (f"vit_{D}x{DEPTH}h{HEADS}", SMALL[name]["regs"], SMALL[name]["ffn"], SMALL[name]["patch"])
    export = torch.load(out / "teacher_backbone.pth", weights_only=True)
    m = M.ViT(embed_dim=D, depth=DEPTH, num_heads=HEADS, patch_size=SMALL[name]["patch"], img_size=x.shape[-1],
              num_register_tokens=SMALL[name]["regs"], ffn=SMALL[name]["ffn"], ffn_hidden=SMALL[name]["hidden"])
    m.load_state_dict(export, strict=True)  # the teacher export is in the DINOv2 hub layout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(v, ckpt["teacher"]["backbone." + k]) for k, v in export.items())
    assert not torch.equal(export["blocks.0.attn.qkv.weight"], W.read_checkpoint(init)[0]["blocks.0.attn.qkv.weight"])


def test_model_flags_that_contradict_the_init_checkpoint_fail(tmp_path):
    init = snapshot(tmp_path / "init", state("UNI-2-h"), {"model_args": {"num_heads": HEADS}})
    args = train.parse_args(tiny_train_args("x", tmp_path / "run", "--init", init, "--registers", 0))
    with pytest.raises(SystemExit, match="--registers 0 contradicts --init.*8 registers"):
        train.build_models(args)
    args = train.parse_args(tiny_train_args("x", tmp_path / "run", "--init", init, "--arch", "vit_large"))
    with pytest.raises(SystemExit, match="--arch vit_large contradicts"):
        train.build_models(args)

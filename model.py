"""
The backbone and heads of the recipe: a DINOv2-compatible Vision Transformer (DINOv2's ViT-S/B/L/giant2 or any
width, depth, heads and patch size; optional register tokens, MLP or SwiGLU FFN, LayerScale, stochastic depth) on
torch's scaled_dot_product_attention, the DINO/iBOT projection head, and one loader for every checkpoint layout a
user has: DINOv2's hub files, OpenMidnight's and our checkpoints, timm's VisionTransformer (UNI, UNI-2, Virchow2,
H-optimus-0, Prov-GigaPath) and Hugging Face's Dinov2Model / Dinov2WithRegistersModel (Phikon-v2, Midnight, Hibou).

Parameter names and shapes are exactly those of Meta's DINOv2 hub checkpoints (no block chunking), so
`dinov2_vitg14_reg4_pretrain.pth` loads with strict=True and our teacher exports load into DINOv2's own code;
other layouts are converted into these names at load time, into the same function.
References: DINOv2 (Oquab et al. 2023, facebookresearch/dinov2), registers (Darcet et al. 2023).
"""
import argparse
import json
import math
import os
import re
import warnings
import zipfile
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

# DINOv2's sizes; head_dim is 64 in all of them
ARCHS = {
    "vit_small": dict(embed_dim=384, depth=12, num_heads=6),
    "vit_base": dict(embed_dim=768, depth=12, num_heads=12),
    "vit_large": dict(embed_dim=1024, depth=24, num_heads=16),
    "vit_giant2": dict(embed_dim=1536, depth=40, num_heads=24),
}
# No tensor holds the number of heads: without a config.json it is width // 64, except for the public widths
# where it is not (ViT-H/14: Virchow, Virchow2 are 1280 wide with 16 heads of 80)
HEADS_BY_WIDTH = {1280: 16}


def arch_name(embed_dim, depth, num_heads):
    """DINOv2's name for these sizes, else a descriptive one (vit_1280x32h16: width x depth, heads)."""
    sizes = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
    return next((a for a, c in ARCHS.items() if c == sizes), f"vit_{embed_dim}x{depth}h{num_heads}")


def autocast(device, dtype="bfloat16"):
    """Mixed precision for a forward pass: bf16 autocast, or nothing for float32. Training defaults to bf16 on a
    GPU and float32 on a CPU (train.py --dtype); feature extraction uses bf16 on a GPU only."""
    if str(dtype) in ("bfloat16", "torch.bfloat16"):
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return nullcontext()


# -----------------------------------------------------------------------------
# leaf modules


class Attention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)  # rows ordered [q; k; v], heads contiguous
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B, heads, N, head_dim)
        x = F.scaled_dot_product_attention(q, k, v)  # scale head_dim**-0.5; flash/cuDNN/mem-efficient on GPU
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as nn.GELU()


class SwiGLU(nn.Module):
    """DINOv2's fused SwiGLU: one packed w12 = [w1 (gate); w2], out = w3(silu(x1) * x2)."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


def swiglu_hidden(dim, mlp_ratio=4.0):
    # DINOv2's SwiGLUFFNFused sizing: 2/3 of the MLP width rounded up to a multiple of 8 (4096 for giant2)
    return (int(dim * mlp_ratio * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
    def __init__(self, dim, init_value):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x):
        return x * self.gamma


def add_residual_on_subset(x, branch, p):
    """DINOv2's batch-subset stochastic depth: the branch runs on a random subset of max(int(b(1-p)), 1) samples
    only and is added to them scaled by b / subset, so its compute shrinks by the drop rate (p 0.4: 57 of 96)."""
    b = x.shape[0]
    subset = max(int(b * (1 - p)), 1)
    keep = torch.randperm(b, device=x.device)[:subset]
    residual = branch(x[keep])
    out = torch.index_add(x.flatten(1), 0, keep, residual.flatten(1).to(x.dtype), alpha=b / subset)
    return out.view_as(x)


# Selective recompute: keep the outputs of the matmuls, of attention and of randperm (the drop-path subset) for
# the backward pass, and recompute everything between them (layer norms, bf16 casts of inputs and weights,
# SwiGLU's gate, LayerScale). Measured on ViT-g under torch.compile: 40 instead of 54 KB kept per token and
# block, and no bf16 weight copies (2.3 GB) kept, for elementwise work only.
_KEEP = {getattr(torch.ops.aten, name).default for name in (
    "mm", "addmm", "bmm", "randperm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_efficient_attention_forward", "_flash_attention_forward") if hasattr(torch.ops.aten, name)}


def _keep_matmuls(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _KEEP else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_keep_matmuls)


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

    def __init__(self, dim, num_heads, ffn, mlp_ratio, layerscale_init, drop_path_rate, ffn_hidden=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.ls1 = LayerScale(dim, layerscale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        # ffn_hidden (a checkpoint's exact width: Virchow2's SwiGLU is 3416 wide) wins over the ratio's width
        hidden = ffn_hidden or (swiglu_hidden(dim, mlp_ratio) if ffn == "swiglu" else int(dim * mlp_ratio))
        self.mlp = SwiGLU(dim, hidden) if ffn == "swiglu" else Mlp(dim, hidden)
        self.ls2 = LayerScale(dim, layerscale_init)
        self.drop_path_rate = drop_path_rate
        self.recompute = "none"  # set through ViT.recompute

    def attn_branch(self, x):
        return self.ls1(self.attn(self.norm1(x)))

    def ffn_branch(self, x):
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x):
        """x: tokens (B, N, D), or a list of them for crops of several sizes. One call for all sizes, so that a
        compiled block casts its weights to bf16 once (not once per size: 2.3 GB on ViT-g) and one recompute
        region sees autocast's weight cache the same way in the forward and the backward pass. The RNG state is
        replayed in a recompute, so drop-path subsets match."""
        if self.recompute != "none" and self.training and torch.is_grad_enabled():
            policy = {"context_fn": _selective_contexts} if self.recompute == "selective" else {}  # full: none
            return checkpoint(self.forward_tokens, x, use_reentrant=False, **policy)
        return self.forward_tokens(x)

    def forward_tokens(self, x):
        if isinstance(x, (list, tuple)):
            return [self.forward_tokens(t) for t in x]
        if self.training and self.drop_path_rate > 0:  # as DINOv2's training (list) forward: subsets at any p > 0
            x = add_residual_on_subset(x, self.attn_branch, self.drop_path_rate)
            return add_residual_on_subset(x, self.ffn_branch, self.drop_path_rate)
        x = x + self.attn_branch(x)
        return x + self.ffn_branch(x)


def resize_pos_embed(pos_embed, grid_hw, antialias=True, offset=0.0):
    """Resize the patch part of a (1, 1 + G*G, D) pos-embed to grid_hw = (h, w), as DINOv2 does: in float32,
    bicubic, with antialias (hub reg4 models: True, offset 0; DINOv2's training default: False, offset 0.1)."""
    dtype = pos_embed.dtype
    pos_embed = pos_embed.float()
    cls_pos, patch_pos = pos_embed[:, :1], pos_embed[:, 1:]
    G, D = int(math.sqrt(patch_pos.shape[1])), patch_pos.shape[2]
    assert G * G == patch_pos.shape[1], f"pos_embed of {patch_pos.shape[1]} patches is not a square grid"
    size = dict(size=tuple(grid_hw)) if offset == 0 else dict(scale_factor=tuple((g + offset) / G for g in grid_hw))
    patch_pos = F.interpolate(patch_pos.reshape(1, G, G, D).permute(0, 3, 1, 2), mode="bicubic",
                              antialias=antialias, align_corners=False, **size)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, D)
    return torch.cat([cls_pos, patch_pos], dim=1).to(dtype)


# -----------------------------------------------------------------------------
# the backbone


class ViT(nn.Module):
    """A preset's sizes (arch), or any: embed_dim, depth and num_heads given explicitly win over the preset's."""

    def __init__(self, arch="vit_small", img_size=224, patch_size=14, num_register_tokens=4, ffn="mlp",
                 mlp_ratio=4.0, layerscale_init=1e-5, drop_path_rate=0.0,
                 interpolate_antialias=True, interpolate_offset=0.0, recompute="none",
                 embed_dim=None, depth=None, num_heads=None, ffn_hidden=None):
        super().__init__()
        given = dict(embed_dim=embed_dim, depth=depth, num_heads=num_heads)
        sizes = {**ARCHS.get(arch, {}), **{k: v for k, v in given.items() if v is not None}}
        if len(sizes) < 3:
            raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)} or give embed_dim, depth and "
                             "num_heads")
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"ffn must be 'mlp' or 'swiglu', got {ffn!r}")
        D, depth, heads = sizes["embed_dim"], sizes["depth"], sizes["num_heads"]
        if D % heads:
            raise ValueError(f"embedding width {D} is not a multiple of num_heads={heads}")
        self.arch, self.embed_dim, self.num_heads = arch_name(D, depth, heads), D, heads
        self.patch_size, self.ffn = patch_size, ffn
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias, self.interpolate_offset = interpolate_antialias, interpolate_offset
        grid = img_size // patch_size  # the stored pos-embed grid: 518 -> 37 (hub files), 224 -> 16 (training)

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, D, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, D))  # cls + patches; registers get none
        self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, D)) if num_register_tokens else None
        self.mask_token = nn.Parameter(torch.zeros(1, D))
        # uniform rate over blocks (the recipe's drop_path_uniform), not DINOv2's default linear ramp
        self.blocks = nn.ModuleList(Block(D, heads, ffn, mlp_ratio, layerscale_init, drop_path_rate, ffn_hidden)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.init_weights()
        self.recompute = recompute

    @property
    def recompute(self):
        """Activation memory for compute: 'none' keeps everything, 'selective' recomputes the cheap elementwise
        ops in each block, 'full' keeps only each block's input and reruns the block in the backward pass."""
        return self.blocks[0].recompute

    @recompute.setter
    def recompute(self, mode):
        if mode not in ("none", "selective", "full"):
            raise ValueError(f"recompute must be 'none', 'selective' or 'full', got {mode!r}")
        for blk in self.blocks:
            blk.recompute = mode

    def init_weights(self):
        # DINOv2's init; all of it is overwritten when pretrained weights are loaded
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for m in self.blocks.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def prepare_tokens(self, x, masks=None):
        B, _, H, W = x.shape
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        if masks is not None:  # masked patches become mask_token *before* the pos-embed is added
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat([self.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
        x = x + self.interpolate_pos_encoding(x, H, W)
        if self.register_tokens is not None:  # [cls, registers, patches]
            x = torch.cat([x[:, :1], self.register_tokens.expand(B, -1, -1).to(x.dtype), x[:, 1:]], dim=1)
        return x

    def interpolate_pos_encoding(self, x, H, W):
        grid_hw = (H // self.patch_size, W // self.patch_size)
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and H == W:
            return self.pos_embed.to(x.dtype)
        return resize_pos_embed(self.pos_embed, grid_hw, self.interpolate_antialias,
                                self.interpolate_offset).to(x.dtype)

    def forward_features(self, x, masks=None):
        """x: (B, 3, H, W) or a list of such tensors (e.g. [global crops, local crops]; then masks is a list too).
        Returns DINOv2's dict (a list of dicts for a list input)."""
        if isinstance(x, (list, tuple)):
            masks = masks if masks is not None else [None] * len(x)
            # each size runs through the blocks as its own batch: one call, same maths as separate calls
            tokens = [self.prepare_tokens(xi, mi) for xi, mi in zip(x, masks)]
            for blk in self.blocks:
                tokens = blk(tokens)
            return [self.output_dict(t, m) for t, m in zip(tokens, masks)]
        t = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            t = blk(t)
        return self.output_dict(t, masks)

    def output_dict(self, x, masks):
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward(self, x):
        return self.forward_features(x)["x_norm_clstoken"]  # DINOv2's eval output: head = Identity


# -----------------------------------------------------------------------------
# the DINO / iBOT projection head


class WeightNormLinear(nn.Module):
    """Linear without bias, weight = g * v / ||v|| per output row (Salimans & Kingma 2016). Written out rather
    than torch.nn.utils.weight_norm so that the parameter names stay DINOv2's `weight_g` / `weight_v`."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        v = nn.Linear(in_dim, out_dim, bias=False).weight.detach()  # PyTorch's default init, as DINOv2
        self.weight_v = nn.Parameter(v.clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # DINOv2 fills g with 1 and keeps it trainable

    def forward(self, x):
        # torch._weight_norm is the fused kernel behind nn.utils.weight_norm: g * v / ||v|| over dim 0's rows
        return F.linear(x, torch._weight_norm(self.weight_v, self.weight_g, 0).to(x.dtype))


class DINOHead(nn.Module):
    """MLP in -> hidden -> hidden -> bottleneck (GELU), L2-normalise, weight-normed layer to K prototypes."""

    def __init__(self, in_dim, n_prototypes=131072, hidden_dim=2048, bottleneck_dim=384):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, n_prototypes)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)


# -----------------------------------------------------------------------------
# one loader for every checkpoint layout

# Other layouts' names -> DINOv2's, applied in order to every key: timm's VisionTransformer, and Hugging Face's
# Dinov2(WithRegisters)Model as saved (also the published files) and as named in memory by transformers >= 5
RENAMES = [
    (r"^reg_token$", "register_tokens"),
    (r"^embeddings\.(cls_token|mask_token|register_tokens)$", r"\1"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.", r"blocks.\1."),
    (r"^layernorm\.", "norm."),
    (r"\.layer_scale([12])\.lambda1$", r".ls\1.gamma"),
    (r"\.attention\.(output\.dense|o_proj)\.", ".attn.proj."),
    (r"\.attention\.attention\.([qkv])\w*\.", r".attn.\1."),  # query, key, value: fused into qkv below
    (r"\.attention\.([qkv])_proj\.", r".attn.\1."),
    (r"\.mlp\.weights_in\.", ".mlp.w12."),  # Hugging Face's SwiGLU packs [gate; value] as DINOv2's w12 does
    (r"\.mlp\.(weights_out|down_proj)\.", ".mlp.w3."),
    (r"\.mlp\.(gate_proj|fc1_g)\.", ".mlp.gate."),  # split SwiGLUs (transformers >= 5, timm's SwiGLU): fused below
    (r"\.mlp\.(up_proj|fc1_x)\.", ".mlp.up."),
]
FUSED = {"attn.q": ("attn.qkv", ("attn.q", "attn.k", "attn.v")), "mlp.gate": ("mlp.w12", ("mlp.gate", "mlp.up"))}
# timm options with no DINOv2 counterpart: a checkpoint with these is another model
UNSUPPORTED = {"norm_pre": "a norm before the blocks (pre_norm)", "fc_norm": "a norm after pooling (global_pool avg)",
               "attn_pool": "attention pooling", "q_norm": "qk-norm", "attn.norm": "a normed attention output",
               "mlp.norm": "a normed MLP"}
# timm's architecture names in config.json -> heads, where the width is the architecture's own
TIMM_HEADS = {("vit_small", 384): 6, ("vit_base", 768): 12, ("vit_large", 1024): 16, ("vit_huge", 1280): 16,
              ("vit_giant", 1536): 24, ("vit_giant", 1408): 16}


def _is_square(n):
    return n > 0 and math.isqrt(n) ** 2 == n


def to_hub_layout(sd):
    """A backbone state dict of timm's or Hugging Face's layout (or already DINOv2's) in DINOv2's names, as the
    same function: q/k/v fused into qkv; timm's packed SwiGLU fc1 = [gate; value] (SwiGLUPacked gates the first
    half, as DINOv2's w12) renamed; no LayerScale -> gammas of ones; no qkv bias -> zeros; timm's pos-embed
    without a CLS row (no_embed_class) -> a zero CLS row (the CLS then gets no position, as in timm); timm's
    register positions (reg_tokens with no_embed_class=False) folded into the register tokens: a register's
    position is a constant that is added at any resolution (timm resizes only the patch rows)."""
    out = {}
    for k, v in sd.items():
        for pattern, new in RENAMES:
            k = re.sub(pattern, new, k)
        out[k] = v
    bad = sorted({why for k in out for name, why in UNSUPPORTED.items() if re.search(rf"(^|\.){name}\.", k)})
    if bad:
        raise ValueError(f"this ViT has {', '.join(bad)}, which a DINOv2-style backbone has not: it cannot be loaded")
    for k in list(out):
        m = re.fullmatch(r"(blocks\.\d+\.)(attn\.q|mlp\.gate)\.(weight|bias)", k)
        if m:
            fused, parts = FUSED[m[2]]
            out[f"{m[1]}{fused}.{m[3]}"] = torch.cat([out.pop(f"{m[1]}{p}.{m[3]}") for p in parts])
            if m[2] == "mlp.gate" and f"{m[1]}mlp.fc2.{m[3]}" in out:  # timm's SwiGLU keeps fc2 as its output
                out[f"{m[1]}mlp.w3.{m[3]}"] = out.pop(f"{m[1]}mlp.fc2.{m[3]}")
        m = re.fullmatch(r"(blocks\.\d+\.mlp\.)fc1\.weight", k)
        if m and out[k].shape[0] == 2 * out[m[1] + "fc2.weight"].shape[1]:  # timm's SwiGLUPacked
            for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                if m[1] + p in out:
                    out[m[1] + p.replace("fc1", "w12").replace("fc2", "w3")] = out.pop(m[1] + p)
    if "cls_token" not in out or "pos_embed" not in out:
        return out  # not a ViT: infer_config says what it found
    cls = out["cls_token"]
    D = cls.shape[-1]
    for i in sorted({k.split(".")[1] for k in out if k.startswith("blocks.")}):
        out.setdefault(f"blocks.{i}.ls1.gamma", torch.ones(D, dtype=cls.dtype))
        out.setdefault(f"blocks.{i}.ls2.gamma", torch.ones(D, dtype=cls.dtype))
        out.setdefault(f"blocks.{i}.attn.qkv.bias", torch.zeros(3 * D, dtype=cls.dtype))
    out["mask_token"] = out.get("mask_token", torch.zeros(1, D, dtype=cls.dtype)).reshape(1, D)
    pe, R = out["pos_embed"], out["register_tokens"].shape[1] if "register_tokens" in out else 0
    if _is_square(pe.shape[1]):  # patches only
        out["pos_embed"] = torch.cat([torch.zeros_like(pe[:, :1]), pe], dim=1)
    elif R and not _is_square(pe.shape[1] - 1) and _is_square(pe.shape[1] - 1 - R):  # cls, registers, patches
        out["register_tokens"] = out["register_tokens"] + pe[:, 1:1 + R]
        out["pos_embed"] = torch.cat([pe[:, :1], pe[:, 1 + R:]], dim=1)
    return out


def backbone_state_dict(obj):
    """Return the backbone state dict in the hub layout from any checkpoint we know:
    - a DINOv2 hub file (plain state dict);
    - OpenMidnight's teacher_checkpoint.pth ({"teacher": {"backbone.blocks.<chunk>.<i>.*", "dino_head.*", ...}});
    - this project's training checkpoint ({"teacher": {...}, "student": ..., "args": ...}) or teacher export;
    - timm's VisionTransformer and Hugging Face's Dinov2Model / Dinov2WithRegistersModel (see to_hub_layout).
    A classification head is dropped with a warning."""
    sd = obj
    for key in ("teacher", "model", "state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
            break
    out, dropped = {}, []
    for k, v in sd.items():
        if not torch.is_tensor(v):
            continue
        for prefix in ("module.", "_orig_mod.", "teacher.", "backbone.", "dinov2."):
            k = k[len(prefix):] if k.startswith(prefix) else k
        if k.startswith(("dino_head.", "ibot_head.", "student.")):
            continue
        if k.startswith(("head.", "classifier.")):
            dropped.append(f"{k} {tuple(v.shape)}")
            continue
        out[re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k)] = v  # un-chunk FSDP BlockChunks: blocks.c.i -> blocks.i
    if dropped:
        warnings.warn(f"dropped the checkpoint's classification head ({', '.join(dropped)}): only the backbone loads")
    return to_hub_layout(out)


def infer_config(sd, num_heads=None):
    """The ViT kwargs that the tensors of a hub-layout state dict imply. No tensor holds the number of heads: it is
    num_heads if given, else DINOv2's for DINOv2's sizes, else assumed from the width (HEADS_BY_WIDTH or a head
    dim of 64), with a warning that says so."""
    if "cls_token" not in sd or "patch_embed.proj.weight" not in sd or "pos_embed" not in sd:
        found = ", ".join(f"{k} {tuple(v.shape)}" for k, v in list(sd.items())[:6])
        raise ValueError(f"this checkpoint holds no ViT backbone: no cls_token, pos_embed or patch embedding in "
                         f"DINOv2's, timm's or Hugging Face's names; it has {len(sd)} tensors: {found}")
    D, n_pos = sd["cls_token"].shape[-1], sd["pos_embed"].shape[1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    if "blocks.0.mlp.w12.weight" in sd:
        ffn, hidden = "swiglu", sd["blocks.0.mlp.w3.weight"].shape[1]
    elif "blocks.0.mlp.fc1.weight" in sd:
        ffn, hidden = "mlp", sd["blocks.0.mlp.fc1.weight"].shape[0]
    else:
        raise ValueError(f"cannot tell the FFN of this ViT ({depth} blocks): blocks.0 has "
                         f"{sorted(k for k in sd if k.startswith('blocks.0.mlp.')) or 'no mlp tensors'}; known are "
                         "fc1/fc2 (MLP, timm's SwiGLUPacked), w12/w3, fc1_g/fc1_x/fc2, weights_in/weights_out")
    if not _is_square(n_pos - 1):
        raise ValueError(f"cannot tell the patch grid: pos_embed has {n_pos} rows, not 1 + a square grid (nor "
                         "timm's patches-only or CLS + registers + patches rows)")
    patch, grid = sd["patch_embed.proj.weight"].shape[-1], math.isqrt(n_pos - 1)
    regs = sd["register_tokens"].shape[1] if "register_tokens" in sd else 0
    preset = next((c for c in ARCHS.values() if (c["embed_dim"], c["depth"]) == (D, depth)), None)
    if num_heads is None and preset:
        num_heads = preset["num_heads"]
    elif num_heads is None:
        num_heads = HEADS_BY_WIDTH.get(D, D // 64)
        if num_heads == 0 or D % num_heads:
            raise ValueError(f"cannot guess the number of attention heads of width {D} (no config.json next to the "
                             "weights says it): pass num_heads=")
        warnings.warn(f"no config.json gives the number of attention heads and no tensor holds it: assuming "
                      f"{num_heads} heads of {D // num_heads} for width {D} (head dim 64, except width 1280: 16 heads "
                      "as Virchow2's ViT-H/14); pass num_heads= if the model's authors used other")
    return dict(arch=arch_name(D, depth, num_heads), embed_dim=D, depth=depth, num_heads=num_heads,
                patch_size=patch, img_size=grid * patch, num_register_tokens=regs, ffn=ffn, ffn_hidden=hidden)


def _heads_from_config(config, width):
    """The number of heads that a Hugging Face or timm config.json states; None if it states none."""
    if config.get("hidden_act", "gelu") != "gelu" or config.get("layer_norm_eps", 1e-6) != 1e-6:
        raise ValueError(f"config.json asks for hidden_act={config.get('hidden_act')!r}, layer_norm_eps="
                         f"{config.get('layer_norm_eps')}: only DINOv2's gelu and 1e-6 are supported")
    if "num_attention_heads" in config:  # Hugging Face
        return config["num_attention_heads"]
    if "num_heads" in config.get("model_args", {}):  # timm's hub config
        return config["model_args"]["num_heads"]
    arch = config.get("architecture", "")
    return next((h for (name, w), h in TIMM_HEADS.items() if arch.startswith(name) and w == width), None)


FORMATS = ("a torch.save file (.pth/.pt/.bin: zip, or a legacy pickle), a .safetensors file, or a timm / Hugging Face "
           "folder (config.json + weights)")


def checkpoint_problem(path):
    """Why `path` cannot be a checkpoint, in one line, or None: it does not exist, a folder holds no weights, a
    file is neither torch.save's zip or pickle nor safetensors (named by its first bytes), or it is cut short
    (zip's directory or safetensors' header and data lie beyond its end). Cheap: a 20 GB file is not read."""
    if not os.path.exists(path):
        return f"{path!r} does not exist (weights are never downloaded: give a local path)"
    if os.path.isdir(path):
        try:
            _weight_files(path)
            return None
        except ValueError as e:
            return str(e)
    with open(path, "rb") as f:
        head = f.read(16)
        size = os.fstat(f.fileno()).st_size
        if head.startswith(b"PK"):
            try:
                zipfile.ZipFile(f).close()  # reads the central directory, written last
                return None
            except zipfile.BadZipFile as e:
                return f"{path!r} is a torch.save zip cut short or corrupt ({e}): download or copy it again"
        n = int.from_bytes(head[:8], "little")
        if head[8:9] == b"{" and 8 + n <= size:  # safetensors: an 8-byte header length, its JSON, the tensors
            f.seek(8)
            try:
                ends = [t["data_offsets"][1] for k, t in json.loads(f.read(n)).items() if k != "__metadata__"]
            except (ValueError, KeyError, TypeError) as e:
                return f"{path!r} has a corrupt safetensors header ({e})"
            return None if 8 + n + max(ends, default=0) <= size else \
                f"{path!r} is a safetensors file cut short ({size} of {8 + n + max(ends)} bytes)"
    if head[:1] == b"\x80":  # a legacy (non-zip) torch.save pickle: read in full only when loaded
        return None
    return f"{path!r} is not a checkpoint: it starts with {head[:12]!r}; give {FORMATS}"


def weights_arg(text):
    """An argparse type for --weights / --init: a checkpoint_problem is a one-line error at start-up."""
    problem = checkpoint_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def _load_tensors(path):
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors")
        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a text file, a truncated download, a pickle of arbitrary objects
        raise ValueError(checkpoint_problem(path) or f"{path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e)[:200]}); give {FORMATS}") from None


def _weight_files(folder):
    """The weights of a Hugging Face or timm snapshot folder: model.safetensors, pytorch_model.bin, all shards of
    a sharded model, or the folder's only weights file."""
    names = sorted(f for f in os.listdir(folder) if f.endswith((".safetensors", ".bin", ".pth", ".pt")))
    for name in ("model.safetensors", "pytorch_model.bin"):
        if name in names:
            return [name]
    shards = [f for f in names if re.search(r"-\d+-of-\d+\.", f)]
    shards = [f for f in shards if f.endswith(".safetensors")] or shards
    if shards or len(names) == 1:
        return shards or names
    if not names:
        raise ValueError(f"{folder!r} holds no weights file (.safetensors, .bin, .pth, .pt): give {FORMATS}")
    raise ValueError(f"{folder} holds {len(names)} weights files {names[:6]}: give the path of the one to load")


def read_checkpoint(path_or_state, num_heads=None):
    """Any checkpoint -> (backbone state dict in the DINOv2 hub layout, ViT kwargs of its architecture).
    path_or_state: a state dict, a .pth/.pt/.bin/.safetensors file, or a Hugging Face / timm snapshot folder
    (config.json + weights). The number of heads comes from num_heads, else from a config.json next to the
    weights (Hugging Face's num_attention_heads, timm's model_args.num_heads or architecture name), else
    infer_config's assumption."""
    config, obj = {}, path_or_state
    if not isinstance(path_or_state, dict):
        path = str(path_or_state)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no checkpoint at {path!r}: give a local path (nothing is downloaded)")
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        obj = {}
        for f in _weight_files(path) if os.path.isdir(path) else [path]:
            obj.update(_load_tensors(os.path.join(folder, os.path.basename(f))))
        if os.path.exists(os.path.join(folder, "config.json")):
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
    sd = backbone_state_dict(obj)
    from_config = _heads_from_config(config, sd["cls_token"].shape[-1]) if "cls_token" in sd else None
    cfg = infer_config(sd, num_heads or from_config)
    if config.get("model_type") == "dinov2":  # transformers' Dinov2Model resizes its pos-embed without antialias
        cfg["interpolate_antialias"] = False
    return sd, cfg


def load_backbone(path_or_state, arch=None, num_heads=None, **overrides):
    """Build a ViT and load weights from a local checkpoint of any known layout (see read_checkpoint).
    The architecture is inferred from the tensors unless `arch` (a preset's sizes) or overrides are given. A
    pos-embed whose grid differs from the model's (e.g. the hub's 37x37 into a model built at img_size=224) is
    resized once."""
    sd, cfg = read_checkpoint(path_or_state, num_heads)
    if arch is not None:
        cfg = {k: v for k, v in cfg.items() if k not in ("embed_dim", "depth", "num_heads")}
        cfg["arch"] = arch
    cfg.update(overrides)
    model = ViT(**cfg)
    load_into(model, sd)
    return model


def load_into(model, sd):
    """Strict load of a hub-layout state dict into `model`, resizing the pos-embed grid if needed; on mismatch,
    raise an error that names the missing, unexpected and mis-shaped keys and the probable cause."""
    sd = dict(sd)
    own = model.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape != own["pos_embed"].shape and \
            sd["pos_embed"].shape[-1] == own["pos_embed"].shape[-1]:
        G = math.isqrt(own["pos_embed"].shape[1] - 1)
        sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (G, G), antialias=True)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    misshaped = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or misshaped:
        raise ValueError(describe_mismatch(model, sd, missing, unexpected, misshaped))
    model.load_state_dict(sd, strict=True)


def describe_mismatch(model, sd, missing, unexpected, misshaped):
    def head(keys):
        return ", ".join(keys[:6]) + (f" (+{len(keys) - 6} more)" if len(keys) > 6 else "")
    own = model.state_dict()
    lines = [f"checkpoint does not fit {model.arch} (ffn={model.ffn}, registers={model.num_register_tokens}, "
             f"patch={model.patch_size}):"]
    if missing:
        lines.append(f"  missing keys: {head(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys: {head(unexpected)}")
    if misshaped:
        lines.append("  mis-shaped: " + head([f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                                             for k in misshaped]))
    causes = []
    try:
        with warnings.catch_warnings():  # the heads are only a guess here, and the message does not need them
            warnings.simplefilter("ignore")
            cfg = infer_config(sd)
        if (cfg["embed_dim"], cfg["depth"]) != (model.embed_dim, len(model.blocks)):
            causes.append(f"the checkpoint is {cfg['arch']} (width {cfg['embed_dim']}, depth {cfg['depth']}), not "
                          f"{model.arch}: omit arch to build the checkpoint's sizes")
        if cfg["ffn"] != model.ffn:
            causes.append(f"the checkpoint's FFN is {cfg['ffn']!r}, the model's {model.ffn!r}")
        if cfg["num_register_tokens"] != model.num_register_tokens:
            causes.append(f"the checkpoint has {cfg['num_register_tokens']} register tokens, the model "
                          f"{model.num_register_tokens}")
        if cfg["patch_size"] != model.patch_size:
            causes.append(f"patch size {cfg['patch_size']} in the checkpoint, {model.patch_size} in the model")
    except ValueError as e:
        causes.append(str(e))
    lines.append("  probable cause: " + ("; ".join(causes) if causes else "a checkpoint of another layout"))
    return "\n".join(lines)

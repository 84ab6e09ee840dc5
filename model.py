"""
The backbone and heads of the recipe: a DINOv2-compatible Vision Transformer (DINOv2's ViT-S/B/L/giant2 or any
width, depth, heads and patch size; optional register tokens, MLP or SwiGLU FFN, LayerScale, stochastic depth) on
torch's scaled_dot_product_attention, the DINO/iBOT projection head, and the backbone with its two heads that the
student and the teacher each are (MetaArch).

Parameter names and shapes are exactly those of Meta's DINOv2 hub checkpoints (no block chunking), so
`dinov2_vitg14_reg4_pretrain.pth` loads with strict=True and our teacher exports load into DINOv2's own code;
weights.py reads every other layout into these names.
References: DINOv2 (Oquab et al. 2023, facebookresearch/dinov2), registers (Darcet et al. 2023).
"""
import math
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
# student and teacher: the backbone and its two heads


class MetaArch(nn.Module):
    """Backbone + DINO head + iBOT head. The student runs forward() on masked global and local crops (under DDP);
    the teacher runs it on unmasked global crops. The iBOT head sees only the masked patch tokens (the heads run
    eagerly, so their varying count costs no recompilation; DINOv2 pads them to a static bound for FSDP)."""

    def __init__(self, backbone, dino_head, ibot_head):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    def forward(self, global_crops, local_crops=None, masks=None, mask_indices=None):
        crops = [global_crops] if local_crops is None else [global_crops, local_crops]
        feats = self.backbone.forward_features(crops, [masks] + [None] * (len(crops) - 1))
        cls = [f["x_norm_clstoken"] for f in feats]
        masked = feats[0]["x_norm_patchtokens"].flatten(0, 1)[mask_indices]  # (n_masked, D)
        dino = self.dino_head(torch.cat(cls))  # one head call for global and local CLS tokens
        return {"global_cls": cls[0], "dino_global": dino[:len(global_crops)], "dino_local": dino[len(global_crops):],
                "ibot": self.ibot_head(masked)}

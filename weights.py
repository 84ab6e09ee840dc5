"""
One loader for every checkpoint layout a user has, into model.py's ViT (DINOv2's hub names): DINOv2's hub files,
OpenMidnight's and this project's checkpoints and exports, timm's VisionTransformer (UNI, UNI-2, Virchow2, H-optimus-0,
Prov-GigaPath) and Hugging Face's Dinov2Model / Dinov2WithRegistersModel (Phikon-v2, Midnight, Hibou), as files or
snapshot folders; the architecture is read from the tensors. And what makes a file a checkpoint, said in one line
when it is not (checkpoint_problem, the --weights / --init check of every script).
"""
import argparse
import json
import math
import os
import re
import warnings
import zipfile

import torch

from model import ARCHS, ViT, arch_name, resize_pos_embed

# No tensor holds the number of heads: without a config.json it is width // 64, except for the public widths
# where it is not (ViT-H/14: Virchow, Virchow2 are 1280 wide with 16 heads of 80)
HEADS_BY_WIDTH = {1280: 16}


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

"""
Train a pathology foundation model the OpenMidnight way: DINOv2 (DINO + iBOT) self-distillation with a KDE
regulariser and HED colour jitter, continued from Meta's DINOv2 weights, on a patch store made by prepare_patches.py.

    python train.py                                  # the demo: a small run on CPU on the bundled sample slide
    python train.py --preset vits --init dinov2_vits14_reg4_pretrain.pth --data STORE
    torchrun --standalone --nproc_per_node=8 train.py --preset openmidnight \\
        --init dinov2_vitg14_reg4_pretrain.pth --data STORE --out runs/om

Re-running the same command with the same --out resumes from its checkpoint. Hyper-parameters: recipe.md §8.
"""
import argparse
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import augment
import data
import loss as L
from model import ARCHS, DINOHead, ViT, backbone_state_dict, load_into

HERE = os.path.dirname(os.path.abspath(__file__))
if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):  # read at the first CUDA allocation
    # the masked-token count changes every step, so tensor sizes do: growable segments fragment less
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# Presets only change defaults; flags given on the command line always win.
PRESETS = {
    # a small, real run on CPU: ViT-S on 112/56 px crops of the bundled slide, small heads, a few minutes
    "demo": dict(arch="vit_small", ffn="mlp", batch_size=8, steps=60, base_lr=1e-3, warmup_steps=10,
                 freeze_last_layer_steps=0, teacher_temp_warmup_steps=20, n_prototypes=4096, head_hidden=512,
                 head_bottleneck=128, global_size=112, local_size=56, n_local_crops=4, drop_path=0.1,
                 momentum_teacher=0.99, log_every=5, checkpoint_every=20, export_every=60, workers=1),
    # single-GPU ablation: ViT-S/14 reg4 with the plain MLP FFN of Meta's ViT-S hub weights
    "vits": dict(arch="vit_small", ffn="mlp", batch_size=64, steps=100_000, drop_path=0.1, n_prototypes=65536),
    # the run behind OpenMidnight's released checkpoint (recipe.md §0, §8), its known bugs fixed
    "openmidnight": dict(arch="vit_giant2", ffn="swiglu", batch_size=48, steps=250_000, schedule_steps=10_000_000,
                         base_lr=2e-4, export_every=12_500),
    # OpenMidnight's current config file: base lr 3e-4, a full cosine over 137.5k steps
    "openmidnight-config": dict(arch="vit_giant2", ffn="swiglu", batch_size=48, steps=137_500, base_lr=3e-4,
                                export_every=2_500),
}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS), help="a set of defaults (flags still win)")
    g = p.add_argument_group("I/O")
    g.add_argument("--out", default=None, help="run directory (default runs/<preset>)")
    g.add_argument("--data", default=None, help="patch store from prepare_patches.py (demo: prepared if missing)")
    g.add_argument("--init", default=None, help="local DINOv2 checkpoint to start from, e.g. "
                   "dinov2_vitg14_reg4_pretrain.pth (any layout model.load_backbone reads); none = random init")
    g.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    g.add_argument("--log-every", type=int, default=20, help="steps between metrics.jsonl lines")
    g.add_argument("--checkpoint-every", type=int, default=1000,
                   help="steps between resumable checkpoints (ViT-g: ~20 GB each; SIGTERM also writes one)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="numbered checkpoints kept besides the latest")
    g.add_argument("--export-every", type=int, default=5000, help="steps between teacher-backbone exports")
    g.add_argument("--probe-data", default=None, help="a small labelled image folder: kNN probe of the teacher")
    g.add_argument("--probe-every", type=int, default=0, help="steps between in-training probes (0 = off)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", choices=["vit_small", "vit_base", "vit_large", "vit_giant2"])
    g.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"], help="must match --init's weights")
    g.add_argument("--registers", type=int, default=4, help="register tokens (0 or 4); must match --init")
    g.add_argument("--patch-size", type=int, default=14)
    g.add_argument("--drop-path", type=float, default=0.4,
                   help="student stochastic depth, uniform over blocks (recipe: 0.4 for ViT-g, 0.1 for ViT-S); "
                   "above 0.1 the branches run on the kept samples only, which saves compute")
    g.add_argument("--layerscale", type=float, default=1e-5)
    g.add_argument("--random-pos-embed", action="store_true",
                   help="OpenMidnight@blog quirk: do not load the pretrained pos-embed (random 16x16 init)")
    g.add_argument("--interpolate-antialias", type=int, default=1, choices=[0, 1],
                   help="pos-embed resizing for local crops (hub reg4: 1; OpenMidnight@blog ran 0 with offset 0.1)")
    g.add_argument("--interpolate-offset", type=float, default=0.0)
    g.add_argument("--n-prototypes", type=int, default=131072,
                   help="K of the DINO and iBOT heads (DINOv2 65536, OpenMidnight 131072; teacher_entropy near "
                   "log K with a flat loss means the targets carry no signal)")
    g.add_argument("--head-hidden", type=int, default=2048)
    g.add_argument("--head-bottleneck", type=int, default=384)
    g.add_argument("--recompute", default=None, choices=["none", "selective", "full"],
                   help="activation memory for compute (default: selective with --compile, else none); 'full' "
                   "reruns each block in the backward pass (~1/3 more student compute) if CUDA runs out of memory")
    g = p.add_argument_group("losses")
    g.add_argument("--centering", default="sinkhorn_knopp", choices=["sinkhorn_knopp", "centering"])
    g.add_argument("--student-temp", type=float, default=0.1)
    g.add_argument("--teacher-temp", type=float, default=0.07,
                   help="final teacher temperature; above ~0.07 targets get flat and training can collapse")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    g.add_argument("--teacher-temp-warmup-steps", type=int, default=37_500)
    g.add_argument("--ibot-weight", type=float, default=1.0)
    g.add_argument("--mask-ratio", type=float, nargs=2, default=(0.1, 0.45),
                   help="iBOT masked fraction range of a masked crop (DINOv2 0.1-0.5)")
    g.add_argument("--mask-prob", type=float, default=0.5, help="fraction of global crops that get iBOT masks")
    g.add_argument("--kde-weight", type=float, default=0.05, help="per global crop; 0 = off")
    g.add_argument("--kde-kappa", type=float, default=5.0,
                   help="vMF kernel concentration (OpenMidnight's constant; not stated in the Midnight paper)")
    g.add_argument("--kde-variant", default="spread", choices=["spread", "openmidnight"],
                   help="'openmidnight' reproduces the released run's sign, which pulls CLS tokens together")
    g.add_argument("--koleo-weight", type=float, default=0.0, help="DINOv2's KoLeo; 0.1 in stock DINOv2")
    g = p.add_argument_group("optimisation (schedules in steps)")
    g.add_argument("--steps", type=int, default=250_000, help="length of this run (its early-stop step)")
    g.add_argument("--schedule-steps", type=int, default=None,
                   help="length of the cosine schedules (default --steps; OpenMidnight@blog stretched them to 10M)")
    g.add_argument("--batch-size", type=int, default=48,
                   help="per process; ViT-g at 48 fits 80 GB with the default selective recompute")
    g.add_argument("--base-lr", type=float, default=2e-4,
                   help="scaled by sqrt(global batch / 1024); 3.5e-4 collapsed ViT-g for OpenMidnight")
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-steps", type=int, default=12_500,
                   help="linear lr warmup; much shorter than ~5%% of the run risks early collapse")
    g.add_argument("--weight-decay", type=float, default=0.04, help="start of the cosine to --weight-decay-end")
    g.add_argument("--weight-decay-end", type=float, default=0.2)
    g.add_argument("--momentum-teacher", type=float, default=0.994,
                   help="teacher EMA start, cosine to 1; 0.99-0.999 (lower for small batches, per DINO)")
    g.add_argument("--layerwise-decay", type=float, default=1.0, help="lr x decay^(depth - block); 1 = off (recipe), "
                   "0.9 = DINOv2's default")
    g.add_argument("--patch-embed-lr-mult", type=float, default=0.2, help="the patch embedding learns 5x slower")
    g.add_argument("--freeze-last-layer-steps", type=int, default=1250, help="prototype layers' lr held at 0")
    g.add_argument("--clip-grad", type=float, default=3.0,
                   help="gradient-norm clip per part (backbone, each head); grad_norm_* often above it = lr too high")
    g.add_argument("--max-bad-steps", type=int, default=10, help="abort after this many non-finite steps in a row")
    g = p.add_argument_group("augmentation (recipe.md §6)")
    g.add_argument("--global-size", type=int, default=224)
    g.add_argument("--local-size", type=int, default=98)
    g.add_argument("--n-local-crops", type=int, default=8)
    g.add_argument("--hed-prob", type=float, default=0.5)
    g.add_argument("--hed-range", type=float, default=0.05,
                   help="HED offset range per stain; 0.05 is already strong (~0.7 optical density)")
    g.add_argument("--gpu-augment", type=int, default=None, choices=[0, 1],
                   help="colour ops batched on the device (default: on for cuda)")
    g = p.add_argument_group("system")
    g.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda if available")
    g.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="autocast (default bf16 on cuda)")
    g.add_argument("--compile", type=int, default=None, choices=[0, 1], help="torch.compile blocks (default: cuda)")
    g.add_argument("--fused-adamw", type=int, default=1, choices=[0, 1], help="fused AdamW kernel (0: for-each)")
    g.add_argument("--zero", type=int, default=0, choices=[0, 1],
                   help="ZeRO-1 under torchrun: each rank keeps the AdamW moments of 1/world of the parameters "
                   "(ViT-g on 8 GPUs: 8.2 GiB less per GPU, one parameter broadcast more per step)")
    g.add_argument("--workers", type=int, default=8,
                   help="loader workers per process; raise it if data_time_frac in the log stays above ~0.05")
    g.add_argument("--seed", type=int, default=0)
    return p


def parse_args(argv=None, need_paths=True):
    """Presets, then flags, then the derived defaults; bad paths and contradictory flags fail here, at start-up.
    need_paths=False (bench.py) allows running without --data and --init (random weights)."""
    parser = get_args_parser()
    pre, _ = parser.parse_known_args(argv)
    parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.preset)
    args.schedule_steps = args.schedule_steps or args.steps
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.compile = args.device == "cuda" if args.compile is None else bool(args.compile)
    args.recompute = args.recompute or ("selective" if args.compile else "none")
    args.gpu_augment = args.device == "cuda" if args.gpu_augment is None else bool(args.gpu_augment)
    if args.data is None:
        if args.preset != "demo" and need_paths:
            parser.error("--data STORE is required (make one with prepare_patches.py)")
        args.data = os.path.join(HERE, "data", "sample_store")
    if args.preset.startswith("openmidnight") and not args.init and need_paths:
        parser.error("the openmidnight presets start from DINOv2 weights: give --init dinov2_vitg14_reg4_pretrain.pth")
    if args.init and not os.path.exists(args.init):
        parser.error(f"--init {args.init!r} does not exist (weights are never downloaded: give a local path)")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.probe_every and not args.probe_data:
        parser.error("--probe-every needs --probe-data")
    if (args.kde_weight or args.koleo_weight) and args.batch_size < 2:
        parser.error("KDE / KoLeo compare the samples of a batch: use --batch-size >= 2 or set their weight to 0")
    return args


# -----------------------------------------------------------------------------
# schedules (DINOv2's CosineScheduler, in steps)


def cosine_schedule(step, base, final, total, warmup=0, start=0.0, freeze=0):
    """0 for `freeze` steps, linear warmup start -> base over `warmup` steps (np.linspace's endpoints), then a
    half cosine base -> final ending at `total`; final afterwards."""
    if step < freeze:
        return 0.0
    step -= freeze
    if step < warmup:
        return start + (base - start) * step / max(warmup - 1, 1)
    t, T = step - warmup, total - warmup - freeze
    return final if t >= T else final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / T))


def schedules(step, args, world_size):
    lr = args.base_lr * math.sqrt(args.batch_size * world_size / 1024)  # DINOv2's sqrt_wrt_1024 rule
    return {
        "lr": cosine_schedule(step, lr, args.min_lr, args.schedule_steps, args.warmup_steps),
        "last_layer_lr": cosine_schedule(step, lr, args.min_lr, args.schedule_steps, args.warmup_steps)
        if step >= args.freeze_last_layer_steps else 0.0,
        "wd": cosine_schedule(step, args.weight_decay, args.weight_decay_end, args.schedule_steps),
        "momentum": cosine_schedule(step, args.momentum_teacher, 1.0, args.schedule_steps),
        "teacher_temp": (args.warmup_teacher_temp + (args.teacher_temp - args.warmup_teacher_temp) *
                         step / max(args.teacher_temp_warmup_steps - 1, 1))
        if step < args.teacher_temp_warmup_steps else args.teacher_temp,
    }


# -----------------------------------------------------------------------------
# student / teacher


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


def build_models(args):
    def backbone(drop_path):
        return ViT(args.arch, img_size=args.global_size, patch_size=args.patch_size,
                   num_register_tokens=args.registers, ffn=args.ffn, layerscale_init=args.layerscale,
                   drop_path_rate=drop_path, interpolate_antialias=bool(args.interpolate_antialias),
                   interpolate_offset=args.interpolate_offset, recompute=args.recompute)

    def heads():  # DINO and iBOT heads, separate as in OpenMidnight
        D = ARCHS[args.arch]["embed_dim"]
        return [DINOHead(D, args.n_prototypes, args.head_hidden, args.head_bottleneck) for _ in ("dino", "ibot")]

    student = MetaArch(backbone(args.drop_path), *heads())
    if args.init:  # pretrained backbone; heads start fresh (Meta released backbones only)
        sd = backbone_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
        if args.random_pos_embed:
            sd["pos_embed"] = student.backbone.pos_embed.detach().clone()
        load_into(student.backbone, sd)  # resizes 37x37 -> 16x16 once; clear error on a wrong arch
    teacher = MetaArch(backbone(0.0), *heads())
    teacher.load_state_dict(student.state_dict())  # the teacher starts equal to the student
    teacher.requires_grad_(False).eval()
    return student, teacher


def param_groups(student, args):
    """DINOv2's groups: no weight decay for biases, norms and LayerScale gammas (tokens, pos-embed and head
    weights do decay); lr x layerwise_decay^(depth + 1 - layer) with patch-embed/tokens at layer 0 and heads at
    depth + 1; patch-embed lr x patch_embed_lr_mult; the prototype layers follow the last-layer schedule."""
    depth = len(student.backbone.blocks)
    groups = {}
    for name, p in student.named_parameters():
        layer = depth + 1
        if name.startswith("backbone."):
            short = name[len("backbone."):]
            if short.startswith(("patch_embed", "pos_embed", "cls_token", "register_tokens", "mask_token")):
                layer = 0
            elif short.startswith("blocks."):
                layer = int(short.split(".")[1]) + 1
        lr_mult = args.layerwise_decay ** (depth + 1 - layer) * (args.patch_embed_lr_mult if "patch_embed" in name
                                                                else 1.0)
        wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
        key = (lr_mult, wd_mult, "last_layer" in name)
        groups.setdefault(key, {"params": [], "names": [], "lr_mult": lr_mult, "wd_mult": wd_mult,
                                "last_layer": "last_layer" in name})["params"].append(p)
        groups[key]["names"].append(name)
    return list(groups.values())


@torch.no_grad()
def ema_update(teacher, student, m):
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    torch._foreach_mul_(t, m)
    torch._foreach_add_(t, s, alpha=1 - m)


# -----------------------------------------------------------------------------
# one training step


def prepare_batch(batch, args, device, aug_cfg):
    """Move a batch to the device; path (b): colour ops and normalisation here, batched."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for kind in ("global", "local"):
        x = out[f"{kind}_crops"]
        if x.dtype == torch.uint8:
            x = augment.color_augment(augment.to_float(x), out[f"{kind}_params"], aug_cfg)
            out[f"{kind}_crops"] = augment.normalize(x, aug_cfg.mean, aug_cfg.std)
    return out


def compute_losses(student, teacher, batch, sched, args, centers, mark=lambda phase: None):
    """Teacher targets, student outputs, and the recipe's loss terms (recipe.md §4). `mark(phase)` lets bench.py
    time the phases."""
    g = batch["global_crops"]
    with torch.no_grad():
        t = teacher(g, mask_indices=batch["mask_indices"])
        t_dino = torch.cat(t["dino_global"].chunk(2)[::-1])  # [g2; g1]: student g1 learns from teacher g2
        if args.centering == "sinkhorn_knopp":
            q_dino = L.sinkhorn_knopp(t_dino, sched["teacher_temp"])
            q_ibot = L.sinkhorn_knopp(t["ibot"], sched["teacher_temp"])
        else:
            q_dino = L.softmax_center(t_dino, centers["dino"], sched["teacher_temp"])
            q_ibot = L.softmax_center(t["ibot"], centers["ibot"], sched["teacher_temp"])
            centers["dino"] = L.update_center(centers["dino"], t_dino)
            centers["ibot"] = L.update_center(centers["ibot"], t["ibot"].mean(0, keepdim=True))
    del t, t_dino  # the teacher's logits ([masked tokens, K]: ~0.9 GB on ViT-g) are not needed past the targets
    mark("teacher")
    s = student(g, batch["local_crops"], batch["masks"], batch["mask_indices"])
    n_terms = 2 * args.n_local_crops + 2  # (teacher view, student view) pairs, never a view with itself
    terms = {
        "dino_local": L.dino_loss(s["dino_local"].chunk(args.n_local_crops), q_dino.chunk(2),
                                  args.student_temp) / n_terms,
        "dino_global": L.dino_loss([s["dino_global"]], [q_dino], args.student_temp) * 2 / n_terms,
        "ibot": args.ibot_weight * L.ibot_loss(s["ibot"], q_ibot, batch["masks_weight"], g.shape[0],
                                               args.student_temp),
    }
    views = s["global_cls"].chunk(2)
    if args.kde_weight:
        terms["kde"] = args.kde_weight * sum(L.kde_loss(v, args.kde_kappa, args.kde_variant) for v in views)
    if args.koleo_weight:
        terms["koleo"] = args.koleo_weight * sum(L.koleo_loss(v) for v in views)
    health = {**L.teacher_health(q_dino), "cls_std": s["global_cls"].detach().float().std(0).mean()}
    mark("student_forward")
    return terms, health


def train_step(state, batch, step, args, mark=lambda phase: None):
    """Forward, backward, clip, AdamW, EMA. A non-finite loss or gradient skips the step (same on every rank,
    since gradients are all-reduced before the check)."""
    student, teacher, opt = state["student"], state["teacher"], state["opt"]
    sched = schedules(step, args, state["world_size"])
    for group in opt.param_groups:
        group["lr"] = (sched["last_layer_lr"] if group["last_layer"] else sched["lr"]) * group["lr_mult"]
        group["weight_decay"] = sched["wd"] * group["wd_mult"]
    autocast = torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bfloat16" else nullcontext()
    with autocast:
        terms, health = compute_losses(student, teacher, batch, sched, args, state["centers"], mark)
    total = sum(terms.values())
    opt.zero_grad(set_to_none=True)
    total.backward()
    mark("backward")
    raw = state["student_raw"]
    norms = {f"grad_norm_{name}": nn.utils.clip_grad_norm_(getattr(raw, name).parameters(), args.clip_grad)
             for name in ("backbone", "dino_head", "ibot_head")}
    finite = bool(torch.isfinite(torch.stack([total.detach(), *norms.values()])).all())  # one sync per step
    if finite:
        opt.step()
        mark("optimizer")
        ema_update(teacher, raw, sched["momentum"])
        mark("ema")
    out = {"loss": total, **terms, **norms, **health}
    return {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}, sched, finite


# -----------------------------------------------------------------------------
# checkpoints


def atomic_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(state, step, args):
    ckpt = {"student": state["student_raw"].state_dict(), "teacher": state["teacher"].state_dict(),
            "optimizer": state["opt"].state_dict(), "centers": state["centers"], "step": step,
            "args": vars(args), "rng": {"cpu": torch.get_rng_state(),
                                        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "skipped_steps": state["skipped"]}
    path = os.path.join(args.out, "checkpoint.pt")
    if os.path.exists(path) and args.keep_checkpoints > 0:  # rotate: the previous latest gets its step number
        prev = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"]
        os.replace(path, os.path.join(args.out, f"checkpoint-{prev:07d}.pt"))
    atomic_save(ckpt, path)
    old = sorted(f for f in os.listdir(args.out) if f.startswith("checkpoint-") and f.endswith(".pt"))
    for f in old[:max(len(old) - args.keep_checkpoints, 0)]:
        os.remove(os.path.join(args.out, f))


def export_teacher(state, step, args):
    """The teacher backbone in the DINOv2 hub layout (fp32), strict-loadable by model.py and DINOv2's own code."""
    sd = {k: v.detach().float().cpu() for k, v in state["teacher"].backbone.state_dict().items()}
    atomic_save(sd, os.path.join(args.out, "teacher_backbone.pth"))
    os.makedirs(os.path.join(args.out, "exports"), exist_ok=True)
    atomic_save(sd, os.path.join(args.out, "exports", f"teacher_backbone_{step:07d}.pth"))


def load_checkpoint(state, path, args):
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # 8 ranks share the page cache
    state["student_raw"].load_state_dict(ckpt["student"])
    state["teacher"].load_state_dict(ckpt["teacher"])
    state["opt"].load_state_dict(ckpt["optimizer"])
    state["centers"] = {k: v.to(args.device) for k, v in ckpt["centers"].items()}
    state["skipped"] = ckpt.get("skipped_steps", 0)
    torch.set_rng_state(ckpt["rng"]["cpu"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    return ckpt["step"]


# -----------------------------------------------------------------------------
# the run


def setup_distributed(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process."""
    if "RANK" not in os.environ:
        return 0, 1, 0
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world, local = dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local)
    return rank, world, local


def build_state(args, device, rank=0, world=1, local=0):
    """Student (DDP-wrapped when distributed), EMA teacher, fused AdamW over DINOv2's parameter groups, centres."""
    torch.manual_seed(args.seed)  # the same initial student *and teacher* on every rank (DDP syncs only the student)
    student, teacher = build_models(args)
    torch.manual_seed(args.seed + rank)  # drop-path subsets differ per rank; data and masks are seeded per sample
    student.to(device)
    teacher.to(device)
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(student, args)]
    adamw = dict(lr=0.0, betas=(0.9, 0.999), fused=bool(args.fused_adamw))
    if args.zero and world > 1:  # its consolidated state dict loads into a plain AdamW too (tested)
        from torch.distributed.optim import ZeroRedundancyOptimizer  # ~1 s of import: only when asked for
        opt = ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, **adamw)
    else:
        opt = torch.optim.AdamW(groups, **adamw)
    if args.compile:
        for m in (student, teacher):
            for blk in m.backbone.blocks:
                blk.compile()
    state = {"student_raw": student, "teacher": teacher, "opt": opt, "world_size": world, "skipped": 0,
             "student": DDP(student, device_ids=[local] if args.device == "cuda" else None,
                            gradient_as_bucket_view=True) if world > 1 else student,  # grads are the buckets
             "centers": {"dino": torch.zeros(1, args.n_prototypes, device=device),
                         "ibot": torch.zeros(1, args.n_prototypes, device=device)}}
    return state


def ensure_demo_data(args):
    """The demo prepares its patch store (and a small labelled probe set) from the bundled slide if needed."""
    import prepare_patches
    if not os.path.exists(os.path.join(args.data, "manifest.json")):
        print(f"preparing demo patches from the bundled slide into {args.data}")
        prepare_patches.main([prepare_patches.SAMPLE_SLIDE, "--out", args.data, "--patches-per-level", "400"])
    if args.probe_data is None:
        import eval_probe
        args.probe_data = eval_probe.make_demo_probe_set(os.path.join(HERE, "data", "sample_probe"))


def main(argv=None):
    args = parse_args(argv)
    rank, world, local = setup_distributed(args)
    master = rank == 0
    device = torch.device(args.device, local) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.preset == "demo" and master:
        ensure_demo_data(args)
    if world > 1:
        dist.barrier()
    store = data.PatchStore(args.data)
    aug_cfg = replace(augment.AugmentConfig(), global_size=args.global_size, local_size=args.local_size,
                      n_local_crops=args.n_local_crops, hed_prob=args.hed_prob, hed_range=args.hed_range)

    state = build_state(args, device, rank, world, local)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    start = 0
    if os.path.exists(ckpt_path) and not args.no_resume:
        start = load_checkpoint(state, ckpt_path, args)
        if master:
            print(f"resumed from {ckpt_path} at step {start}")
    if master:
        global_batch = args.batch_size * world
        print(json.dumps(vars(args), indent=1, sort_keys=True))
        print(f"world {world} x batch {args.batch_size} = global batch {global_batch}; {args.steps} steps = "
              f"{args.steps * global_batch:,} images = {args.steps * global_batch / len(store):.2f} passes over "
              f"{len(store):,} patches; lr {schedules(args.warmup_steps, args, world)['lr']:.3e} after warmup "
              f"(base {args.base_lr} x sqrt({global_batch}/1024)); schedules over {args.schedule_steps} steps; "
              f"autocast {args.dtype}; colour ops on {'device' if args.gpu_augment else 'loader workers'}")
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=1)
    loader = data.make_loader(store, args.batch_size, aug_cfg, args.seed, rank, world, start * args.batch_size,
                              on_device=args.gpu_augment, workers=args.workers, pin_memory=args.device == "cuda",
                              mask_ratio=tuple(args.mask_ratio), mask_prob=args.mask_prob)

    stop = {"signal": None}
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # cluster pre-emption: checkpoint, then exit cleanly
        signal.signal(sig, lambda s, f: stop.update(signal=s))
    metrics_file = open(os.path.join(args.out, "metrics.jsonl"), "a") if master else None
    bar = tqdm(total=args.steps, initial=start, disable=not master, dynamic_ncols=True)
    bad_in_a_row, t_last, data_time = 0, time.time(), 0.0
    step = start
    batches = iter(loader)
    while step < args.steps:
        t0 = time.time()
        batch = prepare_batch(next(batches), args, device, aug_cfg)
        data_time += time.time() - t0
        out, sched, finite = train_step(state, batch, step, args)
        step += 1
        if not finite:
            state["skipped"] += 1
            bad_in_a_row += 1
            bad = [k for k, v in out.items() if torch.is_tensor(v) and not torch.isfinite(v).all()]
            tqdm.write(f"step {step}: non-finite {bad} on patches {batch['index'][:8].tolist()} (store indices); "
                       f"step skipped ({bad_in_a_row} in a row)")
            if bad_in_a_row >= args.max_bad_steps:
                raise SystemExit(f"{bad_in_a_row} non-finite steps in a row ({bad}): lower --base-lr, check "
                                 "--teacher-temp (<= 0.07) and the data (blank or constant patches), or resume "
                                 "from an earlier checkpoint")
        else:
            bad_in_a_row = 0
        if step % args.log_every == 0 or step == args.steps:
            if world > 1:  # the logged terms are global-batch means (each rank's loss is its local mean)
                vals = torch.stack([out[k].float() for k in out])
                dist.all_reduce(vals)
                out = dict(zip(out, (vals / world).tolist()))
        if master and (step % args.log_every == 0 or step == args.steps):
            dt = time.time() - t_last
            rec = {"step": step, **{k: round(float(v), 5) for k, v in out.items()}, **sched,
                   "skipped_steps": state["skipped"],
                   "images_per_s": round(args.log_every * args.batch_size * world / dt, 2),
                   "data_time_frac": round(data_time / dt, 3)}
            metrics_file.write(json.dumps(rec) + "\n")
            metrics_file.flush()
            bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{sched['lr']:.2e}", img_s=rec["images_per_s"])
            t_last, data_time = time.time(), 0.0
        bar.update()
        want_stop = stop["signal"] is not None
        if world > 1:  # any rank's signal stops all ranks at the same step; checked at log steps (a device sync)
            want_stop = False
            if step % args.log_every == 0:
                flag = torch.tensor(float(stop["signal"] is not None), device=device)
                dist.all_reduce(flag)
                want_stop = flag.item() > 0
        if step % args.checkpoint_every == 0 or step == args.steps or want_stop:
            if hasattr(state["opt"], "consolidate_state_dict"):  # ZeRO-1
                state["opt"].consolidate_state_dict(to=0)  # every rank sends its AdamW shard to rank 0
            if master:
                save_checkpoint(state, step, args)
        if master and (step % args.export_every == 0 or step == args.steps):
            export_teacher(state, step, args)
        if master and args.probe_every and step % args.probe_every == 0:
            run_probe(state, args, step, metrics_file)
        if want_stop:
            tqdm.write(f"signal {stop['signal']}: checkpoint written at step {step}; exiting")
            break
    bar.close()
    if master and args.preset == "demo" and step == args.steps:
        run_probe(state, args, step, metrics_file, baseline=build_models(args)[1].backbone)
    if world > 1:
        dist.destroy_process_group()


def run_probe(state, args, step, metrics_file, baseline=None):
    """eval_probe's kNN on the teacher backbone, on rank 0 between steps (and, for the demo, on a random init)."""
    import eval_probe
    res = eval_probe.quick_knn(state["teacher"].backbone, args.probe_data, args.global_size, args.device)
    note = ""
    if baseline is not None:
        res["random_init"] = eval_probe.quick_knn(baseline.to(args.device), args.probe_data, args.global_size,
                                                  args.device)
        note = f" (the same ViT at random init: {res['random_init']['balanced_accuracy']:.3f})"
    metrics_file.write(json.dumps({"step": step, "probe": res}) + "\n")
    metrics_file.flush()
    tqdm.write(f"step {step}: teacher kNN balanced accuracy {res['balanced_accuracy']:.3f} on "
               f"{res['n_test']} held-out images of {args.probe_data}{note}")


if __name__ == "__main__":
    main()

"""
Train a pathology foundation model the OpenMidnight way: DINOv2 (DINO + iBOT) self-distillation with a KDE
regulariser and HED colour jitter, continued from Meta's DINOv2 weights, on a patch store made by prepare_patches.py.

    python train.py                                  # the demo: a small run on CPU on the bundled sample slide
    python train.py --preset vits --init dinov2_vits14_reg4_pretrain.pth --data STORE
    torchrun --standalone --nproc_per_node=8 train.py --preset openmidnight \\
        --init dinov2_vitg14_reg4_pretrain.pth --data STORE --out runs/om

Re-running the same command with the same --out resumes from its newest readable checkpoint. Every number of the
recipe, with its source: RECIPE.md (hyper-parameters §8, losses §4, augmentation §6).
"""
import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import augment
import data
import export
from cli import Parser, bounded, existing_path, on_terminal, progress
import eval_probe
import loss as L
from model import ARCHS, DINOHead, ViT, autocast, checkpoint_problem, infer_config, load_into, read_checkpoint
from files import atomic_write, lock_folder

HERE = os.path.dirname(os.path.abspath(__file__))
if not {"PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"} & set(os.environ):  # read at the first CUDA allocation
    # the masked-token count changes every step, so tensor sizes do: growable segments fragment less
    os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"

# Presets only change defaults; flags given on the command line always win.
PRESETS = {
    # a small, real run on CPU: ViT-S on 112/56 px crops of the bundled slide, small heads, a few minutes
    "demo": dict(arch="vit_small", ffn="mlp", batch_size=8, steps=60, base_lr=1e-3, warmup_steps=10,
                 freeze_last_layer_steps=0, teacher_temp_warmup_steps=20, n_prototypes=4096, head_hidden=512,
                 dino_head_bottleneck=128, ibot_head_bottleneck=128, global_size=112, local_size=56,
                 n_local_crops=4, drop_path=0.1, momentum_teacher=0.99, log_every=5, checkpoint_every=20,
                 keep_checkpoints=0, export_every=60, workers=1),
    # single-GPU ablation: ViT-S/14 reg4 with the plain MLP FFN of Meta's ViT-S hub weights
    "vits": dict(arch="vit_small", ffn="mlp", batch_size=64, steps=100_000, drop_path=0.1, n_prototypes=65536),
    # the run behind OpenMidnight's released checkpoint (RECIPE.md §0, §8), its known bugs fixed
    # (a ViT-g checkpoint is ~20 GB: every 2500 steps, ~50 min at OpenMidnight's ~40 images/s per GPU, the other
    # ranks' wait while rank 0 writes it stays under 2% even at 0.34 GB/s, README "The store and the chain at scale")
    "openmidnight": dict(arch="vit_giant2", ffn="swiglu", batch_size=48, steps=250_000, schedule_steps=10_000_000,
                         base_lr=2e-4, export_every=12_500, checkpoint_every=2_500),
    # OpenMidnight's current config file: base lr 3e-4, a full cosine over 137.5k steps
    "openmidnight-config": dict(arch="vit_giant2", ffn="swiglu", batch_size=48, steps=137_500, base_lr=3e-4,
                                export_every=2_500, checkpoint_every=2_500),
}


def get_args_parser(add_help=True):
    p = Parser(description=__doc__, add_help=add_help)
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="a set of defaults (flags still win); --help shows the given preset's")
    g = p.add_argument_group("I/O")
    g.add_argument("--out", default=None, help="run directory (default runs/<preset>); one training job at a time")
    g.add_argument("--data", default=None, help="finished patch store from prepare_patches.py (the demo, given "
                   "none, prepares one from the bundled slide)")
    g.add_argument("--init", default=None, help="local checkpoint to start from, e.g. dinov2_vitg14_reg4_pretrain.pth "
                   "(any layout model.load_backbone reads); none = random init")
    g.add_argument("--no-resume", action="store_true", help="start over even if --out holds checkpoints")
    g.add_argument("--change-schedules", action="store_true",
                   help="resume although the schedules' flags differ from the checkpoint's (otherwise refused: a "
                   "longer --steps also stretches the schedules unless --schedule-steps keeps them)")
    g.add_argument("--log-every", type=bounded(int, 1), default=20, help="steps between metrics.jsonl lines")
    g.add_argument("--checkpoint-every", type=bounded(int, 1), default=1000,
                   help="steps between resumable checkpoints (ViT-g: ~20 GB each; SIGTERM also writes one)")
    g.add_argument("--keep-checkpoints", type=bounded(int, 0), default=2,
                   help="numbered checkpoints kept besides the latest (0-10)")
    g.add_argument("--export-every", type=bounded(int, 1), default=5000, help="steps between teacher exports")
    g.add_argument("--results", type=existing_path, default=None,
                   help="a suite's results.json (eval_suite.py) for the model card of --out/model (a rerun of a "
                   "finished run rewrites its last export's card)")
    g.add_argument("--safetensors", action="store_true",
                   help="also write --out/model/model.safetensors (pip install safetensors)")
    g.add_argument("--wandb", default=None, metavar="PROJECT",
                   help="also log every metrics.jsonl record to Weights & Biases, in this project (pip install "
                   "wandb); a resumed run continues the same W&B run")
    g.add_argument("--probe-data", default=None, help="a small labelled image folder: kNN probe of the teacher")
    g.add_argument("--probe-every", type=bounded(int, 0), default=0, help="steps between probes (0 = off)")
    g.add_argument("--probe-size", type=bounded(int, 14), default=224,
                   help="image size of the probe (224 = eval_probe's, whatever the training crop size)")
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_small", choices=sorted(ARCHS),
                   help="DINOv2's sizes (with --init, the checkpoint's size, whatever it is, unless set)")
    g.add_argument("--ffn", default="mlp", choices=["mlp", "swiglu"], help="FFN kind (taken from --init unless set)")
    g.add_argument("--registers", type=bounded(int, 0), default=4,
                   help="register tokens (taken from --init unless set)")
    g.add_argument("--patch-size", type=bounded(int, 1), default=14,
                   help="patch side in pixels; crop sizes must be multiples of it (taken from --init unless set)")
    g.add_argument("--drop-path", type=bounded(float, 0.0, 0.9), default=0.4,
                   help="student stochastic depth, uniform over blocks, as batch subsets (recipe: 0.4 ViT-g, "
                   "0.1 ViT-S); each residual branch runs on int(B (1 - p)) samples, which also saves compute")
    g.add_argument("--layerscale", type=bounded(float, 0.0), default=1e-5, help="LayerScale init (random init only)")
    g.add_argument("--n-prototypes", type=bounded(int, 2), default=131072,
                   help="K of the DINO and iBOT heads (DINOv2 65536, OpenMidnight 131072)")
    g.add_argument("--head-hidden", type=bounded(int, 1), default=2048, help="hidden width of both heads' MLPs")
    g.add_argument("--dino-head-bottleneck", type=bounded(int, 1), default=384,
                   help="DINO head bottleneck (OpenMidnight: dino.head_bottleneck_dim 384)")
    g.add_argument("--ibot-head-bottleneck", type=bounded(int, 1), default=256,
                   help="iBOT head bottleneck (OpenMidnight keeps DINOv2's ibot.head_bottleneck_dim 256)")
    g.add_argument("--recompute", default=None, choices=["none", "selective", "full"],
                   help="activation memory for compute (default: selective with --compile, else none); 'full' "
                   "reruns each block in the backward pass (~1/3 more student compute) if CUDA runs out of memory")
    g = p.add_argument_group("losses")
    g.add_argument("--centering", default="sinkhorn_knopp", choices=["sinkhorn_knopp", "centering"],
                   help="teacher targets: Sinkhorn-Knopp (recipe) or DINO's softmax with an EMA centre")
    g.add_argument("--student-temp", type=bounded(float, 1e-3, 1.0), default=0.1, help="0.1 in DINOv2")
    g.add_argument("--teacher-temp", type=bounded(float, 1e-3, 1.0), default=0.07,
                   help="final teacher temperature; above ~0.07 targets get flat and training can collapse")
    g.add_argument("--warmup-teacher-temp", type=bounded(float, 1e-3, 1.0), default=0.04,
                   help="teacher temperature at step 0, linear to --teacher-temp")
    g.add_argument("--teacher-temp-warmup-steps", type=bounded(int, 0), default=37_500,
                   help="steps of the teacher-temperature warmup (not stretched with the schedules)")
    g.add_argument("--ibot-weight", type=bounded(float, 0.0), default=1.0, help="iBOT loss weight (0 = off)")
    g.add_argument("--mask-ratio", type=bounded(float, 0.0, 1.0), nargs=2, default=(0.1, 0.45),
                   help="iBOT masked fraction range of a masked crop (DINOv2 0.1-0.5)")
    g.add_argument("--mask-prob", type=bounded(float, 0.0, 1.0), default=0.5,
                   help="fraction of global crops that get iBOT masks")
    g.add_argument("--kde-weight", type=bounded(float, 0.0), default=0.05, help="per global crop; 0 = off")
    g.add_argument("--kde-kappa", type=bounded(float, 0.0), default=5.0,
                   help="vMF kernel concentration (OpenMidnight's constant; not stated in the Midnight paper)")
    g.add_argument("--koleo-weight", type=bounded(float, 0.0), default=0.0, help="DINOv2's KoLeo; 0.1 in DINOv2")
    g = p.add_argument_group("optimisation (schedules in steps)")
    g.add_argument("--steps", type=bounded(int, 1), default=250_000, help="length of this run (its early-stop step)")
    g.add_argument("--schedule-steps", type=bounded(int, 1), default=None,
                   help="length of the cosine schedules (default --steps; OpenMidnight@blog stretched them to 10M)")
    g.add_argument("--batch-size", type=bounded(int, 1), default=48,
                   help="per process; ViT-g at 48 fits 80 GB with the default selective recompute")
    g.add_argument("--base-lr", type=bounded(float, 0.0), default=2e-4,
                   help="scaled by sqrt(global batch / 1024); 3.5e-4 collapsed ViT-g for OpenMidnight")
    g.add_argument("--min-lr", type=bounded(float, 0.0), default=1e-6, help="end of the lr cosine")
    g.add_argument("--warmup-steps", type=bounded(int, 0), default=12_500,
                   help="linear lr warmup; much shorter than ~5%% of the run risks early collapse")
    g.add_argument("--weight-decay", type=bounded(float, 0.0), default=0.04, help="start of the cosine to the end")
    g.add_argument("--weight-decay-end", type=bounded(float, 0.0), default=0.2, help="end of the weight-decay cosine")
    g.add_argument("--momentum-teacher", type=bounded(float, 0.0, 1.0), default=0.994,
                   help="teacher EMA start, cosine to 1; 0.99-0.999 (lower for small batches, per DINO)")
    g.add_argument("--layerwise-decay", type=bounded(float, 0.0, 1.0), default=1.0,
                   help="lr x decay^(depth - block); 1 = off (recipe), 0.9 = DINOv2's default")
    g.add_argument("--patch-embed-lr-mult", type=bounded(float, 0.0), default=0.2,
                   help="the patch embedding learns 5x slower")
    g.add_argument("--freeze-last-layer-steps", type=bounded(int, 0), default=1250,
                   help="prototype layers' lr held at 0")
    g.add_argument("--clip-grad", type=bounded(float, 0.0), default=3.0,
                   help="gradient-norm clip per part (backbone, each head); grad_norm_* often above it = lr too high")
    g.add_argument("--max-bad-steps", type=bounded(int, 1), default=10, help="abort after this many non-finite steps "
                   "in a row")
    g = p.add_argument_group("augmentation (RECIPE.md §6)")
    g.add_argument("--global-size", type=bounded(int, 1), default=224, help="global crop side (a patch-size multiple)")
    g.add_argument("--local-size", type=bounded(int, 1), default=98, help="local crop side (a patch-size multiple)")
    g.add_argument("--n-local-crops", type=bounded(int, 1), default=8, help="local crops per sample")
    g.add_argument("--hed-prob", type=bounded(float, 0.0, 1.0), default=0.5, help="HED jitter probability per crop")
    g.add_argument("--hed-range", type=bounded(float, 0.0, 1.0), default=0.05,
                   help="HED offset range per stain; 0.05 is already strong (~0.7 optical density)")
    g.add_argument("--norm", default="imagenet", choices=sorted(augment.NORMS),
                   help="input normalisation; the one --init's model was trained with (H-optimus-0: hoptimus)")
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
    g.add_argument("--workers", type=bounded(int, 0), default=8,
                   help="loader workers per process; raise it if data_time_frac in the log stays above ~0.05")
    g.add_argument("--seed", type=bounded(int, 0), default=0, help="seeds the init, the data order and the crops")
    g.add_argument("--dist-timeout", type=bounded(float, 1.0), default=3600.0,
                   help="seconds a rank waits at a collective before the job stops with a message; it must cover the "
                   "longest work rank 0 does alone: a ViT-g checkpoint (~20 GB) or export on slow shared storage, "
                   "a probe (NCCL's own default, 600 s, can kill a healthy job)")
    g = p.add_argument_group("reproduce the released run's quirks (RECIPE.md §11); the defaults fix them")
    g.add_argument("--random-pos-embed", action="store_true",
                   help="do not load the pretrained pos-embed (OpenMidnight@blog: a random 16x16 init)")
    g.add_argument("--interpolate-antialias", type=int, default=1, choices=[0, 1],
                   help="pos-embed resizing for local crops (hub reg4: 1; OpenMidnight@blog ran 0 with offset 0.1)")
    g.add_argument("--interpolate-offset", type=bounded(float, 0.0, 1.0), default=0.0,
                   help="DINO's historic +0.1 in the local-crop pos-embed scale factor (0 = hub reg4)")
    g.add_argument("--kde-variant", default="spread", choices=["spread", "openmidnight"],
                   help="'openmidnight' reproduces the released run's sign, which pulls CLS tokens together")
    return p


def parse_args(argv=None):
    """Presets, then flags, then the derived defaults; contradictory flags fail here (paths: check_paths). --help
    shows the defaults of the --preset given with it (the demo's without one)."""
    parser = get_args_parser()
    pre, _ = get_args_parser(add_help=False).parse_known_args(argv)
    parser.set_defaults(**PRESETS[pre.preset])
    args = parser.parse_args(argv)
    args.out = args.out or os.path.join("runs", args.preset)
    args.schedule_steps = args.schedule_steps or args.steps
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.compile = args.device == "cuda" if args.compile is None else bool(args.compile)
    args.recompute = args.recompute or ("selective" if args.compile else "none")
    args.gpu_augment = args.device == "cuda" if args.gpu_augment is None else bool(args.gpu_augment)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no GPU")
    if args.probe_every and not (args.probe_data or args.preset == "demo"):
        parser.error("--probe-every needs --probe-data")
    if (args.kde_weight or args.koleo_weight) and args.batch_size < 2:
        parser.error("KDE / KoLeo compare the samples of a batch: use --batch-size >= 2 or set their weight to 0")
    if args.mask_ratio[0] > args.mask_ratio[1]:
        parser.error(f"--mask-ratio {args.mask_ratio[0]} {args.mask_ratio[1]}: give the smaller ratio first")
    for flag, size in (("--global-size", args.global_size), ("--local-size", args.local_size)):
        if size % args.patch_size:
            parser.error(f"{flag} {size} is not a multiple of --patch-size {args.patch_size}")
    return args


def check_paths(args):
    """The inputs a run needs, checked before anything is built."""
    if args.data is None and args.preset != "demo":
        raise SystemExit("--data STORE is required (make one with prepare_patches.py)")
    if args.preset.startswith("openmidnight") and not args.init:
        raise SystemExit("the openmidnight presets start from DINOv2 weights: give --init "
                         "dinov2_vitg14_reg4_pretrain.pth")
    problem = args.init and checkpoint_problem(args.init)
    if problem:
        raise SystemExit(f"--init {problem}")


# -----------------------------------------------------------------------------
# schedules (DINOv2's CosineScheduler, in steps)


def cosine_schedule(step, base, final, total, warmup=0):
    """Linear warmup 0 -> base over `warmup` steps (np.linspace's endpoints), then a half cosine base -> final
    ending at `total`; final afterwards."""
    if step < warmup:
        return base * step / max(warmup - 1, 1)
    t, T = step - warmup, total - warmup
    return final if t >= T else final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / T))


def schedules(step, args, world_size):
    lr = args.base_lr * math.sqrt(args.batch_size * world_size / 1024)  # DINOv2's sqrt_wrt_1024 rule
    lr_now = cosine_schedule(step, lr, args.min_lr, args.schedule_steps, args.warmup_steps)
    return {
        "lr": lr_now,
        "last_layer_lr": lr_now if step >= args.freeze_last_layer_steps else 0.0,  # prototypes frozen at first
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


def checkpoint_shape(args):
    """The backbone's shape: the flags', or with --init the checkpoint's (any layout, any size). Model flags left at
    the preset's defaults follow the checkpoint (and are written back into args, so args.json and the iBOT mask
    grid follow it too); a flag set to another value must agree with it. Returns (shape, the checkpoint's
    state dict or None)."""
    shape = dict(arch=args.arch, patch_size=args.patch_size, num_register_tokens=args.registers, ffn=args.ffn)
    if not args.init:
        return shape, None
    sd, found = read_checkpoint(args.init)
    defaults = get_args_parser(add_help=False)
    defaults.set_defaults(**PRESETS[args.preset])
    for flag, key in (("arch", "arch"), ("ffn", "ffn"), ("registers", "num_register_tokens"),
                      ("patch_size", "patch_size")):
        if getattr(args, flag) not in (defaults.get_default(flag), found[key]):
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)} contradicts --init {args.init}: it "
                             f"holds a {found['arch']} (ffn {found['ffn']}, {found['num_register_tokens']} "
                             f"registers, patch {found['patch_size']}); drop the flag")
    for flag, size in (("--global-size", args.global_size), ("--local-size", args.local_size)):
        if size % found["patch_size"]:
            raise SystemExit(f"{flag} {size} is not a multiple of --init's patch size {found['patch_size']}")
    args.arch, args.ffn, args.registers, args.patch_size = (found[k] for k in ("arch", "ffn", "num_register_tokens",
                                                                              "patch_size"))
    return {k: found[k] for k in ("arch", "embed_dim", "depth", "num_heads", "patch_size", "num_register_tokens",
                                  "ffn", "ffn_hidden")}, sd


def build_models(args):
    """Student and teacher: backbone + separate DINO and iBOT heads; the backbone from --init when given."""
    shape, sd = checkpoint_shape(args)

    def backbone(drop_path):
        return ViT(img_size=args.global_size, layerscale_init=args.layerscale, drop_path_rate=drop_path,
                   interpolate_antialias=bool(args.interpolate_antialias),
                   interpolate_offset=args.interpolate_offset, recompute=args.recompute, **shape)

    def heads(D):  # separate DINO and iBOT heads, as OpenMidnight (ibot.separate_head), each with its bottleneck
        return [DINOHead(D, args.n_prototypes, args.head_hidden, bottleneck)
                for bottleneck in (args.dino_head_bottleneck, args.ibot_head_bottleneck)]

    student_backbone = backbone(args.drop_path)
    student = MetaArch(student_backbone, *heads(student_backbone.embed_dim))
    if sd is not None:  # pretrained backbone; heads start fresh (the public models are backbones only)
        if args.random_pos_embed:
            sd["pos_embed"] = student.backbone.pos_embed.detach().clone()
        load_into(student.backbone, sd)  # resizes 37x37 -> 16x16 once; clear error on a wrong arch
    teacher = MetaArch(backbone(0.0), *heads(student_backbone.embed_dim))
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


@dataclass
class TrainState:
    """What a training step changes and a checkpoint holds (student_ddp is the student under DDP, or itself)."""
    student: nn.Module
    student_ddp: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    centers: dict
    world_size: int = 1
    step: int = 0
    skipped: int = 0


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
    student_ddp = DDP(student, device_ids=[local] if args.device == "cuda" else None,
                      gradient_as_bucket_view=True) if world > 1 else student  # grads live in DDP's buckets
    centers = {k: torch.zeros(1, args.n_prototypes, device=device) for k in ("dino", "ibot")}
    return TrainState(student, student_ddp, teacher, opt, centers, world)


# -----------------------------------------------------------------------------
# one training step


def prepare_batch(batch, args, device, aug_cfg):
    """Move a batch to the device; with --gpu-augment the colour ops and normalisation run here, batched."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for kind in ("global", "local"):
        if out[f"{kind}_crops"].dtype == torch.uint8:
            out[f"{kind}_crops"] = augment.finish_crops(out[f"{kind}_crops"], out[f"{kind}_params"], aug_cfg)
    return out


def compute_losses(student, teacher, batch, sched, args, centers):
    """Teacher targets, student outputs, and the recipe's loss terms (RECIPE.md §4), plus collapse signals."""
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
    s = student(g, batch["local_crops"], batch["masks"], batch["mask_indices"])
    health = {**L.collapse_signals(t_dino, s["dino_global"].detach(), sched["teacher_temp"], args.student_temp),
              "cls_std": s["global_cls"].detach().float().std(0).mean()}
    del t, t_dino  # the teacher's logits ([masked tokens, K]: ~0.9 GB on ViT-g) are not needed past the targets
    # DINO: the mean over the (teacher view, student view) pairs that never pair a view with itself: 2 global
    # teacher views x (n local + the other global) = 2n + 2 pairs. dino_loss sums its pairs; the global term is a
    # mean over the 2B rows of [g1; g2], i.e. half the sum of its two pairs, hence x 2.
    n_terms = 2 * args.n_local_crops + 2
    terms = {
        "dino_local": L.dino_loss(s["dino_local"].chunk(args.n_local_crops), q_dino.chunk(2),
                                  args.student_temp) / n_terms,
        "dino_global": L.dino_loss([s["dino_global"]], [q_dino], args.student_temp) * 2 / n_terms,
        "ibot": args.ibot_weight * L.ibot_loss(s["ibot"], q_ibot, batch["masks_weight"], g.shape[0],
                                               args.student_temp),
    }
    views = s["global_cls"].chunk(2)  # the regularisers compare the samples within each global view
    if args.kde_weight:
        terms["kde"] = args.kde_weight * sum(L.kde_loss(v, args.kde_kappa, args.kde_variant) for v in views)
    if args.koleo_weight:
        terms["koleo"] = args.koleo_weight * sum(L.koleo_loss(v) for v in views)
    return terms, health


def train_step(st, batch, args):
    """Forward, backward, clip, AdamW, EMA at step st.step. A non-finite loss or gradient skips the update (the
    same on every rank, since gradients are all-reduced before the check)."""
    sched = schedules(st.step, args, st.world_size)
    for group in st.opt.param_groups:
        group["lr"] = (sched["last_layer_lr"] if group["last_layer"] else sched["lr"]) * group["lr_mult"]
        group["weight_decay"] = sched["wd"] * group["wd_mult"]
    with autocast(args.device, args.dtype):
        terms, health = compute_losses(st.student_ddp, st.teacher, batch, sched, args, st.centers)
    total = sum(terms.values())
    st.opt.zero_grad(set_to_none=True)
    total.backward()
    norms = {f"grad_norm_{name}": nn.utils.clip_grad_norm_(getattr(st.student, name).parameters(), args.clip_grad)
             for name in ("backbone", "dino_head", "ibot_head")}
    finite = bool(torch.isfinite(torch.stack([total.detach(), *norms.values()])).all())  # one sync per step
    if finite:
        st.opt.step()
        ema_update(st.teacher, st.student, sched["momentum"])
    else:
        st.skipped += 1
    st.step += 1
    out = {"loss": total, **terms, **norms, **health}
    return {k: v.detach() for k, v in out.items()}, sched, finite


# -----------------------------------------------------------------------------
# the run directory: one job at a time, crash-safe checkpoints, exports


def lock_run_dir(out):
    """An exclusive lock on --out until the process exits: a second job on the same directory would interleave
    metrics.jsonl and rotate the first one's checkpoints."""
    lock = lock_folder(out, what="another training process")
    for tmp in glob.glob(os.path.join(out, ".*.tmp*")) + glob.glob(os.path.join(out, "exports", ".*.tmp*")):
        os.remove(tmp)  # a killed run's half-written files: never read; ours now that we hold the lock
    return lock


def checkpoint_files(out):
    """Resumable checkpoints of a run, newest first: checkpoint-<step>.pt by step (checkpoint.pt, the latest, is a
    link to the newest of them), then checkpoint.pt itself, for a run whose numbered files are gone."""
    numbered = sorted(glob.glob(os.path.join(out, "checkpoint-*.pt")), reverse=True)  # zero-padded steps
    latest = os.path.join(out, "checkpoint.pt")
    return numbered + ([latest] if os.path.exists(latest) else [])


def rng_states(world):
    """Every rank's random generators (drop path draws differ per rank), gathered on every rank."""
    state = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    states = [state] * world
    if world > 1:
        dist.all_gather_object(states, state)
    return states


def save_checkpoint(st, args, rng):
    """checkpoint-<step>.pt is written atomically and read back, then checkpoint.pt becomes a hard link to it (an
    atomic rename; no copy), and only then are numbered checkpoints beyond --keep-checkpoints removed. At every
    moment a complete checkpoint is on disk; a failed write (a full disk) leaves the previous ones untouched."""
    ckpt = {"student": st.student.state_dict(), "teacher": st.teacher.state_dict(),
            "optimizer": st.opt.state_dict(), "centers": st.centers, "step": st.step, "skipped_steps": st.skipped,
            "args": vars(args), "rng": rng, "world_size": st.world_size}
    size = 16 * sum(p.numel() for p in st.student.parameters())  # fp32 student, 2 AdamW moments, teacher
    path = os.path.join(args.out, f"checkpoint-{st.step:07d}.pt")
    save_or_stop(ckpt, path, size, st.step)
    if torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"] != st.step:  # known good first
        raise SystemExit(f"{path} does not read back as step {st.step}: check the filesystem; earlier checkpoints "
                         "are kept")
    link_latest(path, args)


def link_latest(path, args):
    """checkpoint.pt becomes a hard link to the numbered checkpoint `path` (an atomic rename; no copy), then older
    numbered checkpoints beyond --keep-checkpoints are removed. Also run on resume: a kill between a checkpoint and
    its link would otherwise leave checkpoint.pt on an older step."""
    latest = os.path.join(args.out, "checkpoint.pt")
    if not (os.path.exists(latest) and os.path.samefile(path, latest)):
        link = os.path.join(args.out, ".checkpoint.pt.link")
        if os.path.exists(link):
            os.remove(link)
        try:
            os.link(path, link)
        except OSError:  # a filesystem without hard links: a copy
            atomic_write(link, lambda f: f.write(open(path, "rb").read()), size_hint=os.path.getsize(path))
        os.replace(link, latest)
    older = sorted(f for f in glob.glob(os.path.join(args.out, "checkpoint-*.pt")) if os.path.basename(f) <
                   os.path.basename(path))  # zero-padded steps; a newer (unreadable) one is never touched
    for old in older[:len(older) - args.keep_checkpoints]:
        os.remove(old)


SCHEDULE_FLAGS = ("base_lr", "min_lr", "warmup_steps", "schedule_steps", "weight_decay", "weight_decay_end",
                  "momentum_teacher", "warmup_teacher_temp", "teacher_temp", "teacher_temp_warmup_steps",
                  "freeze_last_layer_steps")  # and the global batch, through the lr's square-root scaling


def check_schedules(ckpt, args, world, path):
    """A resume must not move the schedules silently: `--steps 30` after a 20-step run stretches schedule_steps
    (it follows --steps unless given) and so jumps the lr, weight decay and teacher momentum. Refused unless
    --change-schedules, saying which flags changed and what moves at the resumed step."""
    theirs = ckpt["args"]
    changed = [f"--{k.replace('_', '-')} {theirs[k]} -> {getattr(args, k)}" for k in SCHEDULE_FLAGS
               if k in theirs and theirs[k] != getattr(args, k)]
    their_world = ckpt.get("world_size", world)
    if theirs["batch_size"] * their_world != args.batch_size * world:
        changed.append(f"global batch {theirs['batch_size'] * their_world} -> {args.batch_size * world} "
                       "(the lr scales with its square root)")
    if not changed or args.change_schedules:
        return
    old = argparse.Namespace(**{**vars(args), **{k: theirs[k] for k in SCHEDULE_FLAGS if k in theirs}})
    a, b = schedules(ckpt["step"], old, their_world), schedules(ckpt["step"], args, world)
    moves = ", ".join(f"{k} {a[k]:.3g} -> {b[k]:.3g}" for k in a if not math.isclose(a[k], b[k], rel_tol=1e-9))
    keep = f" --schedule-steps {theirs['schedule_steps']}" if "schedule_steps" in theirs else ""
    raise SystemExit(f"resuming {path} at step {ckpt['step']} would change its schedules: {'; '.join(changed)} (at "
                     f"that step: {moves or 'nothing moves yet'}). To lengthen the run on the same schedules, give "
                     f"its flags again{keep and ', e.g.' + keep} (past its end the lr stays at --min-lr); to change "
                     "them on purpose, add --change-schedules")


def resume(st, args, rank):
    """Load the newest readable checkpoint of --out into st. An unreadable one (truncated, corrupt) is reported
    and skipped, never deleted; if checkpoints exist but none loads, the run stops instead of starting over (which
    would overwrite them): --no-resume starts over deliberately."""
    if args.no_resume:
        return
    unreadable = []
    for path in checkpoint_files(args.out):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # 8 ranks share the page cache
        except Exception as e:
            unreadable.append(f"{path} ({type(e).__name__}: {str(e)[:120]})")
            continue
        check_schedules(ckpt, args, st.world_size, path)
        try:
            st.student.load_state_dict(ckpt["student"])
            st.teacher.load_state_dict(ckpt["teacher"])
            st.opt.load_state_dict(ckpt["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise SystemExit(f"{path} does not fit this run's model or optimizer (written with other flags?): "
                             f"{str(e)[:300]}\nrun with the flags of {os.path.join(args.out, 'args.json')}, "
                             "another --out, or --no-resume") from None
        st.centers = {k: v.to(st.centers[k].device) for k, v in ckpt["centers"].items()}
        st.step, st.skipped = ckpt["step"], ckpt.get("skipped_steps", 0)
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # per rank (one dict: older runs)
        rng = rngs[rank] if rank < len(rngs) else rngs[0]  # another number of ranks: their streams differ anyway
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        if rank == 0:
            for bad in unreadable:
                print(f"skipped unreadable checkpoint {bad}")
            print(f"resumed from {path} at step {st.step}")
            if os.path.basename(path) != "checkpoint.pt":
                link_latest(path, args)
        return
    if unreadable:
        raise SystemExit("no readable checkpoint in " + args.out + ":\n  " + "\n  ".join(unreadable) +
                         "\nthey are kept; --no-resume starts over from step 0 (and will replace them)")


def save_or_stop(obj, path, size, step):
    """torch.save through the atomic write; a failure (a full disk) stops the run with its cause, earlier files
    untouched, rather than training on without a way back."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f), size_hint=size)
    except OSError as e:
        raise SystemExit(f"step {step}: {e}\ntraining stopped; a rerun resumes from the newest checkpoint") from None


def export_teacher(st, args):
    """The teacher backbone in the DINOv2 hub layout (fp32): teacher_backbone.pth and
    exports/teacher_backbone_<step>.pth, strict-loadable by model.py and DINOv2's own code, each with timm's
    config.json beside it (whose model_args tell model.read_checkpoint the number of heads); then model/, the
    folder timm and the Hugging Face Hub load, with its model card (export.py), its weights a hard link."""
    backbone = st.teacher.backbone
    sd = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    config = json.dumps(export.timm_config(infer_config(sd, backbone.num_heads), args.norm), indent=1).encode()
    for folder, name in ((args.out, "teacher_backbone.pth"), (os.path.join(args.out, "exports"),
                                                            f"teacher_backbone_{st.step:07d}.pth")):
        os.makedirs(folder, exist_ok=True)
        save_or_stop(sd, os.path.join(folder, name), sum(v.numel() * 4 for v in sd.values()), st.step)
        atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(config))
    export_model(st, args, sd)


def export_model(st, args, sd=None):
    """--out/model: timm's layout with the model card (export.py), pytorch_model.bin a hard link to
    teacher_backbone.pth when it holds the same tensors."""
    results = None
    if args.results:
        with open(args.results) as f:
            results = json.load(f)
    same = sd is not None or st.step == args.steps  # a finished run's teacher is its last export
    sd = sd or {k: v.detach().float().cpu() for k, v in st.teacher.backbone.state_dict().items()}
    try:
        export.write_model_folder(os.path.join(args.out, "model"), sd, infer_config(sd, st.teacher.backbone.num_heads),
                                  args.norm, training_info(st, args), results, args.safetensors,
                                  weights_file=os.path.join(args.out, "teacher_backbone.pth") if same else None)
    except OSError as e:
        raise SystemExit(f"step {st.step}: {e}\ntraining stopped; a rerun resumes from the newest checkpoint") from None


NOT_RECIPE = ("preset", "out", "data", "init", "no_resume", "change_schedules", "log_every", "checkpoint_every",
              "keep_checkpoints", "export_every", "probe_data", "probe_every", "probe_size", "results", "safetensors",
              "wandb", "device", "dtype", "compile", "fused_adamw", "zero", "workers", "seed", "dist_timeout",
              "recompute", "gpu_augment")  # where and how fast a run goes, not what it learns


def training_info(st, args):
    """What the model card tells of the run: its arguments, the recipe's settings that differ from OpenMidnight's
    (the openmidnight preset, the released run's bugs fixed), and its data (the store's manifest)."""
    om = vars(parse_args(["--preset", "openmidnight", "--data", "-", "--init", "-", "--device", "cpu"]))
    mine = vars(args)
    with open(os.path.join(args.data, "manifest.json")) as f:
        manifest = json.load(f)
    return {"name": os.path.basename(os.path.abspath(args.out)), "args": mine, "steps_done": st.step,
            "world_size": st.world_size,
            "deviations": [[k, mine[k], om[k]] for k in sorted(mine) if k not in NOT_RECIPE and mine[k] != om.get(k)],
            "data": {"store": os.path.abspath(args.data), "slides": len(manifest["shards"]),
                     "patches": manifest["n_patches"], "format": manifest.get("format"),
                     "patch_size": manifest.get("patch_size"), "sampling": manifest.get("sampling"),
                     "examples": [os.path.basename(s["slide"]) for s in manifest["shards"][:3]]}}


# -----------------------------------------------------------------------------
# the run's stages


def setup_distributed(args):
    """nanoGPT-style: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process."""
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device(args.device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    timeout = datetime.timedelta(seconds=args.dist_timeout)
    # torchrun --max-restarts keeps one key-value store for all its attempts: a restarted group could read the dead
    # attempt's addresses and fail or hang while connecting (seen with gloo), so each attempt gets its own keys
    shared = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # hosted by torchrun, else by rank 0
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not shared, timeout=timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo", timeout=timeout, rank=rank,
                            world_size=world, store=dist.PrefixStore(f"nanopath/attempt{attempt}", store))
    if args.device == "cuda":
        torch.cuda.set_device(local)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return rank, world, local, torch.device(args.device, local) if args.device == "cuda" else torch.device("cpu")


@contextlib.contextmanager
def collective_failures(rank, args, world):
    """Under torchrun, a collective that fails ends this rank with one line that says why and what to do, not a
    C++ traceback: it waited past --dist-timeout (the others were busy: rank 0 writes checkpoints and exports and
    runs probes alone), or another rank died. (NCCL's watchdog may abort the process itself at the timeout.)"""
    try:
        yield
    except RuntimeError as e:  # gloo's and NCCL's errors, torch.distributed.DistError among them
        text = str(e)
        timed_out = "timed out" in text.lower()
        if world == 1 or not (timed_out or "closed by peer" in text or "reset by peer" in text or
                              isinstance(e, dist.DistError)):
            raise
        resume = "rerunning the same command (or torchrun --max-restarts) resumes from the newest checkpoint"
        why = (f"waited more than --dist-timeout {args.dist_timeout:g} s at a collective: another rank was busy "
               "(rank 0 writes checkpoints and exports and runs probes alone; on slow storage raise --dist-timeout "
               "or put --out on faster storage) or is gone" if timed_out else
               "another rank stopped during a collective (its own message says why)")
        raise SystemExit(f"rank {rank}: {why}; {resume} [{text.splitlines()[0][:200]}]") from None


def open_store(args, master, world):
    """The patch store, opened by rank 0 first (which builds its index if it was written before index.npy existed).
    With no --data, the demo makes its own from the bundled slide (prepare_patches.py --demo: a store and a
    labelled probe set); any --data given must be a finished store."""
    if args.data is None:
        args.data = os.path.join(HERE, "data", "sample_store")
        args.probe_data = args.probe_data or os.path.join(HERE, "data", "sample_probe")
        if master and not os.path.exists(os.path.join(args.probe_data, "DONE")):
            subprocess.run([sys.executable, os.path.join(HERE, "prepare_patches.py"), "--demo", "--out", args.data,
                            "--probe-out", args.probe_data], check=True)
    store = data.PatchStore(args.data) if master else None  # builds the store's index if it has none yet
    if world > 1:
        dist.barrier()  # the other ranks wait for it (--dist-timeout), then map the same index.npy
    if store is None:
        store = data.PatchStore(args.data, check_shards=False)
    if len(store) == 0:
        raise SystemExit(f"the patch store {args.data} holds no patches (see its report.json for why every slide "
                         "was skipped)")
    return store


def augment_config(args):
    return replace(augment.AugmentConfig(), global_size=args.global_size, local_size=args.local_size,
                   n_local_crops=args.n_local_crops, hed_prob=args.hed_prob, hed_range=args.hed_range,
                   mean=augment.NORMS[args.norm][0], std=augment.NORMS[args.norm][1])


def describe_run(args, world, n_patches):
    global_batch = args.batch_size * world
    scaled = args.base_lr * math.sqrt(global_batch / 1024)
    end = min(args.warmup_steps, args.steps - 1)  # the warmup's top, or the run's last step if it comes first
    peak = max(schedules(s, args, world)["lr"] for s in {max(end - 1, 0), end})
    never = "" if math.isclose(peak, scaled) else f"; the warmup of {args.warmup_steps} steps outlasts the run"
    print(json.dumps(vars(args), indent=1, sort_keys=True))
    print(f"world {world} x batch {args.batch_size} = global batch {global_batch}; {args.steps} steps = "
          f"{args.steps * global_batch:,} images = {args.steps * global_batch / n_patches:.2f} passes over "
          f"{n_patches:,} patches; lr peaks at {peak:.3e} (base {args.base_lr} x sqrt({global_batch}/1024) = "
          f"{scaled:.3e}{never}); schedules over {args.schedule_steps} steps; "
          f"autocast {args.dtype}; colour ops on {'device' if args.gpu_augment else 'loader workers'}")
    atomic_write(os.path.join(args.out, "args.json"), lambda f: f.write(json.dumps(vars(args), indent=1).encode()))


class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the checkpoint's step (written by a
    run that then crashed) and a line cut short by a kill are dropped, so the file reads as one run; a fresh start
    empties it."""

    def __init__(self, out, step, args):
        self.path = os.path.join(out, "metrics.jsonl")
        lines = []
        if step and os.path.exists(self.path):
            with open(self.path) as f:
                lines = [ln for ln in f if ln.endswith("\n") and json.loads(ln).get("step", 0) <= step]
        atomic_write(self.path, lambda f: f.write("".join(lines).encode()))
        self.file = open(self.path, "a")
        self.t_last, self.data_time = time.time(), 0.0
        self.wandb = start_wandb(args, resumed=step > 0) if args.wandb else None

    def write(self, record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb:  # the same record; W&B keeps its own step axis
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self, failed=False):
        self.file.close()
        if self.wandb:
            self.wandb.finish(exit_code=1 if failed else 0)


def start_wandb(args, resumed):
    """--wandb PROJECT: a W&B run with the resolved arguments as its config. Its id is kept in --out/wandb_id: a
    resumed run continues the same W&B run (the steps it redoes after a crash are logged again), a fresh start
    begins a new one. wandb is imported only here."""
    try:
        import wandb
    except ImportError:
        raise SystemExit("--wandb needs the wandb package: pip install wandb (or leave --wandb out)") from None
    path = os.path.join(args.out, "wandb_id")
    run_id = None
    if resumed and os.path.exists(path):
        with open(path) as f:
            run_id = f.read().strip()
    run = wandb.init(project=args.wandb, id=run_id, resume="allow", config=vars(args), dir=args.out,
                     name=os.path.basename(os.path.abspath(args.out)))
    atomic_write(path, lambda f: f.write(run.id.encode()))
    return run


def reduce_metrics(out, wins, world):
    """The logged terms as global-batch means (each rank's loss is its local mean), and prototype usage over the
    logging window: `wins` counts each prototype's teacher argmax wins over every step since the last log line,
    summed over ranks. One step's count is capped by its teacher crops (16 in the demo, 768 of 131,072 prototypes
    at OpenMidnight's global batch) and Sinkhorn-Knopp keeps it at that cap, so only a window can show a fall."""
    vals = torch.stack([out[k].float() for k in out])
    wins = wins.float()
    if world > 1:
        dist.all_reduce(vals)
        dist.all_reduce(wins)
    p = wins[wins > 0] / wins.sum()
    return {**dict(zip(out, (vals / world).tolist())), "prototypes_used": int((wins > 0).sum()),
            "prototype_entropy": float(-(p * p.log()).sum())}


class StopSignals:
    """SIGTERM / SIGUSR1 (cluster pre-emption) ask for a checkpoint and a clean exit; the previous handlers come
    back when the run ends."""

    def __enter__(self):
        self.received = None
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agreed(self, step, args, world, device):
        """Any rank's signal stops every rank at the same step: agreed at log steps (a device sync) under DDP."""
        if world == 1:
            return self.received is not None
        if step % args.log_every:
            return False
        flag = torch.tensor(float(self.received is not None), device=device)
        dist.all_reduce(flag)
        return flag.item() > 0


def initial_backbone(args):
    """The student's backbone at step 0, rebuilt from the seed: the demo's 'before training' baseline."""
    torch.manual_seed(args.seed)
    return build_models(args)[1].backbone


def run_probe(backbone, args, step, log, baseline=None):
    """eval_probe's kNN of a backbone at --probe-size, on rank 0 between steps (and, for the demo, of the initial
    weights beside it)."""
    res = eval_probe.quick_knn(backbone, args.probe_data, args.probe_size, args.device)
    note = ""
    if baseline is not None:
        res["initial_weights"] = eval_probe.quick_knn(baseline.to(args.device), args.probe_data, args.probe_size,
                                                      args.device)
        note = f" (the same ViT before training: {res['initial_weights']['balanced_accuracy']:.3f})"
    log.write({"step": step, "probe": res})
    tqdm.write(f"step {step}: teacher kNN balanced accuracy {res['balanced_accuracy']:.3f} on {res['n_test']} "
               f"held-out images of {os.path.relpath(args.probe_data)} at {args.probe_size} px{note}")


def main(argv=None):
    # 1. set up: processes and devices, the run directory (locked: one job at a time, released however it ends)
    args = parse_args(argv)
    check_paths(args)
    rank, world, local, device = setup_distributed(args)
    lock = lock_run_dir(args.out) if rank == 0 else None
    log = None
    try:
        # 2. the patch store (rank 0 may fail opening it while the others wait)
        with collective_failures(rank, args, world):
            store = open_store(args, rank == 0, world)
        # 3. the student, the teacher and the optimizer, resumed from the newest readable checkpoint
        st = build_state(args, device, rank, world, local)
        resume(st, args, rank)
        if rank == 0:
            log = MetricsLog(args.out, st.step, args)  # metrics.jsonl, and W&B with --wandb
            describe_run(args, world, len(store))
        run(st, store, log, args, rank, world, device)
    finally:
        if log:
            log.close(failed=sys.exc_info()[0] is not None)
        if lock:
            lock.close()


def run(st, store, log, args, rank, world, device):
    master, aug_cfg, finished = rank == 0, augment_config(args), st.step == args.steps
    loader = data.make_loader(store, args.batch_size, aug_cfg, args.seed, rank, world, st.step * args.batch_size,
                              on_device=args.gpu_augment, workers=args.workers, pin_memory=args.device == "cuda",
                              mask_ratio=tuple(args.mask_ratio), mask_prob=args.mask_prob, patch_size=args.patch_size)
    # 4. the loop
    bar = progress(total=args.steps, initial=st.step, disable=not master, dynamic_ncols=True, desc="steps",
                   unit="step", every=None)  # in a log file: write_metrics' lines instead
    batches, bad_in_a_row, wins = iter(loader), 0, None
    with StopSignals() as stop, collective_failures(rank, args, world):
        while st.step < args.steps:
            t0 = time.time()  # data: the next batch, moved to the device (colour ops there with --gpu-augment)
            batch = prepare_batch(next(batches), args, device, aug_cfg)
            if master:
                log.data_time += time.time() - t0
            out, sched, finite = train_step(st, batch, args)  # the step, skipped if anything is non-finite
            bad_in_a_row = 0 if finite else report_bad_step(out, batch, st, bad_in_a_row + 1, args)
            step_wins = out.pop("prototype_wins")  # summed over the logging window: one step's count is capped
            wins = step_wins if wins is None else wins + step_wins  # at its number of teacher crops
            if st.step % args.log_every == 0 or st.step == args.steps:  # every rank joins the all-reduce
                metrics = reduce_metrics(out, wins, world)
                wins = None
                if master:
                    write_metrics(log, metrics, sched, st, args, world, bar)
            bar.update()
            stopping = stop.agreed(st.step, args, world, device)
            # what is due at this step (export, probe) is written before its checkpoint: a crash anywhere before
            # the checkpoint is complete resumes from an earlier step and redoes it all
            if master and (st.step % args.export_every == 0 or st.step == args.steps):
                export_teacher(st, args)
            if master and args.probe_every and st.step % args.probe_every == 0:
                run_probe(st.teacher.backbone, args, st.step, log)
            if st.step % args.checkpoint_every == 0 or st.step == args.steps or stopping:
                rng = rng_states(world)
                if hasattr(st.opt, "consolidate_state_dict"):  # ZeRO-1: every rank sends its shard to rank 0
                    st.opt.consolidate_state_dict(to=0)
                if master:
                    save_checkpoint(st, args, rng)
            if stopping:
                tqdm.write(f"signal {stop.received}: checkpoint written at step {st.step}; exiting")
                break
    # 5. finish: the demo ends with its probe, beside the same ViT before training; a finished run given --results
    # again puts them in its model card
    bar.close()
    if master and args.preset == "demo" and st.step == args.steps:
        run_probe(st.teacher.backbone, args, st.step, log, baseline=initial_backbone(args))
    if master and finished and args.results:
        export_model(st, args)
    if world > 1:
        dist.destroy_process_group()


def report_bad_step(out, batch, st, bad_in_a_row, args):
    """Name the non-finite terms and the batch's patches; stop after --max-bad-steps in a row."""
    bad = [k for k, v in out.items() if not torch.isfinite(v).all()]
    tqdm.write(f"step {st.step}: non-finite {bad} on patches {batch['index'][:8].tolist()} (store indices); "
               f"step skipped ({bad_in_a_row} in a row)")
    if bad_in_a_row >= args.max_bad_steps:
        raise SystemExit(f"{bad_in_a_row} non-finite steps in a row ({bad}): lower --base-lr, check --teacher-temp "
                         "(<= 0.07) and the data (blank or constant patches), or resume from an earlier checkpoint")
    return bad_in_a_row


def write_metrics(log, metrics, sched, st, args, world, bar):
    now = time.time()
    dt = now - log.t_last
    rec = {"step": st.step, **{k: round(v, 5) for k, v in metrics.items()}, **sched, "skipped_steps": st.skipped,
           "images_per_s": round(args.log_every * args.batch_size * world / dt, 2),
           "data_time_frac": round(log.data_time / dt, 3)}
    log.write(rec)
    bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{sched['lr']:.2e}", img_s=rec["images_per_s"])
    if not on_terminal():  # a log file gets one plain line per logged step, as nanoGPT's and DINOv2's
        tqdm.write(f"step {st.step}/{args.steps}: loss {rec['loss']:.4f}, lr {sched['lr']:.3e}, "
                   f"{rec['images_per_s']} images/s, data wait {rec['data_time_frac']:.0%}")
    log.t_last, log.data_time = now, 0.0


if __name__ == "__main__":
    main()

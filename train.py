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
import math
import os
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
import eval_probe
import export
import loss as L
import rundir
from cli import Parser, bounded, progress
from model import ARCHS, DINOHead, MetaArch, ViT, autocast
from weights import checkpoint_problem, load_into, read_checkpoint

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
    g = p.add_argument_group("inputs")
    g.add_argument("--data", default=None, help="finished patch store from prepare_patches.py (the demo, given "
                   "none, prepares one from the bundled slide)")
    g.add_argument("--init", default=None, help="local checkpoint to start from, e.g. dinov2_vitg14_reg4_pretrain.pth "
                   "(any layout weights.load_backbone reads); none = random init")
    g.add_argument("--probe-data", default=None, help="a small labelled image folder: kNN probe of the teacher")
    g.add_argument("--probe-every", type=bounded(int, 0), default=0, help="steps between probes (0 = off)")
    g.add_argument("--probe-size", type=bounded(int, 14), default=224,
                   help="image size of the probe (224 = eval_probe's, whatever the training crop size)")
    rundir.add_args(p)
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
# the run's stages


def open_store(args, master, world):
    """The patch store (data.open_store). With no --data, the demo makes its own from the bundled slide
    (prepare_patches.py --demo: a store and a labelled probe set); any --data given must be a finished store."""
    if args.data is None:
        args.data = os.path.join(HERE, "data", "sample_store")
        args.probe_data = args.probe_data or os.path.join(HERE, "data", "sample_probe")
        if master and not os.path.exists(os.path.join(args.probe_data, "DONE")):
            subprocess.run([sys.executable, os.path.join(HERE, "prepare_patches.py"), "--demo", "--out", args.data,
                            "--probe-out", args.probe_data], check=True)
    return data.open_store(args.data, master, world)


def augment_config(args):
    return replace(augment.AugmentConfig(), global_size=args.global_size, local_size=args.local_size,
                   n_local_crops=args.n_local_crops, hed_prob=args.hed_prob, hed_range=args.hed_range,
                   mean=augment.NORMS[args.norm][0], std=augment.NORMS[args.norm][1])


def card_info(st, args):
    """What the model card tells of the run (export.training_info), against the openmidnight preset's recipe."""
    om = parse_args(["--preset", "openmidnight", "--data", "-", "--init", "-", "--device", "cpu"])
    return export.training_info(args, st.step, st.world_size, vars(om))


def initial_backbone(args):
    """The student's backbone at step 0, rebuilt from the seed: the demo's 'before training' baseline."""
    torch.manual_seed(args.seed)
    return build_models(args)[1].backbone


def main(argv=None):
    # 1. set up: processes and devices, the run directory (locked: one job at a time, released however it ends)
    args = parse_args(argv)
    check_paths(args)
    rank, world, local, device = rundir.setup_distributed(args)
    lock = rundir.lock_run_dir(args.out) if rank == 0 else None
    log = None
    try:
        # 2. the patch store (rank 0 may fail opening it while the others wait)
        with rundir.collective_failures(rank, args, world):
            store = open_store(args, rank == 0, world)
        # 3. the student, the teacher and the optimizer, resumed from the newest readable checkpoint
        st = build_state(args, device, rank, world, local)
        rundir.resume(st, args, rank, schedules)
        if rank == 0:
            log = rundir.MetricsLog(args.out, st.step, args)  # metrics.jsonl, and W&B with --wandb
            rundir.describe_run(args, world, len(store), schedules)
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
                   unit="step", every=None)  # in a log file: the log's lines instead
    batches, bad_in_a_row, wins = iter(loader), 0, None
    with rundir.StopSignals() as stop, rundir.collective_failures(rank, args, world):
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
                metrics = rundir.reduce_metrics(out, wins, world)
                wins = None
                if master:
                    log.step(metrics, sched, st, args, world, bar)
            bar.update()
            stopping = stop.agreed(st.step, args, world, device)
            # what is due at this step (export, probe) is written before its checkpoint: a crash anywhere before
            # the checkpoint is complete resumes from an earlier step and redoes it all
            if master and (st.step % args.export_every == 0 or st.step == args.steps):
                rundir.export_teacher(st, args, card_info(st, args))
            if master and args.probe_every and st.step % args.probe_every == 0:
                eval_probe.training_probe(st.teacher.backbone, args, st.step, log)
            if st.step % args.checkpoint_every == 0 or st.step == args.steps or stopping:
                rng = rundir.rng_states(world)
                if hasattr(st.opt, "consolidate_state_dict"):  # ZeRO-1: every rank sends its shard to rank 0
                    st.opt.consolidate_state_dict(to=0)
                if master:
                    rundir.save_checkpoint(st, args, rng)
            if stopping:
                tqdm.write(f"signal {stop.received}: checkpoint written at step {st.step}; exiting")
                break
    # 5. finish: the demo ends with its probe, beside the same ViT before training; a finished run given --results
    # again puts them in its model card
    bar.close()
    if master and args.preset == "demo" and st.step == args.steps:
        eval_probe.training_probe(st.teacher.backbone, args, st.step, log, baseline=initial_backbone(args))
    if master and finished and args.results:
        rundir.export_model(st, args, card_info(st, args))
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


if __name__ == "__main__":
    main()

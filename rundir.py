"""
The run directory (--out) of train.py and the processes of its job, and what they guarantee, whatever happens:

  one job at a time   a lock on --out/.lock (the kernel drops it even after kill -9): a second job on the same --out
                      stops at once, naming the first one's PID and host
  atomic              every file is written to a temporary file, fsynced and renamed (files.atomic_write): a kill
                      or a full disk leaves the old file or the whole new one; a full disk stops the run with the
                      free space and the size needed, earlier checkpoints untouched
  resumable           checkpoint-<step>.pt (everything to resume: student, teacher, optimizer, centres, step, every
                      rank's random generators, arguments) is read back before checkpoint.pt becomes a hard link to
                      it and older ones are pruned, so that a complete checkpoint is on disk at every moment; the
                      same command resumes from the newest readable one (a truncated one is reported and skipped,
                      never deleted; none readable: the run refuses to start over without --no-resume), relinking
                      checkpoint.pt if a kill came before the link; metrics.jsonl is cut back to that step
  nothing owed lost   what a step owes (its export, its probe) is written before its checkpoint: a kill before the
                      checkpoint is complete resumes from an earlier step and writes it again
  exports             teacher_backbone.pth (and exports/teacher_backbone_<step>.pth) in DINOv2's hub layout with
                      timm's config.json beside; model/, the folder timm and the Hub load (export.py)
  stop signals        SIGTERM / SIGUSR1 (pre-emption) write a checkpoint at a step every rank agrees on, then exit
  lost ranks          under torchrun --max-restarts every attempt rendezvouses under its own keys and resumes from
                      the newest checkpoint; a collective that waits past --dist-timeout (rank 0 writes checkpoints
                      and exports alone) or whose peer died ends each rank with one line saying which
  the log             metrics.jsonl, one JSON object per logged step (and W&B with --wandb, one run over resumes)
"""
import argparse
import contextlib
import datetime
import glob
import json
import math
import os
import signal
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

import export
from cli import bounded, existing_path, on_terminal
from files import atomic_write, lock_folder
from weights import infer_config


def add_args(p):
    """The run directory's flags, in their own group of train.py's --help."""
    g = p.add_argument_group("the run directory (one job at a time, resumable; exports and the log)")
    g.add_argument("--out", default=None, help="run directory (default runs/<preset>); one training job at a time")
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
    g.add_argument("--dist-timeout", type=bounded(float, 1.0), default=3600.0,
                   help="seconds a rank waits at a collective before the job stops with a message; it must cover the "
                   "longest work rank 0 does alone: a ViT-g checkpoint (~20 GB) or export on slow shared storage, "
                   "a probe (NCCL's own default, 600 s, can kill a healthy job)")


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


def describe_run(args, world, n_patches, schedules):
    """The resolved arguments (printed, and saved as args.json) and the numbers they imply, before the first step:
    global batch, images, passes over the store, the peak lr the run reaches (train.py's `schedules`)."""
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


def resume(st, args, rank, schedules):
    """Load the newest readable checkpoint of --out into st, unless its schedules differ (check_schedules). An
    unreadable one (truncated, corrupt) is reported and skipped, never deleted; if checkpoints exist but none
    loads, the run stops instead of starting over (which would overwrite them): --no-resume starts over
    deliberately."""
    if args.no_resume:
        return
    unreadable = []
    for path in checkpoint_files(args.out):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # 8 ranks share the page cache
        except Exception as e:
            unreadable.append(f"{path} ({type(e).__name__}: {str(e)[:120]})")
            continue
        check_schedules(ckpt, args, st.world_size, path, schedules)
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


SCHEDULE_FLAGS = ("base_lr", "min_lr", "warmup_steps", "schedule_steps", "weight_decay", "weight_decay_end",
                  "momentum_teacher", "warmup_teacher_temp", "teacher_temp", "teacher_temp_warmup_steps",
                  "freeze_last_layer_steps")  # and the global batch, through the lr's square-root scaling


def check_schedules(ckpt, args, world, path, schedules):
    """A resume must not move the schedules silently: `--steps 30` after a 20-step run stretches schedule_steps
    (it follows --steps unless given) and so jumps the lr, weight decay and teacher momentum. Refused unless
    --change-schedules, saying which flags changed and what `schedules` (train.py's) moves at the resumed step."""
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


def save_or_stop(obj, path, size, step):
    """torch.save through the atomic write; a failure (a full disk) stops the run with its cause, earlier files
    untouched, rather than training on without a way back."""
    try:
        atomic_write(path, lambda f: torch.save(obj, f), size_hint=size)
    except OSError as e:
        raise SystemExit(f"step {step}: {e}\ntraining stopped; a rerun resumes from the newest checkpoint") from None


def export_teacher(st, args, training):
    """The teacher backbone in the DINOv2 hub layout (fp32): teacher_backbone.pth and
    exports/teacher_backbone_<step>.pth, strict-loadable by model.py and DINOv2's own code, each with timm's
    config.json beside it (whose model_args tell weights.read_checkpoint the number of heads); then model/, the
    folder timm and the Hugging Face Hub load, with its model card (export.py), its weights a hard link."""
    backbone = st.teacher.backbone
    sd = {k: v.detach().float().cpu() for k, v in backbone.state_dict().items()}
    config = json.dumps(export.timm_config(infer_config(sd, backbone.num_heads), args.norm), indent=1).encode()
    for folder, name in ((args.out, "teacher_backbone.pth"), (os.path.join(args.out, "exports"),
                                                            f"teacher_backbone_{st.step:07d}.pth")):
        os.makedirs(folder, exist_ok=True)
        save_or_stop(sd, os.path.join(folder, name), sum(v.numel() * 4 for v in sd.values()), st.step)
        atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(config))
    export_model(st, args, training, sd)


def export_model(st, args, training, sd=None):
    """--out/model: timm's layout with the model card (export.py; `training`: what the card says of the run),
    pytorch_model.bin a hard link to teacher_backbone.pth when it holds the same tensors."""
    results = None
    if args.results:
        with open(args.results) as f:
            results = json.load(f)
    same = sd is not None or st.step == args.steps  # a finished run's teacher is its last export
    sd = sd or {k: v.detach().float().cpu() for k, v in st.teacher.backbone.state_dict().items()}
    try:
        export.write_model_folder(os.path.join(args.out, "model"), sd, infer_config(sd, st.teacher.backbone.num_heads),
                                  args.norm, training, results, args.safetensors,
                                  weights_file=os.path.join(args.out, "teacher_backbone.pth") if same else None)
    except OSError as e:
        raise SystemExit(f"step {st.step}: {e}\ntraining stopped; a rerun resumes from the newest checkpoint") from None


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
            "prototype_entropy": float(-(p * p.log()).sum()) + 0.0}  # + 0.0: one prototype gives 0, not -0


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

    def step(self, metrics, sched, st, args, world, bar):
        """A logged step's record: the reduced metrics, the schedules, throughput; on a terminal in the bar, in a
        log file one plain line (as nanoGPT's and DINOv2's)."""
        now = time.time()
        dt = now - self.t_last
        rec = {"step": st.step, **{k: round(v, 5) for k, v in metrics.items()}, **sched, "skipped_steps": st.skipped,
               "images_per_s": round(args.log_every * args.batch_size * world / dt, 2),
               "data_time_frac": round(self.data_time / dt, 3)}
        self.write(rec)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{sched['lr']:.2e}", img_s=rec["images_per_s"])
        if not on_terminal():
            tqdm.write(f"step {st.step}/{args.steps}: loss {rec['loss']:.4f}, lr {sched['lr']:.3e}, "
                       f"{rec['images_per_s']} images/s, data wait {rec['data_time_frac']:.0%}")
        self.t_last, self.data_time = now, 0.0

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

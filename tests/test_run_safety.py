"""What a crash, a kill, a full disk, a second job or bad input does to a run: nothing is lost, nothing is silently
wrong (each test states the guarantee it checks)."""
import errno
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import bench
import benchmarks as B
import eval_probe as E
import prepare_patches as P
import rundir
import train
from conftest import ROOT, SAMPLE_SLIDE, tiny_train_args


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def readable_steps(out):
    """Steps of the checkpoints in `out` that load, found independently of train.py's resume code."""
    steps = set()
    for name in os.listdir(out):
        if name.startswith("checkpoint") and name.endswith(".pt"):
            try:
                steps.add(torch.load(os.path.join(out, name), weights_only=True, mmap=True)["step"])
            except Exception:
                pass
    return steps


def test_kill_9_at_random_moments_never_costs_more_than_the_current_step(small_store, tmp_path):
    # a run checkpointing every step is killed (SIGKILL, no clean-up) at random moments, often inside a save;
    # every restart must resume from the newest complete checkpoint on disk, and the losses must continue exactly
    # as an uninterrupted run's
    steps, env = 20, {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads, so the same float sums
    argv = tiny_train_args(small_store, tmp_path / "whole", "--steps", steps, "--checkpoint-every", 1,
                           "--export-every", 100)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(list(map(str, argv)))  # the uninterrupted run, in this process
    finally:
        torch.set_num_threads(threads)
    reference = losses(tmp_path / "whole")
    out = tmp_path / "killed"
    argv[argv.index("--out") + 1] = str(out)
    rng, restarts, kills = random.Random(0), 0, 0
    while True:
        before = readable_steps(out) if out.exists() else set()
        proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *argv], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if restarts < 4:
            deadline = time.time() + 900  # kill once this run has logged a random number of steps (a margin for a
            # machine whose cores are busy with other work: the test's outcome never depends on it)
            target = len(losses(out)) + rng.randint(1, 3) if (out / "metrics.jsonl").exists() else rng.randint(1, 3)
            while time.time() < deadline and proc.poll() is None and \
                    not ((out / "metrics.jsonl").exists() and len(losses(out)) >= target):
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 0.15))  # somewhere in the next step or its save
            proc.send_signal(signal.SIGKILL)
        stdout, _ = proc.communicate(timeout=900)
        resumed = [line for line in stdout.splitlines() if line.startswith("resumed from")]
        if before:
            assert resumed and resumed[0].endswith(f"at step {max(before)}"), (before, stdout[-500:])
        restarts += 1
        kills += proc.returncode == -signal.SIGKILL
        if proc.returncode == 0:
            break
    assert kills >= 2  # 4 are tried; a busy machine may let the run end before the last ones
    assert losses(out) == reference  # the log reads as one run: no duplicated or missing steps
    a = torch.load(tmp_path / "whole" / "teacher_backbone.pth", weights_only=True)
    b = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # half-written files of killed saves are gone


# A training subprocess whose file operations are patched (here, never in train.py) to SIGKILL the process at a named
# point: each window between the writes of one step, reached whatever the machine's load
KILLED_AT = """
import os, re, signal, sys
sys.path.insert(0, {root!r})
import torch
import rundir
import train

def kill_when(module, name, condition):
    real = getattr(module, name)
    def patched(*args, **kwargs):
        if condition(*args):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    setattr(module, name, patched)

point, target = sys.argv[1], sys.argv[2]
if point == "save":  # before train.py writes `target` (a checkpoint or an export)
    kill_when(rundir, "save_or_stop", lambda obj, path, *rest: os.path.basename(path) == target)
elif point == "link":  # `target` is complete and read back; checkpoint.pt does not point at it yet
    kill_when(os, "link", lambda src, *rest: os.path.basename(src) == target)
elif point == "prune":  # removing the older checkpoint `target`
    kill_when(os, "remove", lambda path, *rest: os.path.basename(path) == target)
elif point == "step":  # rank RANK starts the step after `target` steps, in the first attempt of torchrun
    rank, step = target.split(":")
    if os.environ.get("RANK", "0") == rank and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        kill_when(train, "train_step", lambda st, *rest: st.step == int(step))
elif point == "slow-save":  # rank 0 writes the checkpoint `target` for a long time
    real_save = rundir.save_checkpoint
    def slow(st, args, rng):
        if f"checkpoint-{{st.step:07d}}.pt" == target:
            import time
            time.sleep(20)
        return real_save(st, args, rng)
    rundir.save_checkpoint = slow
torch.set_num_threads(1)
train.main(sys.argv[3:])
"""


def killed_run(tmp_path, point, target, argv, torchrun=()):
    script = tmp_path / "killed_at.py"
    script.write_text(KILLED_AT.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *torchrun, str(script), point, target, *map(str, argv)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def six_steps(small_store, tmp_path_factory):
    """An uninterrupted 6-step run that checkpoints every 2 steps (keeping none but the newest) and exports every
    3: at step 6 an export, a checkpoint and the pruning of step 4's checkpoint are all due."""
    out = tmp_path_factory.mktemp("six")
    argv = tiny_train_args(small_store, out / "whole", "--steps", 6, "--checkpoint-every", 2, "--export-every", 3,
                           "--keep-checkpoints", 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)
    finally:
        torch.set_num_threads(threads)
    return argv, out / "whole"


def exports(out):
    files = [os.path.join(out, "teacher_backbone.pth")] + sorted(glob.glob(os.path.join(out, "exports", "*.pth")))
    return {os.path.relpath(f, out): torch.load(f, weights_only=True) for f in files if os.path.exists(f)}


@pytest.mark.parametrize("point,target,resumes_at", [
    ("save", "teacher_backbone_0000006.pth", 4),  # between the two files of step 6's export
    ("save", "checkpoint-0000006.pt", 4),  # step 6's export written, its checkpoint not yet
    ("link", "checkpoint-0000006.pt", 6),  # checkpoint written, not yet linked as checkpoint.pt
    ("prune", "checkpoint-0000004.pt", 6),  # checkpoint written and linked, the older one being removed
])
def test_a_kill_between_the_writes_of_a_step_loses_no_export(six_steps, tmp_path, capsys, point, target,
                                                             resumes_at):
    # each window between the writes of the last step, made by killing the process there: the rerun of the same
    # command resumes from the newest complete checkpoint and ends with every export the schedule promises, equal
    # to the uninterrupted run's, and the same losses
    argv, whole = six_steps
    argv = list(argv)
    argv[argv.index("--out") + 1] = str(tmp_path / "run")
    assert killed_run(tmp_path, point, target, argv).returncode == -signal.SIGKILL
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(argv)  # the rerun: the same command
    finally:
        torch.set_num_threads(threads)
    assert f"at step {resumes_at}\n" in capsys.readouterr().out  # the newest complete checkpoint
    assert losses(tmp_path / "run") == losses(whole)
    a, b = exports(whole), exports(tmp_path / "run")
    assert sorted(b) == sorted(a) == ["exports/teacher_backbone_0000003.pth", "exports/teacher_backbone_0000006.pth",
                                      "teacher_backbone.pth"]
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert readable_steps(tmp_path / "run") == {6}


def test_a_rank_killed_under_torchrun_max_restarts_resumes_with_the_same_losses(small_store, tmp_path):
    # 2 gloo processes; rank 1 is SIGKILLed at the start of step 4 (checkpoints every 2 steps); torchrun restarts
    # both, they resume from the newest checkpoint and the run ends with the losses of an uninterrupted one
    argv = tiny_train_args(small_store, tmp_path / "whole", "--steps", 6, "--batch-size", 2, "--kde-weight", 0)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts", "1",
                "--monitor-interval", "0.5"]
    whole = killed_run(tmp_path, "none", "-", argv, torchrun)
    assert whole.returncode == 0, whole.stderr[-2000:]
    argv[argv.index("--out") + 1] = str(tmp_path / "restarted")
    run = killed_run(tmp_path, "step", "1:3", argv, torchrun)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "resumed from" in run.stdout and "at step 2" in run.stdout  # the second attempt
    assert "exitcode: -9" in run.stderr  # torchrun saw rank 1 killed, then restarted both
    assert losses(tmp_path / "restarted") == losses(tmp_path / "whole") and len(losses(tmp_path / "whole")) == 6


def test_a_slow_save_ends_the_waiting_rank_with_a_message_not_a_hang(small_store, tmp_path):
    # rank 0 writes step 2's checkpoint for 20 s; rank 1 waits at the next collective for --dist-timeout 10 s (a
    # margin a busy machine's ordinary steps stay far below), then both stop with one line each that says what
    # happened and what to do, and nothing hangs
    argv = tiny_train_args(small_store, tmp_path / "run", "--steps", 6, "--batch-size", 2, "--dist-timeout", 10)
    run = killed_run(tmp_path, "slow-save", "checkpoint-0000002.pt", argv,
                     ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"])
    assert run.returncode != 0
    assert re.search(r"rank \d: waited more than --dist-timeout 10 s at a collective", run.stderr), run.stderr[-3000:]
    assert "raise --dist-timeout" in run.stderr and "resumes from the newest checkpoint" in run.stderr


def test_truncated_latest_checkpoint_falls_back_and_is_kept(small_store, tmp_path, capsys):
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 4, "--checkpoint-every", 2))
    latest = tmp_path / "checkpoint-0000004.pt"
    data = latest.read_bytes()
    latest.write_bytes(data[:len(data) // 2])  # checkpoint.pt is a hard link to it: both are now truncated
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 3, "--schedule-steps", 4, "--checkpoint-every", 2))
    printed = capsys.readouterr().out
    assert "skipped unreadable checkpoint" in printed and "checkpoint-0000004.pt" in printed
    assert "at step 2" in printed  # the newest readable one
    assert len(latest.read_bytes()) == len(data) // 2  # reported, never deleted


def test_no_readable_checkpoint_refuses_to_start_over(small_store, tmp_path):
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 2, "--checkpoint-every", 2))
    for name in os.listdir(tmp_path):
        if name.startswith("checkpoint"):
            (tmp_path / name).write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="(?s)no readable checkpoint.*--no-resume"):
        train.main(tiny_train_args(small_store, tmp_path, "--steps", 4))
    assert (tmp_path / "checkpoint.pt").read_bytes() == b"garbage"  # nothing overwritten
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 1, "--no-resume"))  # deliberately
    assert list(losses(tmp_path)) == [1]


def test_full_disk_during_a_save_keeps_the_previous_checkpoints(small_store, tmp_path, monkeypatch):
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 2, "--schedule-steps", 4, "--checkpoint-every", 2))
    real_save = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"x" * 1000)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match="No space left on device.*GiB needed.*kept"):
        train.main(tiny_train_args(small_store, tmp_path, "--steps", 4, "--schedule-steps", 4, "--checkpoint-every", 2))
    monkeypatch.setattr(torch, "save", real_save)
    assert readable_steps(tmp_path) == {2} and not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def test_a_second_job_on_the_same_run_directory_is_refused(small_store, tmp_path):
    held = rundir.lock_run_dir(str(tmp_path))  # the first job
    with pytest.raises(SystemExit, match=f"in use by another training process \\(pid {os.getpid()} on host "):
        train.main(tiny_train_args(small_store, tmp_path, "--steps", 1))
    held.close()
    train.main(tiny_train_args(small_store, tmp_path, "--steps", 1))  # free again


def test_bad_input_fails_at_start_with_the_flag_and_its_range(small_store, tmp_path, capsys):
    for flags, needle in ((["--steps", "-3"], "--steps: -3 is out of range: use an integer >= 1"),
                          (["--batch-size", "0", "--kde-weight", "0"], "--batch-size: 0 is out of range"),
                          (["--mask-prob", "1.5"], "--mask-prob: 1.5 is out of range: use a number >= 0.0 and <= 1.0"),
                          (["--global-size", "100"], "--global-size 100 is not a multiple of --patch-size 14")):
        with pytest.raises(SystemExit):
            train.parse_args(["--preset", "vits", "--data", small_store, *flags])
        assert needle in capsys.readouterr().err
    for n in ("0", "-5"):
        with pytest.raises(SystemExit):
            P.get_args(["--patches-per-level", n])
        assert f"--patches-per-level: {n} is out of range: use an integer >= 1" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(SystemExit, match="--init .*notes.txt.* not a checkpoint"):
        train.main(tiny_train_args(small_store, tmp_path / "run", "--steps", 1, "--init", tmp_path / "notes.txt"))


def test_data_given_must_be_a_finished_store_and_not_empty(small_store, tmp_path):
    # only the demo's default path is ever prepared automatically; a --data given is used as it is
    with pytest.raises(FileNotFoundError, match="not a finished patch store"):
        train.main(["--data", str(tmp_path / "mine"), "--out", str(tmp_path / "run"), "--steps", "1"])
    assert not (tmp_path / "mine").exists()
    empty = tmp_path / "empty"
    os.makedirs(empty / "shards")
    (empty / "manifest.json").write_text(json.dumps({"version": 1, "shards": [], "n_patches": 0}))
    argv = tiny_train_args(small_store, tmp_path / "run2", "--steps", 1)
    argv[argv.index("--data") + 1] = str(empty)
    with pytest.raises(SystemExit, match="holds no patches"):
        train.main(argv)


def test_bench_without_arguments_prints_help_and_refuses_a_step_that_cannot_fit(capsys):
    bench.main([])
    assert "python bench.py step" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        bench.main(["step", "--help"])
    assert stop.value.code == 0
    step_help = capsys.readouterr().out
    assert "--iters" in step_help and "--n-prototypes" in step_help
    with pytest.raises(SystemExit, match="unknown benchmark 'stpe'"):
        bench.main(["stpe"])
    # the vits preset's batch of 64 is for a GPU: on this CPU it is estimated far above the machine's memory
    args = train.parse_args(["--preset", "vits", "--device", "cpu"])
    assert bench.step_bytes_estimate(args) > bench.available_bytes()
    with pytest.raises(SystemExit, match="lower --batch-size"):
        bench.main(["step", "--batch-size", "64", "--device", "cpu"])


def test_probe_refuses_one_class_and_names_missing_files(tmp_path):
    from PIL import Image
    for i in range(6):
        os.makedirs(tmp_path / "one" / "a", exist_ok=True)
        Image.new("RGB", (16, 16), (i * 30, 0, 0)).save(tmp_path / "one" / "a" / f"{i}.png")
    torch.save({}, tmp_path / "unused.pth")  # never loaded: the data is refused first
    with pytest.raises(SystemExit, match="1 class.*at least 2"):
        E.main(["--weights", str(tmp_path / "unused.pth"), "--data", str(tmp_path / "one")])
    rows = ["path,label"] + [f"one/a/{i}.png,{'x' if i % 2 else 'y'}" for i in range(6)] + ["gone.png,x"]
    (tmp_path / "list.csv").write_text("\n".join(rows))
    splits, classes = B.load_csv(str(tmp_path / "list.csv"), 0)
    assert classes == ["x", "y"] and sum(map(len, splits.values())) == 6  # the missing file is left out


def test_feature_cache_key_follows_the_image_content_not_only_its_path(tmp_path):
    from PIL import Image
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(path)
    first = E.file_key(str(path))
    time.sleep(0.01)
    Image.new("RGB", (8, 9)).save(path)  # edited in place
    assert E.file_key(str(path)) != first and E.file_key(str(path))[0] == first[0]


def test_demo_data_is_the_same_wherever_the_slide_lies(tmp_path):
    # positions are seeded from the slide's file name, not its path: two copies in two folders give the same
    # store and probe set, so a fresh clone anywhere prints the README's demo numbers
    outs = []
    for where in ("a", "b/c"):
        os.makedirs(tmp_path / where)
        slide = tmp_path / where / os.path.basename(SAMPLE_SLIDE)
        os.symlink(SAMPLE_SLIDE, slide)
        store = tmp_path / where / "store"
        assert P.main([str(slide), "--out", str(store), "--patches-per-level", "20", "--no-qc"]) == 0
        with open(store / "manifest.json") as f:
            shard = json.load(f)["shards"][0]["key"]
        outs.append((store / "shards" / (shard + ".bin")).read_bytes())
    assert outs[0] == outs[1]


def test_a_fresh_clone_anywhere_logs_the_same_demo_numbers(small_store, tmp_path):
    # the demo (no --data: its own store and probe set from the bundled slide, then the kNN probe beside the
    # initial weights) run from two copies of the repository in different folders logs the same numbers. The
    # second copy is given the first one's data folder: that the data itself does not depend on where the slide
    # lies is the test above (and making it twice would double this test's time)
    logs = []
    for where in ("one", "deeper/two"):
        clone = tmp_path / where
        os.makedirs(clone)
        for name in os.listdir(ROOT):
            if name.endswith(".py"):
                shutil.copy(os.path.join(ROOT, name), clone / name)
        os.symlink(os.path.join(ROOT, "assets"), clone / "assets")
        if logs:
            shutil.copytree(tmp_path / "one" / "data", clone / "data")
        run = subprocess.run([sys.executable, "train.py", "--steps", "2", "--log-every", "1", "--batch-size", "4",
                              "--init", os.path.join(small_store, "tiny_backbone.pth"), "--global-size", "56",
                              "--local-size", "28", "--probe-size", "56"], cwd=clone, check=True, capture_output=True,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        with open(clone / "runs" / "demo" / "metrics.jsonl") as f:
            logs.append([{k: v for k, v in json.loads(line).items() if k not in ("images_per_s", "data_time_frac")}
                         for line in f])
        printed = [line for line in run.stdout.splitlines() if "teacher kNN balanced accuracy" in line]
    assert logs[0] == logs[1]
    probe = logs[0][-1]["probe"]
    assert probe["n_test"] == 60 and "initial_weights" in probe  # 20% of the 300-image probe set, and the baseline
    # the README's demo line: this shortened run prints the same line with its own numbers, and the full demo's
    # baseline (the demo's ViT-S before training, at 224 px, on the same probe set) is the README's number
    with open(os.path.join(ROOT, "README.md")) as f:
        promised = re.search(r"^step 60: teacher kNN balanced accuracy .*$", f.read(), re.M).group(0)
    pattern = "".join(r"[\d.]+" if re.fullmatch(r"[\d.]+", t) else re.escape(t)
                      for t in re.split(r"(\d+(?:\.\d+)?)", promised))
    assert len(printed) == 1 and re.fullmatch(pattern, printed[0]), (printed, promised)
    demo = train.parse_args([])
    baseline = E.quick_knn(train.initial_backbone(demo), str(tmp_path / "one" / "data" / "sample_probe"),
                           demo.probe_size)
    assert promised.endswith(f"(the same ViT before training: {baseline['balanced_accuracy']:.3f})")

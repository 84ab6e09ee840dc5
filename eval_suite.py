"""
OpenMidnight's results table in one command, and the t-SNE figure of its blog post.

    python eval_suite.py --weights runs/om/teacher_backbone.pth --suite BENCH_ROOT --out results/om [--quick]
    python eval_suite.py --weights dinov2_vitg14_reg4_pretrain.pth teacher.pth --data BACH --dataset bach --tsne m.png

The table has 13 columns (COLUMNS): eva's patch probes, its PCam 10-shot protocol, two slide-level MIL tasks, two
segmentation tasks and HEST, plus their average. BENCH_ROOT holds any subset of the benchmark datasets, unpacked,
one folder per dataset named as in COLUMNS (pcam/ serves PCam and PCam 10-shot); every column whose folder is
present runs with its own protocol (eval_probe.py, eval_slide.py, eval_seg.py, eval_hest.py, called through the
evaluation-script contract: main(argv) -> results with a "headline"). OUT/results.json keeps every figure and
setting; OUT/results.md has this model's row above the post's table (PUBLISHED: its 18 rows, cited) and kaiko-ai's
later Midnight README rows as a separate block. Each
task's result is cached in OUT/tasks/<column>.json with the settings it ran with, so a rerun does only what is
missing, stale or failed; a failing task is reported as failed and the others still run. When bach/ is present
the suite also draws the t-SNE map of BACH's CLS features (OUT/tsne_bach.png, from the probe's feature cache;
tsne.py).
"""
import copy
import importlib
import json
import os
import time
import traceback
from collections import namedtuple

import numpy as np
from PIL import Image

import benchmarks
import cli
import eval_probe
import tsne
from files import atomic_write

# -----------------------------------------------------------------------------
# the columns: data folder, the script that runs it, its protocol's argv, and eva's n_runs (its configs)

Task = namedtuple("Task", "key header folder module argv runs runs_flag")
PCAM_10_SHOT = ["--dataset", "pcam", "--few-shot", "10", "--no-linear", "--few-shot-draw", "same",
                "--check-every", "10", "--patience", "125", "--min-delta", "1e-4"]  # eva-probe's pcam_10.yaml
COLUMNS = [
    Task("pcam10", "PCam 10-shot", "pcam", "eval_probe", PCAM_10_SHOT, 50, "--few-shot-draws"),
    *[Task(k, h, k, "eval_probe", ["--dataset", k], 5, "--runs") for k, h in
      (("bach", "BACH"), ("bracs", "BRACS"), ("breakhis", "BreakHis"), ("crc", "CRC-100K"), ("gleason", "Gleason"),
       ("mhist", "MHIST"), ("pcam", "PCam"))],
    Task("camelyon16", "Cam16-small", "camelyon16", "eval_slide", ["--dataset", "camelyon16"], 20, "--runs"),
    Task("panda", "PANDA-small", "panda", "eval_slide", ["--dataset", "panda"], 20, "--runs"),
    Task("consep", "CoNSeP", "consep", "eval_seg", ["--dataset", "consep"], 5, "--runs"),
    Task("monusac", "MoNuSAC", "monusac", "eval_seg", ["--dataset", "monusac"], 5, "--runs"),
    Task("hest", "HEST", "hest", "eval_hest", ["--dataset", "hest"], 1, "--runs"),  # ridge on fixed folds
]
KEYS = [t.key for t in COLUMNS]

# -----------------------------------------------------------------------------
# published rows (facts, with their source): the post's whole table, then kaiko-ai's later Midnight README rows

OM_POST = ("Sophont, \"How to Train a State-of-the-Art Pathology Foundation Model with $1.6k\", "
           "https://sophont.med/blog/openmidnight (December 2025, linked from MedARC-AI/OpenMidnight's README), "
           "section Results: OpenMidnight's row, and the other models' rows as the post takes them from Karasikov et "
           "al. 2025 (arXiv 2504.05186); CLS token only; its table's values (its prose swaps two: see the notes)")
MIDNIGHT_README = ("https://github.com/kaiko-ai/Midnight/blob/e48dce1567a1db3c9cfedecace6f20262c07d5aa/README.md, "
                   "Results Summary: later runs with Midnight's protocol (CLS + mean patch token, mean/std 0.5; "
                   "Midnight-92k/392 at 392 px), so they differ from the post's copy of the paper")


def _row(values, average, source, wsis=None):
    return {"values": dict(zip(KEYS, values)), "average": average, "source": source, "wsis": wsis}


PUBLISHED = {  # the post's table, row by row, its column order = COLUMNS
    "OpenMidnight": _row([.790, .916, .661, .873, .961, .817, .844, .938, .946, .652, .631, .655, .390], .775,
                         OM_POST, "12K"),
    "Midnight": _row([.900, .906, .642, .850, .964, .809, .825, .951, .831, .633, .663, .707, .384], .774, OM_POST,
                     "92K"),
    "UNI-2": _row([.887, .914, .661, .860, .965, .778, .823, .949, .868, .659, .628, .644, .414], .773, OM_POST,
                  "350K"),
    "UNI-2/392": _row([.821, .917, .663, .829, .965, .791, .849, .927, .858, .653, .629, .659, .407], .767, OM_POST,
                      "350K"),
    "Virchow2": _row([.851, .884, .624, .823, .966, .778, .861, .936, .865, .656, .639, .676, .398], .766, OM_POST,
                     "3.1M"),
    "Midnight 92k": _row([.876, .896, .616, .789, .966, .820, .811, .950, .861, .625, .629, .656, .392], .761, OM_POST,
                         "92K"),
    "Midnight 12k": _row([.791, .904, .644, .841, .966, .801, .807, .930, .850, .663, .626, .663, .395], .760, OM_POST,
                         "12K"),
    "H-Optimus-0": _row([.824, .757, .615, .808, .956, .771, .842, .942, .838, .670, .644, .685, .415], .751, OM_POST,
                        "500K"),
    "Kaiko-B8": _row([.786, .872, .617, .825, .957, .748, .828, .917, .831, .642, .643, .686, .373], .748, OM_POST,
                     "29K"),
    "TCGA-100M": _row([.774, .864, .615, .779, .967, .799, .792, .927, .852, .667, .622, .656, .396], .747, OM_POST,
                      "12K"),
    "Prov-GigaPath": _row([.852, .766, .616, .821, .951, .720, .831, .942, .791, .660, .626, .687, .393], .743,
                          OM_POST, "171K"),
    "Hibou-L": _row([.804, .811, .637, .740, .933, .763, .839, .952, .823, .634, .645, .668, .388], .740, OM_POST,
                    "1.1M"),
    "UNI": _row([.815, .791, .593, .789, .948, .757, .840, .938, .822, .655, .627, .659, .386], .740, OM_POST, "100K"),
    "UNI/512": _row([.737, .877, .612, .732, .950, .754, .814, .883, .814, .654, .621, .658, .364], .728, OM_POST,
                    "100K"),
    "Phikon": _row([.820, .735, .568, .713, .942, .729, .804, .923, .809, .644, .623, .644, .367], .717, OM_POST,
                   "12K"),
    "Phikon v2": _row([.741, .734, .600, .716, .939, .755, .784, .893, .803, .631, .626, .645, .375], .711, OM_POST,
                      "60K"),
    "DINOv2-giant (pretrained)": _row([.719, .725, .583, .832, .935, .744, .862, .874, .507, .382, .564, .614, .342],
                                      .668, OM_POST, "0"),
    "DINOv2-giant (random)": _row([.649, .473, .411, .427, .748, .464, .569, .755, .566, .308, .461, .428, .172], .495,
                                  OM_POST, "0"),
}
MIDNIGHT_README_ROWS = {  # a separate block, labelled: useful beside Midnight's own protocol, not the post's table
    "Midnight-92k/392": _row([.900, .904, .646, .802, .966, .807, .828, .951, .868, .651, .662, .708, .415], .778,
                             MIDNIGHT_README),
    "Midnight-92k": _row([.882, .889, .615, .793, .967, .823, .831, .948, .872, .643, .629, .656, .425], .767,
                         MIDNIGHT_README),
    "Midnight-12k": _row([.803, .907, .639, .840, .967, .790, .815, .931, .869, .656, .625, .664, .412], .763,
                         MIDNIGHT_README),
    "UNI-2": _row([.885, .924, .651, .863, .970, .777, .829, .951, .873, .666, .626, .644, .431], .776,
                  MIDNIGHT_README),
    "Virchow2": _row([.835, .890, .633, .818, .966, .791, .865, .938, .860, .646, .640, .674, .403], .766,
                     MIDNIGHT_README),
    "H-optimus-0": _row([.831, .752, .620, .813, .962, .769, .850, .943, .847, .672, .644, .687, .425], .755,
                        MIDNIGHT_README),
}
FOOTNOTES = [
    "Metrics: balanced accuracy (classification, test split where the dataset has one, else val), Dice "
    "(segmentation), Pearson r (HEST); each the mean over eva's runs (5 probes, 50 PCam 10-shot heads, 20 MIL "
    "heads, 5 segmentation heads). An average is over the columns it says (n/13), never a subset shown as a whole.",
    "The post's prose swaps two numbers: it gives OpenMidnight \"0.946 and 0.873\" on \"BreakHis and Cam16(small)\" "
    "and UNI-2 \"0.873 on Cam16(small)\"; its table, used here, has BreakHis 0.873 / Cam16 0.946 for OpenMidnight "
    "and Cam16 0.868 for UNI-2.",
    "Hibou-L's printed average, 0.740, is below the mean of its 13 printed values (0.741, more than rounding "
    "explains); kept as the post prints it, as every row.",
]

# -----------------------------------------------------------------------------
# the runner


def weights_signature(path):
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime}


def task_argv(task, args, runs):
    """(protocol argv, run-time argv): the first decides whether a cached result is still valid."""
    proto = ["--weights", os.path.abspath(args.weights), "--data", os.path.abspath(os.path.join(args.suite,
             task.folder)), *task.argv, task.runs_flag, str(runs), "--features", args.features, "--norm", args.norm,
             *(["--arch", args.arch] if args.arch else [])]
    runtime = ["--device", args.device, "--force"]  # a task's own file is replaced when the suite finds it stale
    if task.module in ("eval_probe", "eval_slide"):
        runtime += ["--workers", str(args.workers)]
    if task.module == "eval_probe":
        proto += ["--size", str(args.size), "--seed", str(args.seed)]
        runtime += ["--batch-size", str(args.batch_size), "--cache-dir", os.path.abspath(args.cache_dir)]
    return proto, runtime


def run_task(task, argv):
    """One evaluation through the contract: its main(argv) returns the results dict with a "headline"."""
    return importlib.import_module(task.module).main(argv)


def present(args, task):
    folder = os.path.join(args.suite, task.folder)
    return os.path.isdir(folder) and bool(os.listdir(folder))


def run_suite(args):
    if not os.path.isdir(args.suite):
        raise SystemExit(f"--suite {args.suite!r} is not a folder: give the root holding bach/, pcam/, ...")
    out = args.out or "results_suite"
    weights = weights_signature(args.weights)
    previous = os.path.join(out, "results.json")
    if os.path.exists(previous) and not args.force:  # a table of other weights (another run's export) stays
        with open(previous) as f:
            theirs = json.load(f)["settings"]["weights"]["path"]
        if theirs != weights["path"]:
            raise SystemExit(f"{out} holds the table of {theirs}: give another --out for {weights['path']}, or "
                             "--force to replace it")
    os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
    records = {}
    for task in COLUMNS:
        if not present(args, task):
            records[task.key] = {"status": "absent", "folder": os.path.join(args.suite, task.folder)}
            continue
        proto, runtime = task_argv(task, args, 1 if args.quick else task.runs)
        settings = {"weights": weights, "module": task.module, "argv": proto}
        path = os.path.join(out, "tasks", task.key + (".quick" if args.quick else "") + ".json")  # quick: beside
        old = json.load(open(path)) if os.path.exists(path) else None
        if old and old.get("status") == "ok" and old.get("settings") == settings:
            print(f"{task.key}: up to date ({path})")
            records[task.key] = old  # done before with these settings (also when --tasks leaves it out)
            continue
        if args.tasks and task.key not in args.tasks:
            records[task.key] = {"status": "skipped", "reason": "not in --tasks and no up-to-date result"}
            continue
        print(f"{task.key}: {task.module} {' '.join(proto[4:])}")
        t0 = time.time()
        try:
            res = run_task(task, proto + runtime + ["--out", path[:-5] + ".results.json"])
            if not isinstance(res, dict) or "value" not in res.get("headline", {}):
                raise ValueError(f"{task.module}.main returned no headline (the evaluation-script contract)")
            rec = {"status": "ok", "results": res}
        except (Exception, SystemExit) as e:  # one failing task must not stop the others
            rec = {"status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            print(f"{task.key}: FAILED {rec['error']}")
        records[task.key] = rec = {**rec, "settings": settings, "seconds": round(time.time() - t0, 1)}
        eval_probe.save_results(path, rec, force=True)  # stale records are replaced by design
    tsne = suite_tsne(args, out, weights) if "bach" in records and records["bach"]["status"] == "ok" else None
    summary = {"settings": {"weights": weights, "suite": os.path.abspath(args.suite), "quick": args.quick,
                            "tasks": args.tasks, "features": args.features, "norm": args.norm, "size": args.size,
                            "device": args.device, "columns": [t._asdict() for t in COLUMNS]},
               "row": {k: r["results"]["headline"]["value"] for k, r in records.items() if r["status"] == "ok"},
               "tasks": records, "tsne": tsne, "published": PUBLISHED, "published_midnight_readme":
               MIDNIGHT_README_ROWS, "sources": {"published": OM_POST, "published_midnight_readme": MIDNIGHT_README},
               "footnotes": FOOTNOTES}
    summary["average"] = float(np.mean(list(summary["row"].values()))) if summary["row"] else None
    eval_probe.save_results(os.path.join(out, "results.json"), summary, force=True)
    md = results_markdown(summary, args)
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write(md.encode()))
    print(md.split("\n\n")[2])
    print(f"table: {os.path.join(out, 'results.md')}, every figure: {os.path.join(out, 'results.json')}")
    failed = [k for k, r in records.items() if r["status"] == "failed"]
    if failed:  # the table is written; the exit status says that it is not whole
        ran = sum(r["status"] in ("ok", "failed") for r in records.values())
        raise SystemExit(f"{len(failed)} of {ran} tasks failed ({', '.join(failed)}): their errors are in "
                         f"{os.path.join(out, 'results.md')}; a rerun redoes only what failed")
    return summary


def suite_tsne(args, out, weights):
    """BACH's t-SNE map, redrawn only when the weights or feature settings change (features come from the
    probe's cache); a failure is reported, not raised."""
    png = args.tsne or os.path.join(out, "tsne_bach.png")
    record = os.path.join(out, "tasks", "tsne_bach.json")
    settings = {"weights": weights, "features": args.features, "norm": args.norm, "size": args.size,
                "png": os.path.abspath(png)}
    old = json.load(open(record)) if os.path.exists(record) else None
    if old and old.get("settings") == settings and old.get("status") == "ok" and os.path.exists(png):
        return old
    a = copy.copy(args)
    a.data, a.dataset, a.tsne, a.suite = os.path.join(args.suite, "bach"), "bach", png, None
    try:
        rec = {"status": "ok", "results": tsne.tsne_command(a)}
    except (Exception, SystemExit) as e:
        rec = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        print(f"t-SNE: FAILED {rec['error']}")
    rec["settings"] = settings
    eval_probe.save_results(record, rec, force=True)
    return rec


def _cell(x):
    return "" if x is None else f"{x:.3f}"


def results_markdown(summary, args):
    """This model's row (its average over the columns it has, marked n/13, and over the same columns for every row)
    above the post's table, then kaiko-ai's Midnight README rows as a separate block; footnotes for what failed, what
    is absent and where each number comes from."""
    tasks, row = summary["tasks"], summary["row"]
    notes, marks = [], {}
    for k, r in tasks.items():
        if r["status"] == "failed":
            notes.append(f"{k} failed: {r['error']}")
            marks[k] = f"failed [{len(FOOTNOTES) + len(notes)}]"
    absent = [k for k, r in tasks.items() if r["status"] == "absent"]
    skipped = [k for k, r in tasks.items() if r["status"] == "skipped"]
    name = os.path.basename(args.weights) + (" (quick: one seed per task)" if args.quick else "")
    head = ["Model", *[t.header for t in COLUMNS], "Average", f"Avg, same {len(row)} tasks", "#WSIs"]
    rule = "|" + "---|" * len(head)
    sources = [OM_POST, MIDNIGHT_README]

    def published(rows):
        out = []
        for model, pub in rows.items():
            vals = pub["values"]
            n = sum(v is not None for v in vals.values())
            same = [vals[k] for k in row] if row and all(vals[k] is not None for k in row) else None
            out.append(f"| {model} [{len(FOOTNOTES) + len(notes) + 1 + sources.index(pub['source'])}] | " +
                       " | ".join(_cell(vals[k]) for k in KEYS) + f" | {_cell(pub['average'])} ({n}/13) | "
                       f"{_cell(np.mean(same) if same else None)} | {pub.get('wsis') or ''} |")
        return out

    ours = f"| **{name}** | " + " | ".join(marks.get(k, _cell(row.get(k))) for k in KEYS) + \
        f" | {_cell(summary['average'])} ({len(row)}/13) | {_cell(summary['average'])} | |"
    w = summary["settings"]["weights"]
    text = [f"# Results of `{w['path']}`",
            f"{time.strftime('%Y-%m-%d %H:%M')}; data {summary['settings']['suite']}; features "
            f"{args.features}, normalisation {args.norm}, {args.size} px.",
            "\n".join(["| " + " | ".join(head) + " |", rule, ours, *published(PUBLISHED)]),
            "The same columns in kaiko-ai's Midnight README (later runs, Midnight's own protocol):",
            "\n".join(["| " + " | ".join(head) + " |", rule, *published(MIDNIGHT_README_ROWS)])]
    foot = [*FOOTNOTES, *notes, *sources]
    text.append("\n".join(f"[{i}] {s}" for i, s in enumerate(foot, 1)))
    text.append(f"Not run: {', '.join(absent) or 'none'} (no data folder under the suite root); "
                f"{', '.join(skipped) or 'none'} (left out by --tasks).")
    if summary.get("tsne") and summary["tsne"]["status"] == "ok":
        text.append(f"t-SNE of BACH's features: {summary['tsne']['results']['path']}")
    return "\n\n".join(text) + "\n"


def make_demo_suite(root, probe=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "sample_probe")):
    """A suite root from the bundled slide, to try the table without downloading anything: the demo's probe set
    (prepare_patches.py --demo: patches read at 0.5, 1 and 2 um/px, the class being the magnification) laid out as
    BRACS (3 classes, a stratified 60/20/20 split) and as MHIST (0.5 um/px as SSA, 2 um/px as HP, 70/30)."""
    if not os.path.exists(os.path.join(probe, "DONE")):
        raise SystemExit(f"no demo probe set at {probe}: make it with python prepare_patches.py --demo")
    splits, classes = benchmarks.load_imagefolder(probe, 0)
    for split, items in splits.items():
        for path, c in items:
            d = os.path.join(root, "bracs", "BRACS_RoI", "latest_version", split, classes[c])
            os.makedirs(d, exist_ok=True)
            Image.open(path).save(os.path.join(d, os.path.basename(path)))
    os.makedirs(os.path.join(root, "mhist", "images"), exist_ok=True)
    items = [(p, c) for p, c in sum(splits.values(), []) if classes[c] in ("0.5mpp", "2mpp")]
    rows = ["Image Name,Majority Vote Label,Number of Annotators who Selected SSA (Out of 7),Partition"]
    for part, chosen in zip(("train", "test"), benchmarks.split_items(items, (0.7, 0.3), 0)):
        for path, c in chosen:
            name = f"{classes[c]}_{os.path.basename(path)}"
            Image.open(path).save(os.path.join(root, "mhist", "images", name))
            rows.append(f"{name},{'SSA' if classes[c] == '0.5mpp' else 'HP'},0,{part}")
    open(os.path.join(root, "mhist", "annotations.csv"), "w").write("\n".join(rows) + "\n")
    return root


def get_args(argv=None):
    p = cli.Parser(description=__doc__)
    eval_probe.add_feature_args(p, weights_nargs="+")
    p.add_argument("--suite", default=None, type=cli.existing_path, metavar="ROOT",
                   help="the results table: every benchmark whose folder is under ROOT, one row beside the "
                   "published ones")
    p.add_argument("--out", default=None, help="with --suite: the folder of results.md, results.json and tasks/ "
                   "(default results_suite)")
    p.add_argument("--tasks", nargs="+", default=None, choices=KEYS, metavar="TASK",
                   help=f"with --suite: only these columns, of {', '.join(KEYS)}")
    p.add_argument("--quick", action="store_true", help="with --suite: one seed per task, a fast look (row marked)")
    p.add_argument("--tsne", default=None, metavar="OUT.png",
                   help="the t-SNE map of --data's features by class (two --weights: side by side); with --suite: "
                   "where BACH's map goes (default OUT/tsne_bach.png)")
    p.add_argument("--data", default=None, type=cli.existing_path, help="with --tsne: the labelled images to map")
    p.add_argument("--dataset", default="imagefolder", choices=sorted(benchmarks.LOADERS),
                   help="with --tsne: the layout of --data")
    args = p.parse_args(argv)
    if not args.suite and not (args.tsne and args.data):
        p.error("give --suite ROOT (the results table) or --tsne OUT.png --data ROOT (the t-SNE map)")
    if len(args.weights) > 2 or (len(args.weights) == 2 and args.suite):
        p.error("give one --weights (two only for a side-by-side --tsne without --suite)")
    args.weights = args.weights[0] if len(args.weights) == 1 else args.weights
    return args


def main(argv=None):
    """The table (--suite), or the t-SNE map (--tsne --data); a table with a failed task exits with status 1."""
    args = get_args(argv)
    return run_suite(args) if args.suite else tsne.tsne_command(args)


if __name__ == "__main__":
    main()

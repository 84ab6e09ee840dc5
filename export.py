"""
A trained backbone as a folder the ecosystem loads, as pathology models are published on the Hugging Face Hub
(H-optimus-0, Virchow2, UNI2-h, Prov-GigaPath): timm's config.json, the weights (pytorch_model.bin, in DINOv2's hub
layout, which timm converts itself; model.safetensors on request) and a model card (README.md).

    python export.py runs/om --results results/om/results.json          # the run's model/ folder, results added
    python export.py runs/om/checkpoint.pt --out models/om --safetensors  # any checkpoint load_backbone reads

train.py writes runs/<name>/model/ at every export; this script rewrites such a folder (a suite's results in its
card, model.safetensors) or makes one from any other checkpoint. Then, with nothing downloaded:

    timm.create_model("local-dir:runs/om/model", pretrained=True)    # timm >= 1.0.16, no other argument
    weights.load_backbone("runs/om/model")                              # nanopath; DINOv2's hub code: the .bin
"""
import json
import math
import os
import sys

import torch

import augment
from cli import Parser, existing_path
from files import atomic_write
from weights import read_checkpoint

# timm's DINOv2 architectures (vision_transformer.py): the small, base and large ones have an MLP FFN, the giant
# one SwiGLUPacked; *_reg4_* adds reg_tokens=4 with no_embed_class. model_args then set every size exactly.
TIMM_MLP_WIDTHS = {384: "small", 768: "base", 1024: "large"}


def timm_config(cfg, norm="imagenet"):
    """timm's config.json for a backbone of weights.infer_config's kwargs: the matching
    vit_<size>_patch14[_reg4]_dinov2 architecture, every size in model_args (built at the weights' own grid, so
    the pos-embed is used as trained, not resampled), and the run's normalisation in pretrained_cfg."""
    D, R, swiglu = cfg["embed_dim"], cfg["num_register_tokens"], cfg["ffn"] == "swiglu"
    size = "giant" if swiglu else TIMM_MLP_WIDTHS.get(D, "small")
    rows = 2 * cfg["ffn_hidden"] if swiglu else cfg["ffn_hidden"]  # SwiGLUPacked's fc1 holds [gate; value]
    ratio = rows / D
    while int(D * ratio) < rows:  # timm sizes the FFN as int(D * mlp_ratio)
        ratio = math.nextafter(ratio, math.inf)
    S = cfg["img_size"]
    mean, std = augment.NORMS[norm]
    return {"architecture": f"vit_{size}_patch14{'_reg4' if R else ''}_dinov2", "num_classes": 0,
            "model_args": {"img_size": S, "patch_size": cfg["patch_size"], "embed_dim": D, "depth": cfg["depth"],
                           "num_heads": cfg["num_heads"], "mlp_ratio": ratio, **({"reg_tokens": R} if R else {}),
                           "num_classes": 0},
            "pretrained_cfg": {"input_size": [3, S, S], "fixed_input_size": True, "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "center", "mean": list(mean), "std": list(std),
                               "num_classes": 0, "first_conv": "patch_embed.proj", "classifier": "head"}}


def results_table(results):
    """A suite's results.json (eval_suite.py) as this model's row, with the published OpenMidnight row below."""
    cols = results["settings"]["columns"]
    row, om = results["row"], results["published"].get("OpenMidnight", {}).get("values", {})
    head = "| Model | " + " | ".join(c["header"] for c in cols) + " | Average |"
    cell = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    mine = [row.get(c["key"]) for c in cols]
    have = [v for v in mine if v is not None]
    lines = [head, "|" + "---|" * (len(cols) + 2),
             "| this model | " + " | ".join(cell(v) for v in mine) + f" | {cell(sum(have) / len(have)) if have else ''}"
             f" ({len(have)}/{len(cols)}) |"]
    if om:
        vals = [om.get(c["key"]) for c in cols]
        lines.append("| OpenMidnight (the post) | " + " | ".join(cell(v) for v in vals) +
                     f" | {cell(results['published']['OpenMidnight'].get('average'))} |")
    quick = " (quick: one seed per task)" if results["settings"].get("quick") else ""
    return "\n".join(lines) + f"\n\nFrom {results['settings']['suite']}{quick}; averages over the columns shown.\n"


NOT_RECIPE = ("preset", "out", "data", "init", "no_resume", "change_schedules", "log_every", "checkpoint_every",
              "keep_checkpoints", "export_every", "probe_data", "probe_every", "probe_size", "results", "safetensors",
              "wandb", "device", "dtype", "compile", "fused_adamw", "zero", "workers", "seed", "dist_timeout",
              "recompute", "gpu_augment")  # where and how fast a run goes, not what it learns


def training_info(args, step, world_size, reference):
    """What the model card tells of a train.py run: its arguments, the recipe's settings that differ from
    `reference` (the openmidnight preset's arguments: OpenMidnight's run, its bugs fixed), and its data (the
    store's manifest)."""
    mine, om = vars(args), reference
    with open(os.path.join(args.data, "manifest.json")) as f:
        manifest = json.load(f)
    return {"name": os.path.basename(os.path.abspath(args.out)), "args": mine, "steps_done": step,
            "world_size": world_size,
            "deviations": [[k, mine[k], om[k]] for k in sorted(mine) if k not in NOT_RECIPE and mine[k] != om.get(k)],
            "data": {"store": os.path.abspath(args.data), "slides": len(manifest["shards"]),
                     "patches": manifest["n_patches"], "format": manifest.get("format"),
                     "patch_size": manifest.get("patch_size"), "sampling": manifest.get("sampling"),
                     "examples": [os.path.basename(s["slide"]) for s in manifest["shards"][:3]]}}


def model_card(cfg, norm, n_params, training=None, results=None, source=None):
    """README.md: what the model is, how to load it, its recipe and how it departs from OpenMidnight's, its
    training data, the run's arguments, its intended use and, given a suite's results.json, its results."""
    what = (f"a DINOv2-style ViT ({cfg['arch']}: width {cfg['embed_dim']}, {cfg['depth']} blocks, {cfg['num_heads']} "
            f"heads, patch {cfg['patch_size']}, {cfg['num_register_tokens']} registers, {cfg['ffn']} FFN of "
            f"{cfg['ffn_hidden']}, {n_params / 1e6:.1f}M parameters, its position embedding at {cfg['img_size']} "
            "px)")
    mean, std = augment.NORMS[norm]
    out = ["---", "library_name: timm", "tags:", "- image-feature-extraction", "- timm", "- pathology", "- dinov2",
           "---", "", f"# {training['name'] if training else os.path.basename(str(source))}", "",
           f"A backbone for H&E histopathology: {what}, trained self-supervised with nanopath's train.py on "
           "whole-slide-image patches, following OpenMidnight's recipe "
           "(DINOv2's DINO + iBOT losses, KDE regulariser, HED colour jitter). Use the CLS token (or CLS and the "
           f"mean patch token) of images normalised with mean {list(mean)} and std {list(std)} ({norm}).", "",
           "## Load it", "", "```python", "import timm", 'model = timm.create_model("local-dir:PATH/TO/THIS/FOLDER", '
           "pretrained=True)  # timm >= 1.0.16; nothing is downloaded",
           "features = model.forward_features(x)[:, 0]  # the CLS token; x normalised as above", "```", "",
           "DINOv2's hub code loads `pytorch_model.bin` (DINOv2's own names) with `load_state_dict` into "
           f"`dinov2_vit*_reg` built with `img_size={cfg['img_size']}`; nanopath: `weights.load_backbone(FOLDER)`.", ""]
    if training:
        args = training["args"]
        out += ["## Training recipe", "",
                f"nanopath `train.py --preset {args['preset']}`: {training['steps_done']} of {args['steps']} steps, "
                f"global batch {args['batch_size'] * training.get('world_size', 1)}, "
                f"{'from ' + os.path.basename(args['init']) if args.get('init') else 'from random weights'}, "
                f"{args['n_prototypes']} prototypes, base lr {args['base_lr']}, KDE weight {args['kde_weight']}.", "",
                "Settings that differ from OpenMidnight's released run as nanopath reproduces it (`--preset "
                "openmidnight`, whose defaults already fix the released run's known bugs, RECIPE.md §11):", ""]
        out += ["| flag | this run | OpenMidnight |", "|---|---|---|"] + \
            [f"| `--{k.replace('_', '-')}` | {ours} | {theirs} |" for k, ours, theirs in training["deviations"]] \
            if training["deviations"] else ["(none)"]
        d = training.get("data")
        out += ["", "## Training data", ""]
        out += [f"{d['patches']:,} patches of {d['slides']:,} slides (the store {d['store']}), {d['format']} "
                f"patches of {d['patch_size']} px; sampling: {json.dumps(d['sampling'])}; slides, e.g.: "
                f"{', '.join(d['examples'])}.", ""] if d else ["Not recorded.", ""]
        out += ["## The run's arguments", "", "```json", json.dumps(args, indent=1, sort_keys=True), "```", ""]
    else:
        out += ["## Training", "", f"Converted from {source}; its training is not recorded here.", ""]
    out += ["## Intended use", "", "Research on computational pathology: frozen features for patch classification, "
            "slide-level multiple-instance learning, segmentation and spatial transcriptomics probes, or a starting "
            "point for further self-supervised training. Not a medical device: not for diagnosis or clinical "
            "decisions. Its training data (public TCGA slides in OpenMidnight's case) carries their biases.", ""]
    if results:
        out += ["## Results", "", results_table(results)]
    return "\n".join(out)


def write_model_folder(folder, sd, cfg, norm="imagenet", training=None, results=None, safetensors=False,
                       source=None, weights_file=None):
    """For hub-layout tensors `sd` of a ViT of kwargs `cfg` (weights.infer_config's): config.json,
    pytorch_model.bin (a hard link to `weights_file` when it holds these tensors already, so no bytes are written
    twice), README.md, training.json (what the card was made from) and, if asked, model.safetensors; every file
    written atomically."""
    os.makedirs(folder, exist_ok=True)
    atomic_write(os.path.join(folder, "config.json"), lambda f: f.write(json.dumps(timm_config(cfg, norm),
                                                                                    indent=1).encode()))
    bin_path = os.path.join(folder, "pytorch_model.bin")
    if weights_file and not (os.path.exists(bin_path) and os.path.samefile(weights_file, bin_path)):
        tmp = bin_path + f".tmp{os.getpid()}"
        try:
            os.link(weights_file, tmp)
            os.replace(tmp, bin_path)
        except OSError:  # another filesystem, or no hard links: a copy
            atomic_write(bin_path, lambda f: torch.save(sd, f))
    elif not weights_file:
        atomic_write(bin_path, lambda f: torch.save(sd, f))
    if safetensors:
        try:
            from safetensors.torch import save
        except ImportError:
            raise SystemExit("model.safetensors needs the safetensors package: pip install safetensors") from None
        atomic_write(os.path.join(folder, "model.safetensors"),
                     lambda f: f.write(save({k: v.contiguous() for k, v in sd.items()})))
    if training:
        atomic_write(os.path.join(folder, "training.json"), lambda f: f.write(json.dumps(training).encode()))
    card = model_card(cfg, norm, sum(v.numel() for v in sd.values()), training, results, source)
    atomic_write(os.path.join(folder, "README.md"), lambda f: f.write(card.encode()))
    return cfg


def main(argv=None):
    p = Parser(description=__doc__)
    p.add_argument("source", type=existing_path,
                   help="a run directory (its model/), a model folder, or any checkpoint weights.load_backbone reads")
    p.add_argument("--out", default=None, help="the folder to write (default: the source's model folder itself)")
    p.add_argument("--results", type=existing_path, default=None, help="a suite's results.json for the card")
    p.add_argument("--safetensors", action="store_true", help="also model.safetensors (pip install safetensors)")
    p.add_argument("--norm", default=None, choices=sorted(augment.NORMS),
                   help="the input normalisation the model was trained with (default: the run's, else imagenet)")
    args = p.parse_args(argv)
    training, weights_file, folder = None, None, None
    for candidate in (os.path.join(args.source, "model"), args.source):  # a run directory, or its model folder
        if os.path.isfile(os.path.join(candidate, "training.json")):
            folder, weights_file = candidate, os.path.join(candidate, "pytorch_model.bin")
            with open(os.path.join(candidate, "training.json")) as f:
                training = json.load(f)
            break
    if weights_file is None and os.path.isfile(os.path.join(args.source, "teacher_backbone.pth")):
        weights_file = os.path.join(args.source, "teacher_backbone.pth")  # a run written before model/ existed
    sd, cfg = read_checkpoint(weights_file or args.source)
    out = args.out or folder
    if out is None:
        p.error("give --out for a checkpoint that is not a model folder")
    results = None
    if args.results:
        with open(args.results) as f:
            results = json.load(f)
    norm = args.norm or (training["args"]["norm"] if training else "imagenet")
    write_model_folder(out, sd, cfg, norm, training, results, args.safetensors, source=args.source,
                       weights_file=weights_file)
    print(f"{out}: config.json, pytorch_model.bin, README.md{', model.safetensors' if args.safetensors else ''}; "
          f'timm.create_model("local-dir:{out}", pretrained=True)')
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)

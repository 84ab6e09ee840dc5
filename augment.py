"""
Data augmentation of the recipe (OpenMidnight's DataAugmentationDINO, op for op) with torch, numpy and pillow only:
multi-crop, HED stain jitter, colour jitter, grayscale, Gaussian blur, normalisation, and DINOv2's iBOT block masks.

One pipeline in two halves: multicrop_uint8(img) cuts the random-resized, flipped crops (uint8) and draws every
crop's colour parameters; finish_crops() applies the colour ops and the normalisation to a stack of crops. The one
switch is where finish_crops runs: in the loader worker, on one sample's crops (multicrop, CPU training), or on the
training device, on the whole batch (train.prepare_batch with --gpu-augment). All randomness comes from a
torch.Generator, so a sample's crops depend only on its seed, wherever the colour ops run.
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# input normalisations (mean, std) by name: ImageNet's (DINOv2, OpenMidnight, eva, most public models), Midnight's
# 0.5 / 0.5, and H-optimus-0's own statistics (its model card)
NORMS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3),
         "hoptimus": ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))}


@dataclass
class AugmentConfig:
    """The recipe's values (RECIPE.md §6). A probability of 0 switches an op off."""
    global_size: int = 224
    local_size: int = 98
    n_local_crops: int = 8
    global_scale: tuple = (0.32, 1.0)
    local_scale: tuple = (0.05, 0.32)
    flip_prob: float = 0.5
    hed_prob: float = 0.5
    hed_range: float = 0.05  # uniform offset in +-range per stain channel; HED units are OD / ln(1e6) ~ OD / 13.8
    jitter_prob: float = 0.8
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.1
    hue: float = 0.05
    gray_prob: float = 0.2
    # effective blur probabilities for global-1 / global-2 / local: DINOv2's GaussianBlur(p) applies with 1 - p,
    # so its nominal 1.0 / 0.1 / 0.5 really are 0 / 0.9 / 0.5, which is what every released model saw
    blur_probs: tuple = (0.0, 0.9, 0.5)
    blur_sigma: tuple = (0.1, 2.0)
    blur_kernel: int = 9
    mean: tuple = field(default=IMAGENET_MEAN)
    std: tuple = field(default=IMAGENET_STD)


def _uniform(g, lo=0.0, hi=1.0, n=None):
    u = torch.rand(n if n is not None else (), generator=g, dtype=torch.float64)
    return lo + (hi - lo) * u if n is not None else lo + (hi - lo) * u.item()


# -----------------------------------------------------------------------------
# HED stain space (Ruifrok & Johnston 2001), with scikit-image's rgb2hed / hed2rgb conventions

RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29],   # haematoxylin
                             [0.07, 0.99, 0.11],   # eosin
                             [0.27, 0.57, 0.78]],  # DAB
                            dtype=torch.float64)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
LOG_ADJUST = math.log(1e-6)  # skimage clamps RGB at 1e-6, so optical densities are scaled to [0, 1] by log(1e-6)


def _channel_matmul(x, M):
    # (..., 3, H, W) x (3, 3) over the channel axis: out_c = sum_j x_j M[j, c]  (skimage's pixel-row @ M),
    # as a 1x1 convolution, which is much faster than einsum on channels-first images
    shape = x.shape
    y = F.conv2d(x.reshape(-1, 3, shape[-2], shape[-1]), M.T.to(x.dtype)[:, :, None, None])
    return y.reshape(shape)


def rgb_to_hed(rgb):
    """RGB in [0, 1], (..., 3, H, W) -> stain concentrations (H, E, D), clamped at 0 as skimage.color.rgb2hed."""
    od = torch.log(rgb.clamp_min(1e-6)) / LOG_ADJUST
    return _channel_matmul(od, HED_FROM_RGB).clamp_min(0)


def hed_to_rgb(hed):
    """Stain concentrations (..., 3, H, W) -> RGB in [0, 1], as skimage.color.hed2rgb."""
    return torch.exp(_channel_matmul(hed * LOG_ADJUST, RGB_FROM_HED)).clamp(0, 1)


def hed_jitter(rgb, offsets):
    """OpenMidnight's HED jitter with given offsets (..., 3): RGB -> HED, add one offset per stain channel, clip
    HED to [0, 1], back to RGB. Even zero offsets change pixels outside the stain cone (rgb2hed clamps at 0)."""
    hed = rgb_to_hed(rgb) + offsets[..., :, None, None].to(rgb.dtype)
    return hed_to_rgb(hed.clamp(0, 1))


# -----------------------------------------------------------------------------
# colour jitter, grayscale, blur: torchvision's formulas on float tensors

def _gray(x):
    # ITU-R 601-2 luma, as PIL's convert("L") that OpenMidnight's PIL pipeline uses
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blend(x, other, factor):
    return (factor[:, None, None, None] * x + (1 - factor[:, None, None, None]) * other).clamp(0, 1)


def adjust_brightness(x, f):
    return _blend(x, torch.zeros_like(x), f)


def adjust_contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return _blend(x, _gray(x), f)


def adjust_hue(x, shift):
    """Rotate the hue by `shift` (fraction of a turn) in HSV space. Max and min (V and V - VS) are preserved; the
    new channels follow from the branch-free HSV -> RGB formula. Masks are used as float factors because
    torch.where and max(dim) are several times slower than arithmetic on CPU."""
    r, g, b = x.unbind(1)
    maxc, minc = torch.maximum(torch.maximum(r, g), b), torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    d = delta + (delta == 0).to(x.dtype)  # grey pixels: any hue gives back v in every channel
    is_r = (maxc == r).to(x.dtype)
    is_g = (maxc == g).to(x.dtype) * (1 - is_r)
    is_b = 1 - is_r - is_g
    h = (is_r * (g - b) + is_g * (2 * d + b - r) + is_b * (4 * d + r - g)) / d  # hue in sextants, [-1, 5)
    h = h + 6.0 * shift.to(x.dtype)[:, None, None]
    h = h + 6.0 * (h < 0).to(x.dtype) - 6.0 * (h >= 6).to(x.dtype)  # wrap to [0, 6)
    # channel c = v - (v - min) clamp(min(k, 4 - k), 0, 1) with k = (n_c + h) mod 6 and n = 5, 3, 1 for R, G, B
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    k = n + h[:, None]
    k = k - 6.0 * (k >= 6).to(x.dtype)
    return maxc[:, None] - delta[:, None] * torch.minimum(k, 4.0 - k).clamp(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def gaussian_blur(x, sigma, kernel_size=9):
    """Separable Gaussian blur with reflect padding (torchvision's GaussianBlur), one sigma per image. Written as
    a weighted sum of shifted slices: a per-image kernel rules out one shared conv weight, and grouped depthwise
    convolutions are slow on CPU."""
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t[None] / sigma[:, None].to(x.dtype)) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (n, kernel_size)
    H, W = x.shape[-2:]
    y = F.pad(x, (half, half, 0, 0), mode="reflect")
    x = sum(k[:, i, None, None, None] * y[..., i:i + W] for i in range(kernel_size))
    y = F.pad(x, (0, 0, half, half), mode="reflect")
    return sum(k[:, i, None, None, None] * y[..., i:i + H, :] for i in range(kernel_size))


# -----------------------------------------------------------------------------
# per-crop random colour parameters, and applying them (the shared CPU / GPU code)

def draw_color_params(n, blur_prob, cfg, generator=None):
    """Random colour parameters for n crops. blur_prob: a float or one probability per crop."""
    g = generator
    blur_prob = torch.as_tensor(blur_prob, dtype=torch.float64).expand(n)
    return {
        "hed_apply": _uniform(g, n=n) < cfg.hed_prob,
        "hed_offsets": _uniform(g, -cfg.hed_range, cfg.hed_range, n=(n, 3)).float(),
        "jitter_apply": _uniform(g, n=n) < cfg.jitter_prob,
        "jitter_order": torch.argsort(torch.rand(n, 4, generator=g), dim=1),  # torchvision's random op order
        "jitter_factors": torch.stack([_uniform(g, 1 - cfg.brightness, 1 + cfg.brightness, n=n),
                                       _uniform(g, 1 - cfg.contrast, 1 + cfg.contrast, n=n),
                                       _uniform(g, 1 - cfg.saturation, 1 + cfg.saturation, n=n),
                                       _uniform(g, -cfg.hue, cfg.hue, n=n)], dim=1).float(),
        "gray": _uniform(g, n=n) < cfg.gray_prob,
        "blur_apply": _uniform(g, n=n) < blur_prob,
        "blur_sigma": _uniform(g, cfg.blur_sigma[0], cfg.blur_sigma[1], n=n).float(),
    }


def _apply_on(x, sel, fn, *args):
    """x[sel] = fn(x[sel], *args[sel]): an op runs only on the crops that drew it."""
    idx = sel.nonzero().flatten()
    if idx.numel():
        x[idx] = fn(x[idx], *(a[idx] for a in args))
    return x


def color_augment(x, params, cfg):
    """HED jitter -> colour jitter (random order, p) -> grayscale -> blur on x (n, 3, H, W) float in [0, 1]."""
    params = {k: v.to(x.device, non_blocking=True) for k, v in params.items()}
    x = x.clone()  # the ops below write into x
    x = _apply_on(x, params["hed_apply"], hed_jitter, params["hed_offsets"])
    for slot in range(4):
        for op_id, op in enumerate(JITTER_OPS):
            sel = params["jitter_apply"] & (params["jitter_order"][:, slot] == op_id)
            x = _apply_on(x, sel, op, params["jitter_factors"][:, op_id])
    x = torch.where(params["gray"][:, None, None, None], _gray(x).expand_as(x), x)
    return _apply_on(x, params["blur_apply"], lambda t, s: gaussian_blur(t, s, cfg.blur_kernel), params["blur_sigma"])


def finish_crops(x_uint8, params, cfg):
    """The second half of the pipeline: colour ops, then normalisation, on uint8 crops (n, 3, S, S)."""
    x = color_augment(x_uint8.float().div_(255.0), params, cfg)
    return normalize(x, cfg.mean, cfg.std)


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(x - mean) / std per channel of (..., 3, H, W) images in [0, 1]; ImageNet's statistics unless given."""
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


# -----------------------------------------------------------------------------
# multi-crop geometry (PIL, in the workers)

def random_resized_crop_params(H, W, scale, generator=None, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params: area fraction ~ U(scale), log aspect ~ U(log ratio), 10 tries,
    then a centre crop fallback. Returns top, left, height, width."""
    area = H * W
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, scale[0], scale[1])
        aspect = math.exp(_uniform(generator, log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= W and 0 < h <= H:
            top = int(_uniform(generator) * (H - h + 1))
            left = int(_uniform(generator) * (W - w + 1))
            return top, left, h, w
    in_ratio = W / H
    if in_ratio < ratio[0]:
        w, h = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = H, int(round(H * ratio[1]))
    else:
        w, h = W, H
    return (H - h) // 2, (W - w) // 2, h, w


def _crop(img, size, scale, flip_prob, generator):
    top, left, h, w = random_resized_crop_params(img.height, img.width, scale, generator)
    crop = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)  # PIL bicubic, antialiased
    if _uniform(generator) < flip_prob:
        crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1)  # (3, size, size) uint8


def multicrop_uint8(img, generator=None, cfg=None):
    """The first half of the pipeline: 2 global + n local random-resized, flipped crops as uint8 (3, S, S) tensors,
    plus the colour parameters drawn for them (applied by finish_crops)."""
    cfg = cfg or AugmentConfig()
    if not isinstance(img, Image.Image):
        img = Image.fromarray(np.asarray(img, dtype=np.uint8))
    img = img.convert("RGB")
    out = {
        "global_crops": [_crop(img, cfg.global_size, cfg.global_scale, cfg.flip_prob, generator) for _ in range(2)],
        "local_crops": [_crop(img, cfg.local_size, cfg.local_scale, cfg.flip_prob, generator)
                        for _ in range(cfg.n_local_crops)],
    }
    out["global_params"] = draw_color_params(2, cfg.blur_probs[:2], cfg, generator)
    out["local_params"] = draw_color_params(cfg.n_local_crops, cfg.blur_probs[2], cfg, generator)
    return out


def multicrop(img, generator=None, cfg=None):
    """The whole pipeline on one sample, in the worker: {"global_crops": [2 x (3, 224, 224) float],
    "local_crops": [8 x (3, 98, 98) float]}, normalised."""
    cfg = cfg or AugmentConfig()
    raw = multicrop_uint8(img, generator, cfg)
    return {f"{kind}_crops": list(finish_crops(torch.stack(raw[f"{kind}_crops"]), raw[f"{kind}_params"], cfg))
            for kind in ("global", "local")}


# -----------------------------------------------------------------------------
# iBOT block masking (BEiT's generator as DINOv2 uses it) and the batch collate

def block_mask(n_target, grid=16, min_patches=4, max_patches=None, min_aspect=0.3, generator=None):
    """A (grid, grid) bool mask with about n_target cells in random rectangles (aspect 0.3 to 1/0.3, at least
    min_patches cells each, at most max_patches per rectangle). Never overshoots; may stop a few cells short."""
    max_patches = max_patches if max_patches is not None else 0.5 * grid * grid
    mask = np.zeros((grid, grid), dtype=bool)
    log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
    count = 0
    while count < n_target:
        budget = min(n_target - count, max_patches)
        added = 0
        for _ in range(10):
            area = _uniform(generator, min_patches, budget)
            aspect = math.exp(_uniform(generator, *log_aspect))
            h, w = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if w < grid and h < grid:
                top = int(_uniform(generator) * (grid - h + 1))
                left = int(_uniform(generator) * (grid - w + 1))
                new = h * w - mask[top:top + h, left:left + w].sum()
                if 0 < new <= budget:
                    mask[top:top + h, left:left + w] = True
                    added = int(new)
                    break
        if added == 0:
            break
        count += added
    return mask


def sample_masks(n_crops, grid=16, ratio_min_max=(0.1, 0.45), sample_prob=0.5, generator=None):
    """Masks for one batch of global crops, as DINOv2's collate draws them: int(n_crops * sample_prob) crops get a
    block mask whose ratio is stratified over ratio_min_max (the i-th masked crop draws its ratio from the i-th of
    equal bins), the rest none, in shuffled order. Returns (n_crops, grid*grid) bool."""
    N = grid * grid
    n_masked = int(n_crops * sample_prob)
    bins = torch.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1).tolist()
    masks = [block_mask(int(N * _uniform(generator, bins[i], bins[i + 1])), grid, generator=generator)
             for i in range(n_masked)]
    masks += [np.zeros((grid, grid), dtype=bool)] * (n_crops - n_masked)
    order = torch.randperm(n_crops, generator=generator).tolist()
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_crops, N))


def mask_targets(masks):
    """What the iBOT loss needs from (n_crops, N) bool masks: the masks, flat indices of the masked tokens, and each
    masked token's weight 1 / (masked count of its crop), so that every masked crop weighs the same."""
    counts = masks.sum(dim=1)
    return {"masks": masks, "mask_indices": masks.flatten().nonzero().flatten(),
            "masks_weight": (1.0 / counts.clamp(min=1)).unsqueeze(1).expand_as(masks)[masks]}


def collate(samples, masks):
    """Stack multicrop outputs into a batch: global_crops (2B, 3, S, S) ordered [g1 of all samples; g2 of all],
    local_crops (nB, 3, s, s) by crop index, colour parameters stacked alike (uint8 crops), and the iBOT mask
    tensors of the given (2B, grid^2) masks (rows in the order of global_crops)."""
    n_global, n_local = len(samples[0]["global_crops"]), len(samples[0]["local_crops"])
    batch = {
        "global_crops": torch.stack([s["global_crops"][i] for i in range(n_global) for s in samples]),
        "local_crops": torch.stack([s["local_crops"][i] for i in range(n_local) for s in samples]),
    }
    for kind, n in (("global", n_global), ("local", n_local)):
        if f"{kind}_params" in samples[0]:
            keys = samples[0][f"{kind}_params"].keys()
            batch[f"{kind}_params"] = {k: torch.stack([s[f"{kind}_params"][k][i] for i in range(n) for s in samples])
                                       for k in keys}
    for key in ("index", "epoch", "position"):
        if key in samples[0]:
            batch[key] = torch.tensor([s[key] for s in samples])
    return {**batch, **mask_targets(masks)}

"""
Reading the patch store that prepare_patches.py writes, and feeding it to training:
PatchStore (random access to decoded patches), MultiCropDataset (a patch -> its augmented crops, seeded by the
sample alone), InfiniteSampler (disjoint per-rank parts of every epoch, resumable from a sample counter) and
make_loader (the DataLoader set up for throughput).
"""
import io
import json
import os
from functools import partial

import numpy as np
import torch
from PIL import Image

import augment


class PatchStore:
    """store[i] -> (patch (H, W, 3) uint8, meta {slide, level, x, y, mpp, size}); x, y are level-0 coordinates as
    openslide.read_region takes them. Only shards listed in manifest.json (written last) are read."""

    def __init__(self, root):
        self.root = root
        path = os.path.join(root, "manifest.json")
        if not os.path.exists(path):
            hint = ("a run still in progress or killed writes no manifest: re-run the same prepare_patches.py "
                    "command to finish it" if os.path.isdir(os.path.join(root, "shards")) else
                    "create one with: python prepare_patches.py SLIDES --out " + root)
            raise FileNotFoundError(f"{root!r} is not a finished patch store (no manifest.json); {hint}")
        with open(path) as f:
            self.manifest = json.load(f)
        cols = {k: [] for k in ("offsets", "lengths", "level", "x", "y", "mpp", "size")}
        self.shards, self.slides, shard_of = [], [], []
        for s_id, shard in enumerate(self.manifest["shards"]):
            base = os.path.join(root, "shards", shard["key"])
            with np.load(base + ".idx.npz") as z:
                for k in cols:
                    cols[k].append(z[k])
                n = len(z["offsets"])
                if n != shard["n"] or os.path.getsize(base + ".bin") != int(z["offsets"][-1] + z["lengths"][-1]):
                    raise ValueError(f"shard {base} does not match the manifest (truncated or replaced); "
                                     "delete it and re-run prepare_patches.py")
            self.shards.append(base + ".bin")
            self.slides.append(shard["slide"])
            shard_of.append(np.full(n, s_id, dtype=np.int32))
        self.index = {k: np.concatenate(v) if v else np.zeros(0) for k, v in cols.items()}
        self.shard_of = np.concatenate(shard_of) if shard_of else np.zeros(0, dtype=np.int32)
        self._files, self._pid = {}, None

    def __len__(self):
        return len(self.shard_of)

    def read_bytes(self, i):
        if self._pid != os.getpid():  # file handles are per process (DataLoader workers fork)
            self._files, self._pid = {}, os.getpid()
        s = int(self.shard_of[i])
        if s not in self._files:
            self._files[s] = os.open(self.shards[s], os.O_RDONLY)
        return os.pread(self._files[s], int(self.index["lengths"][i]), int(self.index["offsets"][i]))

    def meta(self, i):
        ix = self.index
        return {"slide": self.slides[int(self.shard_of[i])], "level": int(ix["level"][i]), "x": int(ix["x"][i]),
                "y": int(ix["y"][i]), "mpp": float(ix["mpp"][i]), "size": int(ix["size"][i])}

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"patch {i} out of range for a store of {len(self)}")
        img = Image.open(io.BytesIO(self.read_bytes(i)))
        img.draft("RGB", img.size)  # JPEG: decode straight to RGB at full size
        return np.asarray(img.convert("RGB")), self.meta(i)

    def __getstate__(self):  # no open file descriptors into worker processes
        return {**self.__dict__, "_files": {}, "_pid": None}


def sample_generator(seed, epoch, index):
    """The one source of randomness for a sample's crops: a function of (seed, epoch, store index) only, so the
    stream is the same on resume and for any split of the global batch over ranks and workers."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))


class MultiCropDataset(torch.utils.data.Dataset):
    """Indexed by (epoch, store index, position) from InfiniteSampler. on_device=True returns uint8 crops plus
    their colour parameters (augment.finish_crops then runs batched on the training device); False finishes the
    crops here, in the worker."""

    def __init__(self, store, cfg=None, seed=0, on_device=False):
        self.store, self.cfg, self.seed, self.on_device = store, cfg or augment.AugmentConfig(), seed, on_device

    def __len__(self):
        return len(self.store)

    def __getitem__(self, key):
        epoch, index, position = key
        patch, _ = self.store[index]
        g = sample_generator(self.seed, epoch, index)
        out = (augment.multicrop_uint8 if self.on_device else augment.multicrop)(patch, g, self.cfg)
        out.update(index=index, epoch=epoch, position=position)
        return out


class InfiniteSampler(torch.utils.data.Sampler):
    """Yields (epoch, store index, global sample number) forever. Global sample s belongs to epoch s // n and is item
    s % n of that epoch's permutation (seeded by seed and epoch). Step t's global batch is samples [tG, (t+1)G),
    G = world x B, and rank r takes the r-th block of B of it: the ranks' parts of every epoch are disjoint and
    cover it, the global batch does not depend on the number of ranks, and `start` (this rank's samples already
    consumed, = steps x B) resumes the exact sequence."""

    def __init__(self, n, batch_size, rank=0, world_size=1, seed=0, start=0):
        if n == 0:
            raise ValueError("the patch store is empty")
        self.n, self.B, self.rank, self.world, self.seed, self.start = n, batch_size, rank, world_size, seed, start
        self._perm_epoch, self._perm = None, None

    def position(self, k):
        """Global sample number of this rank's k-th sample."""
        return (k // self.B) * self.B * self.world + self.rank * self.B + k % self.B

    def item(self, k):
        position = self.position(k)
        epoch, j = divmod(position, self.n)
        if epoch != self._perm_epoch:
            # an epoch's permutation has its own seed space (1_000_003, a prime, keeps seeds and epochs apart)
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g).numpy(), epoch
        return epoch, int(self._perm[j]), position

    def __iter__(self):
        k = self.start
        while True:
            yield self.item(k)
            k += 1

    def __len__(self):  # infinite; DataLoader only needs this for progress reporting, which train.py does itself
        return 2 ** 62


def collate_batch(samples, global_batch, seed=0, ratio_min_max=(0.1, 0.45), sample_prob=0.5, grid=16):
    """augment.collate with the iBOT masks of the whole global batch, drawn as DINOv2's collate draws them for a
    batch (stratified ratios over all its global crops), seeded by the global step, and sliced to this rank's
    samples: a batch, masks included, is then the same for any split of the global batch over ranks and workers,
    and on resume."""
    step = samples[0]["position"] // global_batch
    # its own stream: sample_generator(seed, epoch, index) seeds the crops, and (seed, step, 0) would collide with
    # patch 0's; 7919 (a prime) moves the masks to another seed
    g = sample_generator(seed + 7919, step, 0)
    masks = augment.sample_masks(2 * global_batch, grid, ratio_min_max, sample_prob, g)  # rows [g1 all; g2 all]
    slots = [s["position"] % global_batch for s in samples]
    rows = [v * global_batch + slot for v in range(2) for slot in slots]
    return augment.collate(samples, masks[rows])


def make_loader(store, batch_size, cfg=None, seed=0, rank=0, world_size=1, start=0, on_device=False, workers=4,
                pin_memory=False, prefetch_factor=4, mask_ratio=(0.1, 0.45), mask_prob=0.5, patch_size=14):
    """DataLoader over the store: workers decode and crop (and, unless on_device, run the colour ops); persistent
    workers, prefetching and pinned memory keep the device fed. `start` = samples this rank already consumed."""
    dataset = MultiCropDataset(store, cfg, seed, on_device)
    sampler = InfiniteSampler(len(store), batch_size, rank, world_size, seed, start)
    grid = (cfg or augment.AugmentConfig()).global_size // patch_size  # iBOT masks live on the patch grid
    collate = partial(collate_batch, global_batch=batch_size * world_size, seed=seed, ratio_min_max=mask_ratio,
                      sample_prob=mask_prob, grid=grid)
    return torch.utils.data.DataLoader(  # own generator: creating workers must not consume the global RNG
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=pin_memory, drop_last=True, persistent_workers=workers > 0,
        prefetch_factor=prefetch_factor if workers > 0 else None)

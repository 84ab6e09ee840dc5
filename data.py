"""
Reading the patch store that prepare_patches.py writes, and feeding it to training:
PatchStore (random access to decoded patches through the store's memory-mapped index), MultiCropDataset (a patch
-> its augmented crops, seeded by the sample alone), InfiniteSampler (disjoint per-rank parts of every epoch,
resumable from a sample counter) and make_loader (the DataLoader set up for throughput within the open-file limit).
"""
import bisect
import errno
import hashlib
import io
import json
import os
import resource
from collections import OrderedDict
from functools import partial

import numpy as np
import torch
from PIL import Image

import augment
import cli
from files import atomic_write, lock_folder


# -----------------------------------------------------------------------------
# the store's index: one memory-mapped file, however many slides

INDEX_COLUMNS = ("offset", "length", "level", "x", "y", "size", "mpp")  # mpp: a code into index.json's mpp_values
NAN = float("nan")  # one object: NaN (no mpp metadata) is then one key of the mpp codes


def smallest_uint(largest):
    return next(t for t in (np.uint8, np.uint16, np.uint32, np.uint64) if largest <= np.iinfo(t).max)


def manifest_sha1(root):
    with open(os.path.join(root, "manifest.json"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def index_is_current(root):
    """index.json (written after index.npy) names the manifest it was built from and index.npy's size: an index of
    another manifest, or of a build killed before index.json, is never trusted."""
    try:
        with open(os.path.join(root, "index.json")) as f:
            info = json.load(f)
        return info if (info.get("version") == 1 and info["manifest_sha1"] == manifest_sha1(root) and
                        os.path.getsize(os.path.join(root, "index.npy")) == info["bytes"]) else None
    except (OSError, ValueError, KeyError):
        return None


def build_index(root, progress=True):
    """index.npy: one packed record per patch (its shard's payload offset and length, level, x, y, read size and
    mpp code), each column at the smallest unsigned type that holds it, in manifest order; index.json: the manifest
    it was built from, the mpp values the codes point into, the column types. Built in one pass over the shards'
    .idx.npz files (the payloads are never read), written atomically, index.json last. prepare_patches.py writes it
    as a store's last step; a store without one gets it on first open."""
    with open(os.path.join(root, "manifest.json")) as f:
        manifest = json.load(f)
    sha1 = manifest_sha1(root)
    cols, mpp_codes, shard_bytes = {k: [] for k in INDEX_COLUMNS}, {}, []
    for shard in cli.progress(manifest["shards"], desc=f"index of {root}", unit="slide", disable=not progress):
        base = os.path.join(root, "shards", shard["key"])
        with np.load(base + ".idx.npz") as z:
            values, inverse = np.unique(z["mpp"], return_inverse=True)  # a few values per slide (one a level)
            codes = [mpp_codes.setdefault(NAN if v != v else float(v), len(mpp_codes)) for v in values]
            part = {"offset": z["offsets"], "length": z["lengths"], "level": z["level"], "x": z["x"], "y": z["y"],
                    "size": z["size"], "mpp": np.array(codes)[inverse.reshape(-1)]}
        end = int((part["offset"] + part["length"]).max())  # the .bin's size: its last payload's end
        if len(part["offset"]) != shard["n"] or os.path.getsize(base + ".bin") != end:
            raise ValueError(f"shard {base} does not match the manifest (truncated or replaced); delete it and "
                             "re-run prepare_patches.py")
        shard_bytes.append(end)
        for k, v in part.items():  # each shard's columns at their own smallest type: memory ~ the index's size
            cols[k].append(v.astype(smallest_uint(int(v.max()))))
    dtype = np.dtype([(k, smallest_uint(max((int(v.max()) for v in cols[k]), default=0))) for k in INDEX_COLUMNS])
    records = np.zeros(sum(s["n"] for s in manifest["shards"]), dtype)
    for k in INDEX_COLUMNS:
        if cols[k]:
            records[k] = np.concatenate(cols[k])
        cols[k] = None
    atomic_write(os.path.join(root, "index.npy"), lambda f: np.save(f, records))
    info = {"version": 1, "manifest_sha1": sha1, "n_patches": len(records),
            "bytes": os.path.getsize(os.path.join(root, "index.npy")),
            "columns": {k: dtype[k].name for k in INDEX_COLUMNS}, "mpp_values": list(mpp_codes),
            "shard_bytes": shard_bytes}
    atomic_write(os.path.join(root, "index.json"), lambda f: f.write(json.dumps(info).encode()))
    return info


class PatchStore:
    """store[i] -> (patch (H, W, 3) uint8, meta {slide, level, x, y, mpp, size}); x, y are level-0 coordinates as
    openslide.read_region takes them. Only shards listed in manifest.json (written last) are read.

    At OpenMidnight's scale (12,000 slides, 28.8M patches) opening maps index.npy (no copy: ranks and workers share
    its pages through the page cache), a pickled store is its path (DataLoader workers reopen it, whatever the
    start method), and each process keeps at most MAX_OPEN_SHARDS shard files open (least recently used closed)."""

    MAX_OPEN_SHARDS = 16

    def __init__(self, root, check_shards=True):
        self.root = root
        path = os.path.join(root, "manifest.json")
        if not os.path.exists(path):
            hint = ("a run still in progress or killed writes no manifest: re-run the same prepare_patches.py "
                    "command to finish it" if os.path.isdir(os.path.join(root, "shards")) else
                    "create one with: python prepare_patches.py SLIDES --out " + root)
            raise FileNotFoundError(f"{root!r} is not a finished patch store (no manifest.json); {hint}")
        info = index_is_current(root) or self._build(root)
        with open(path) as f:
            shards = json.load(f)["shards"]
        self.slides = [s["slide"] for s in shards]
        self.shard_paths = [os.path.join(root, "shards", s["key"] + ".bin") for s in shards]
        self.starts = np.cumsum([0] + [s["n"] for s in shards]).tolist()  # shard s: [starts[s], starts[s + 1])
        # mapped, never read whole; a plain view of the map, whose indexing skips np.memmap's Python-level __getitem__
        self.index = np.load(os.path.join(root, "index.npy"), mmap_mode="r").view(np.ndarray)
        self.mpp_values = [float(m) for m in info["mpp_values"]]
        for path, size in zip(self.shard_paths, info["shard_bytes"]) if check_shards else ():
            if not os.path.exists(path) or os.path.getsize(path) != size:  # one stat a slide
                raise ValueError(f"shard {path} does not match the manifest (missing, truncated or replaced): "
                                 "delete it and its .idx.npz and re-run prepare_patches.py")
        self._files, self._pid = OrderedDict(), os.getpid()

    @staticmethod
    def _build(root):
        """A store written before index.npy existed (or whose manifest changed) gets its index once, under a lock
        on the store: a second process waits for the first one's index instead of building its own."""
        try:
            lock = lock_folder(root, ".index.lock", wait=True)
        except OSError as e:
            raise SystemExit(f"{root} has no current index.npy and cannot be written ({e.strerror}): build it once "
                             f"as a user who can write there: python -c \"import data; data.build_index('{root}')\"")
        with lock:
            return index_is_current(root) or build_index(root)

    def __len__(self):
        return len(self.index)

    def locate(self, i):
        """(shard, its offset, length, level, x, y, size, mpp code) of patch i: one record, as Python ints."""
        return (bisect.bisect_right(self.starts, i) - 1, *self.index[i].item())

    def _open(self, s):
        """The shard's descriptor from a per-process LRU (DataLoader workers fork: inherited ones are closed)."""
        if self._pid != os.getpid():
            for fd in self._files.values():
                os.close(fd)
            self._files, self._pid = OrderedDict(), os.getpid()
        if s in self._files:
            self._files.move_to_end(s)
            return self._files[s]
        if len(self._files) >= self.MAX_OPEN_SHARDS:
            os.close(self._files.popitem(last=False)[1])
        try:
            self._files[s] = os.open(self.shard_paths[s], os.O_RDONLY)
        except OSError as e:
            if e.errno != errno.EMFILE:
                raise
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            raise OSError(e.errno, f"too many open files in process {os.getpid()}: its limit (RLIMIT_NOFILE, "
                          f"`ulimit -n`) is {soft} (hard {hard}) and the patch store holds at most "
                          f"{self.MAX_OPEN_SHARDS}; raise it (ulimit -n 4096) or lower --workers") from None
        return self._files[s]

    def read_bytes(self, i, where=None):
        s, offset, length = (where or self.locate(i))[:3]
        payload = os.pread(self._open(s), length, offset)
        if len(payload) != length:
            raise ValueError(f"{self.shard_paths[s]} is shorter than its index says (truncated or replaced): delete "
                             "it and re-run prepare_patches.py")
        return payload

    def meta(self, i, where=None):
        s, _, _, level, x, y, size, mpp = where or self.locate(i)
        return {"slide": self.slides[s], "level": level, "x": x, "y": y, "mpp": self.mpp_values[mpp], "size": size}

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"patch {i} out of range for a store of {len(self)}")
        where = self.locate(i)
        img = Image.open(io.BytesIO(self.read_bytes(i, where)))
        img.draft("RGB", img.size)  # JPEG: decode straight to RGB at full size
        return np.asarray(img.convert("RGB")), self.meta(i, where)

    def __getstate__(self):  # a pickled store is its path: a worker maps the same index.npy, nothing is copied
        return {"root": self.root}

    def __setstate__(self, state):  # the shards were checked where the store was first opened
        self.__init__(state["root"], check_shards=False)


def open_store(root, master=True, world=1):
    """A finished store, opened by rank 0 first (which builds its index if the store was written before
    index.npy existed) while the other ranks wait for it, then map the same index.npy."""
    store = PatchStore(root) if master else None
    if world > 1:
        torch.distributed.barrier()
    store = store if store is not None else PatchStore(root, check_shards=False)
    if len(store) == 0:
        raise SystemExit(f"the patch store {root} holds no patches (see its report.json for why every slide was "
                         "skipped)")
    return store


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
            # int32 halves the permutation's memory (115 MB for 28.8M patches) and draws the same order as int64
            dtype = torch.int32 if self.n < 2**31 else torch.int64
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g, dtype=dtype).numpy(), epoch
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
    batch = augment.collate(samples, masks[rows])
    return one_storage(batch) if torch.utils.data.get_worker_info() else batch


def one_storage(batch):
    """The batch's tensors (crops, colour parameters, masks, ids: ~24) copied into views of one buffer. A worker
    hands each storage to the main process as a file descriptor, which stays open there while the batch waits in
    the prefetch queue (torch's default file_descriptor sharing): one per batch instead of ~24 lets workers x
    prefetch_factor batches fit a low RLIMIT_NOFILE (`ulimit -n`)."""
    slots = [(d, k, v) for d in (batch, *(v for v in batch.values() if isinstance(v, dict)))
             for k, v in d.items() if torch.is_tensor(v)]
    starts, end = [], 0
    for _, _, t in slots:
        start = -(-end // 8) * 8  # 8-byte aligned, so that any dtype can view its slice
        starts.append(start)
        end = start + t.numel() * t.element_size()
    buf = torch.empty(end, dtype=torch.uint8)
    for (d, k, t), start in zip(slots, starts):
        d[k] = buf[start:start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        d[k].copy_(t)
    return batch


def fit_open_files(workers, prefetch_factor):
    """The main process holds about 32 files of its own, the store's shards, and per worker its pipes and one
    descriptor per batch in flight (one_storage): raise the soft RLIMIT_NOFILE towards the hard one if that does
    not fit (no privilege needed), or stop with the limit named and how to raise it."""
    need = 32 + PatchStore.MAX_OPEN_SHARDS + workers * (3 + prefetch_factor)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise SystemExit(f"the open-file limit (RLIMIT_NOFILE, `ulimit -n`) is {soft} (hard limit {hard}); "
                         f"{workers} loader workers need about {need}: raise it (ulimit -n 4096, or ask for a higher "
                         "hard limit) or lower --workers")
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def make_loader(store, batch_size, cfg=None, seed=0, rank=0, world_size=1, start=0, on_device=False, workers=4,
                pin_memory=False, prefetch_factor=4, mask_ratio=(0.1, 0.45), mask_prob=0.5, patch_size=14):
    """DataLoader over the store: workers decode and crop (and, unless on_device, run the colour ops); persistent
    workers, prefetching and pinned memory keep the device fed. `start` = samples this rank already consumed."""
    fit_open_files(workers, prefetch_factor)
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

"""Frozen-stage feature caching (`--cache_frozen_features`): in stage one the backbone is frozen and deterministic
(fixed noise at `feature_timestep`, fixed conditioning), so its feature maps are a function of its input tensor
alone. They are computed once per distinct input and served from a cache in later epochs.

The rule: with caching, stage one's augmentation is restricted to a finite set, horizontal flip only (colour
jitter, zoom-out and random crops are dropped in stage one), so each (image, flip) is one input; the flips alternate
between epochs (`data.AlternatingHorizontalFlip`), so epochs one and two see every input and later epochs only hit.
Stage two uses the full augmentation again and never the cache (the backbone trains).

Pieces:

- `input_keys`: the key of each image of a batch, a blake2b hash of its exact input tensor (bytes, shape, dtype)
  and of the context that can change the output (device type, autocast): exact whatever produced the pixels.
- `MemoryFeatureStore` (CPU tensors in RAM) and `DiskFeatureStore` (one safetensors file per key, in a folder
  named by a fingerprint of the backbone's config and weights, so a folder is never read for another backbone).
- `FrozenFeatureCache`: an `nn.Module` that stands in for the detector's `DiTBackbone` during stage one. It
  registers the backbone's own children under their own names, so `state_dict()`, `named_parameters()`,
  checkpoints and `save_pretrained` see exactly the backbone's keys and tensors; misses run the real backbone under
  `no_grad`. It refuses to serve while any backbone parameter requires grad.
- `FeatureCaching.serving(model, trainer)`: stage one's context (used by `train_in_stages`): flip-only
  augmentation, the cache in place, per-epoch logging; afterwards the original backbone and augmentation are back.

Each process keeps its own cache (under DDP each sees its own shard of the images, a different one each epoch, so
each may come to hold most of the set; a `DiskFeatureStore` folder can be shared, files are written atomically).
Training-side only: never imported by the inference files.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.modeling_outputs import BackboneOutput

from ..modeling_dit_backbone import DiTBackbone

logger = logging.getLogger(__name__)

MIB = 2**20


def stage_one_augmentation(strength: str) -> str:
    """The augmentation stage one uses when its features are cached: horizontal flip only ("flip"), or none when the
    run has none."""
    return "none" if strength == "none" else "flip"


def real_backbone(model: nn.Module) -> DiTBackbone:
    """The model's `DiTBackbone`, also while a `FrozenFeatureCache` stands in for it."""
    for module in model.modules():
        if isinstance(module, FrozenFeatureCache):
            return module.backbone
        if isinstance(module, DiTBackbone):
            return module
    raise ValueError(f"{type(model).__name__} has no DiTBackbone.")


def _context(device: torch.device) -> str:
    """What besides the input changes the backbone's output bits: where it runs and autocast."""
    autocast = torch.is_autocast_enabled(device.type)
    dtype = torch.get_autocast_dtype(device.type) if autocast else None
    return f"device={device.type};autocast={dtype}"


def input_keys(pixel_values: torch.Tensor) -> list[str]:
    """One key per image of `pixel_values` (`[batch, ...]`): blake2b of its exact bytes, shape, dtype and the
    context (`_context`). Equal keys mean equal inputs (bit for bit) in an equal context."""
    context = _context(pixel_values.device)
    images = pixel_values.detach().to("cpu").contiguous()
    keys = []
    for image in images:
        digest = hashlib.blake2b(digest_size=20)
        digest.update(f"{tuple(image.shape)};{image.dtype};{context};".encode())
        digest.update(image.view(torch.uint8).numpy())
        keys.append(digest.hexdigest())
    return keys


def backbone_fingerprint(backbone: DiTBackbone) -> str:
    """blake2b of everything that fixes the backbone's function: config (incl. the attention implementation), dtype,
    device type and every weight's bytes. Names an on-disk cache folder, so no folder is read for another backbone."""
    digest = hashlib.blake2b(digest_size=20)
    config = backbone.config
    digest.update(config.to_json_string(use_diff=False).encode())
    digest.update(f"attn={config._attn_implementation};dtype={backbone.dtype};device={backbone.device.type}".encode())
    for name, tensor in sorted(backbone.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name};{tuple(tensor.shape)};{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class MemoryFeatureStore:
    """Feature maps per key, as CPU tensors (`[hidden, h, w]` per tap, the backbone's output dtype) in RAM."""

    def __init__(self):
        self.entries: dict[str, tuple[torch.Tensor, ...]] = {}
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: str) -> tuple[torch.Tensor, ...] | None:
        return self.entries.get(key)

    def put(self, key: str, maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """Store copies of `maps` on the CPU; returns what is stored."""
        stored = tuple(m.detach().to("cpu", copy=True) for m in maps)
        if key not in self.entries:
            self.nbytes += sum(m.numel() * m.element_size() for m in stored)
        self.entries[key] = stored
        return stored

    def describe(self) -> str:
        return "in memory"


class DiskFeatureStore:
    """Feature maps per key as `<folder>/<backbone fingerprint>/<key>.safetensors` (tensors "0", "1", ... per tap),
    for sets whose features do not fit in RAM. Files of an earlier run with the same backbone are reused; each file is
    written to a temporary name and renamed, so processes sharing the folder never read a half-written one."""

    def __init__(self, folder: str | os.PathLike, fingerprint: str):
        self.folder = Path(folder) / fingerprint[:32]
        self.folder.mkdir(parents=True, exist_ok=True)
        files = list(self.folder.glob("*.safetensors"))
        self.keys = {path.stem for path in files}
        self.nbytes = sum(path.stat().st_size for path in files)

    def __len__(self) -> int:
        return len(self.keys)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def get(self, key: str) -> tuple[torch.Tensor, ...] | None:
        from safetensors.torch import load_file

        path = self._path(key)
        if key not in self.keys:
            if not path.is_file():  # another process sharing the folder may have written it
                return None
            self.keys.add(key)
            self.nbytes += path.stat().st_size
        tensors = load_file(str(path))
        return tuple(tensors[str(i)] for i in range(len(tensors)))

    def put(self, key: str, maps: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        from safetensors.torch import save_file

        stored = tuple(m.detach().to("cpu", copy=True).contiguous() for m in maps)
        path = self._path(key)
        temporary = path.with_name(f".{key}.{os.getpid()}.tmp")
        save_file({str(i): m for i, m in enumerate(stored)}, str(temporary))
        os.replace(temporary, path)
        if key not in self.keys:
            self.keys.add(key)
            self.nbytes += path.stat().st_size
        return stored

    def describe(self) -> str:
        return f"on disk in {self.folder}"


class FrozenFeatureCache(nn.Module):
    """
    Stands in for a frozen `DiTBackbone`: same call, same `BackboneOutput.feature_maps`, served from `store` for
    inputs seen before. Holds the backbone's children under their own names (so its `state_dict` keys and tensors are
    the backbone's) and the backbone itself outside the module tree, to run it for misses under `torch.no_grad()`.

    Refuses (RuntimeError) to be made for, or to serve, a backbone with any parameter that requires grad: features
    of a training backbone change every step. A call for hidden states or attentions is passed through uncached.
    The backbone has no dropout, so training and evaluation (stage one's validation images) share entries.
    `counts[mode]` = [hits, misses] per image since the last `take_counts(mode)`, mode "train" or "eval";
    `totals[mode]` the same since the cache was made.
    """

    def __init__(self, backbone: DiTBackbone, store: MemoryFeatureStore | DiskFeatureStore | None = None,
                 cache_dir: str | os.PathLike | None = None):
        super().__init__()
        if isinstance(backbone, FrozenFeatureCache):
            raise TypeError("This backbone already has a feature cache in place.")
        self.__dict__["backbone"] = backbone  # not a child: the state_dict keys stay the backbone's
        for name, child in backbone._modules.items():
            self.add_module(name, child)
        for name, parameter in backbone._parameters.items():
            self.register_parameter(name, parameter)
        for name, buffer in backbone._buffers.items():
            self.register_buffer(name, buffer, persistent=name not in backbone._non_persistent_buffers_set)
        self.config = backbone.config
        self.cache_dir = cache_dir
        self._store = store
        self.counts = {"train": [0, 0], "eval": [0, 0]}
        self.totals = {"train": [0, 0], "eval": [0, 0]}
        self.training = backbone.training
        self.check_frozen()

    def check_frozen(self) -> None:
        trainable = [name for name, parameter in self.backbone.named_parameters() if parameter.requires_grad]
        if trainable:
            raise RuntimeError(
                f"The backbone feature cache only serves a frozen backbone, but {len(trainable)} backbone parameters "
                f"require grad (e.g. {trainable[0]}): its features would be stale. Cached features are for stage one "
                "only; remove the cache (FeatureCaching.serving ends it) before training the backbone.")

    @property
    def store(self) -> MemoryFeatureStore | DiskFeatureStore:
        """Made at first use: a `DiskFeatureStore` under `cache_dir` is named by the backbone's fingerprint, taken
        after a resume has loaded the checkpoint's weights (RAM otherwise)."""
        if self._store is None:
            self._store = (DiskFeatureStore(self.cache_dir, backbone_fingerprint(self.backbone)) if self.cache_dir
                           else MemoryFeatureStore())
        return self._store

    def describe(self) -> str:
        return f"on disk under {self.cache_dir}" if self.cache_dir else "in memory"

    def take_counts(self, mode: str) -> tuple[int, int]:
        hits, misses = self.counts[mode]
        self.counts[mode] = [0, 0]
        return hits, misses

    @property
    def size_mib(self) -> float:
        return self.store.nbytes / MIB

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool | None = None, **kwargs) -> BackboneOutput:
        """pixel_values `[batch, 3, H, W]` -> `BackboneOutput(feature_maps=...)`, as `DiTBackbone.forward`."""
        self.check_frozen()
        backbone = self.backbone
        backbone.training = self.training  # its children follow the model's mode; it is not in the module tree
        wants_more = output_hidden_states or (output_hidden_states is None and self.config.output_hidden_states)
        if wants_more or kwargs.get("output_attentions"):
            with torch.no_grad():
                return backbone(pixel_values, output_hidden_states=output_hidden_states, **kwargs)

        keys = input_keys(pixel_values)
        found = [self.store.get(key) for key in keys]
        first_miss = {}  # key -> batch index of its first occurrence, for keys not in the store
        for index, (key, entry) in enumerate(zip(keys, found)):
            if entry is None:
                first_miss.setdefault(key, index)
        if first_miss:
            rows = list(first_miss.values())
            with torch.no_grad():
                maps = backbone(pixel_values[rows]).feature_maps
            computed = {key: self.store.put(key, tuple(tap[j] for tap in maps)) for j, key in enumerate(first_miss)}
            found = [entry if entry is not None else computed[key] for key, entry in zip(keys, found)]
        mode = "train" if self.training else "eval"
        for counts in (self.counts[mode], self.totals[mode]):
            counts[0] += len(keys) - len(first_miss)
            counts[1] += len(first_miss)
        device = pixel_values.device
        feature_maps = tuple(torch.stack([entry[tap] for entry in found]).to(device, non_blocking=True)
                             for tap in range(len(found[0])))
        return BackboneOutput(feature_maps=feature_maps)


def _parent_of_backbone(model: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for name, child in module.named_children():
            if isinstance(child, (DiTBackbone, FrozenFeatureCache)):
                return module, name
    raise ValueError(f"{type(model).__name__} has no DiTBackbone.")


def install_feature_cache(model: nn.Module, store=None, cache_dir: str | os.PathLike | None = None
                          ) -> FrozenFeatureCache:
    """Put a `FrozenFeatureCache` in place of the model's (frozen) `DiTBackbone` (`model.model.backbone` of a
    `DiTForObjectDetection`); `remove_feature_cache` puts the backbone back."""
    parent, name = _parent_of_backbone(model)
    cache = FrozenFeatureCache(getattr(parent, name), store, cache_dir)
    setattr(parent, name, cache)
    return cache


def remove_feature_cache(model: nn.Module) -> DiTBackbone:
    """Put the original `DiTBackbone` back where a `FrozenFeatureCache` stood; returns it."""
    parent, name = _parent_of_backbone(model)
    current = getattr(parent, name)
    if isinstance(current, FrozenFeatureCache):
        current.backbone.train(current.training)
        setattr(parent, name, current.backbone)
        return current.backbone
    return current


class FeatureCacheLog(TrainerCallback):
    """Logs the cache's hits and misses of each training epoch and of each evaluation, and its size; keeps them in
    `history` ({"epoch", "mode", "hits", "misses", "entries", "mib"} per line)."""

    def __init__(self, cache: FrozenFeatureCache):
        self.cache = cache
        self.history: list[dict] = []

    def _log(self, args, state, mode: str) -> None:
        hits, misses = self.cache.take_counts(mode)
        if hits + misses == 0:
            return
        line = {"epoch": round(state.epoch or 0.0, 2), "mode": mode, "hits": hits, "misses": misses,
                "entries": len(self.cache.store), "mib": round(self.cache.size_mib, 3)}
        self.history.append(line)
        where = f" (process {args.process_index})" if args.world_size > 1 else ""
        logger.info("Feature cache%s, stage one epoch %g, %s: %d hits, %d misses; %d entries, %.1f MiB %s.", where,
                    line["epoch"], "training" if mode == "train" else "evaluation", hits, misses, line["entries"],
                    line["mib"], self.cache.describe())

    def on_epoch_end(self, args, state, control, **kwargs):
        self._log(args, state, "train")

    def on_evaluate(self, args, state, control, **kwargs):
        self._log(args, state, "eval")

    def on_train_end(self, args, state, control, **kwargs):
        self._log(args, state, "train")  # a stage that ends part-way through an epoch (max_steps)


@dataclass
class FeatureCaching:
    """`--cache_frozen_features`: stage one's training `transform` (a `DetectionTransform`) switches to
    `stage_one_augmentation(augmentation)` and the backbone's features are cached, in RAM or, with `cache_dir`, on
    disk. `serving` is the stage-one context; `history` collects every epoch's log lines."""

    transform: object
    augmentation: str
    cache_dir: str | None = None
    history: list[dict] = field(default_factory=list)

    def describe(self) -> str:
        where = f"on disk under {self.cache_dir}" if self.cache_dir else "in memory"
        flip = ("horizontal flip only, alternating between epochs (all inputs seen by epoch two)"
                if self.augmentation != "none" else "none")
        return (f"stage one caches the frozen backbone's features ({where}), so its augmentation is {flip} "
                "(colour jitter, zoom-out and random crops dropped in stage one); stage two uses the full "
                f"{self.augmentation!r} augmentation and never the cache")

    @contextlib.contextmanager
    def serving(self, model: nn.Module, trainer):
        """Stage one with cached features: flip-only augmentation, a `FrozenFeatureCache` in place of the backbone
        (which must be frozen already), a `FeatureCacheLog` on `trainer`. Yields the cache; on exit, also after an
        error, the backbone and the augmentation are put back."""
        from .data import make_train_augmentation

        original_augmentation = self.transform.augmentation
        cache = install_feature_cache(model, cache_dir=self.cache_dir)
        log = FeatureCacheLog(cache)
        trainer.add_callback(log)
        self.transform.set_augmentation(make_train_augmentation(self.transform.size,
                                                                stage_one_augmentation(self.augmentation)))
        logger.info("Stage one: backbone features cached %s; augmentation %r (the run's: %r).", cache.describe(),
                    stage_one_augmentation(self.augmentation), self.augmentation)
        try:
            yield cache
        finally:
            self.transform.set_augmentation(original_augmentation)
            trainer.remove_callback(log)
            remove_feature_cache(model)
            self.history.extend(log.history)

    @staticmethod
    def metrics(cache: FrozenFeatureCache, device=None) -> dict:
        """The stage's totals: training hits and misses over all its epochs, summed over processes; this process's
        cache entries and MiB. Every process must call it (a collective under DDP), before leaving `serving`."""
        hits, misses = cache.totals["train"]
        totals = torch.tensor([hits, misses], dtype=torch.float64, device=device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(totals)
        return {"feature_cache_hits": int(totals[0]), "feature_cache_misses": int(totals[1]),
                "feature_cache_entries": len(cache.store), "feature_cache_mib": round(cache.size_mib, 3)}


__all__ = ["DiskFeatureStore", "FeatureCacheLog", "FeatureCaching", "FrozenFeatureCache", "MemoryFeatureStore",
           "backbone_fingerprint", "input_keys", "install_feature_cache", "real_backbone", "remove_feature_cache",
           "stage_one_augmentation"]

"""Load a model from a checkpoint directory: config.json (transformers AutoConfig) and safetensors weights.

Weights are matched by the checkpoint's names. Every module contributes its own parameters and
persistent buffers under their names; a module with a ``checkpoint_weights()`` method (such as the
stacked MoE experts) instead names its checkpoint tensors itself, as
``{relative name: (expected shape, load(loaded) -> None)}`` (vLLM's ``weight_loader`` idea); it is
called with ``stored(relative name) -> bool`` so that it can follow the checkpoint's format. A
module with ``weight_loaders()`` (the tensor-parallel layers) replaces the slots of some of its (or
its children's) parameters the same way. The expected shape is the checkpoint's; a loader gets the
tensor as a safetensors slice and reads only the part this rank holds (``read_loaded``).
Any missing, unexpected or mis-shaped tensor is an error that names it, except tensors under a
model's ``ignored_checkpoint_prefixes`` (weights it does not use, such as an MTP head), which are
skipped with one log line.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from pathlib import Path
from typing import Callable, Container, Iterator

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm import tqdm

from deltaserve.distributed.sharding import read_loaded
from deltaserve.models.checkpoint_checks import check_config_sizes, check_finite, check_shard_path, check_weight_dtype
from deltaserve.models.registry import architecture_of, resolve, resolve_name
from deltaserve.state.layout import resolve_dtype

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MAX_LISTED = 8  # problems listed per kind in an error message
LOAD_PROGRESS_BYTES = 1 << 30  # checkpoints at least this large show a progress bar while loading

logger = logging.getLogger(__name__)

WeightSlot = tuple[tuple[int, ...], Callable[[object], None]]


def _copy_into(param: torch.Tensor) -> Callable[[object], None]:
    return lambda loaded: param.data.copy_(read_loaded(loaded))


def checkpoint_slots(model: nn.Module, stored: Container[str] = ()) -> dict[str, WeightSlot]:
    """Checkpoint tensor name -> (expected shape, loader) for every weight of ``model``; ``stored``: the
    checkpoint's tensor names, for modules whose names depend on the checkpoint's format."""
    slots: dict[str, WeightSlot] = {}
    seen: set[int] = set()  # NOTE: a tied weight is loaded once, under its first name

    def visit(module: nn.Module, prefix: str) -> None:
        if hasattr(module, "checkpoint_weights"):
            for name, slot in module.checkpoint_weights(lambda n: prefix + n in stored).items():
                slots[prefix + name] = (tuple(slot[0]), slot[1])
            return
        tensors = list(module.named_parameters(recurse=False))
        tensors += [
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for name, tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                slots[prefix + name] = (tuple(tensor.shape), _copy_into(tensor))
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")
        if hasattr(module, "weight_loaders"):
            for name, slot in module.weight_loaders().items():
                # NOTE: only names the visit gave a slot: a tied weight keeps its first name's.
                if prefix + name in slots:
                    slots[prefix + name] = (tuple(slot[0]), slot[1])

    visit(model, "")
    return slots


@contextlib.contextmanager
def open_safetensors(file: Path) -> Iterator:
    """``safe_open`` with a broken file (truncated, not safetensors) reported as a ValueError naming it."""
    try:
        with safe_open(file, framework="pt") as f:
            yield f
    except SafetensorError as exc:
        raise ValueError(f"{file} is not a readable safetensors file: {exc}") from exc


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from ``model.safetensors`` or ``model.safetensors.index.json``."""
    path = Path(path)
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map' object")
        files = {name: check_shard_path(path, shard) for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise ValueError(f"{index} names shard {shard.name}, which is not in {path}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        with open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise ValueError(f"no {SINGLE_FILE} or {INDEX_FILE} in {path}")


def _by_file(files: dict[str, Path]) -> dict[Path, list[str]]:
    groups: dict[Path, list[str]] = {}
    for name, file in files.items():
        groups.setdefault(file, []).append(name)
    return groups


def checkpoint_shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers (each file opened once)."""
    shapes = {}
    for file, names in _by_file(files).items():
        with open_safetensors(file) as f:
            keys = set(f.keys())
            for name in names:
                if name not in keys:
                    raise ValueError(f"tensor {name} is listed in the index for {file.name} but is not in that file")
                tensor_slice = f.get_slice(name)
                check_weight_dtype(name, tensor_slice.get_dtype())
                shapes[name] = tuple(tensor_slice.get_shape())
    return shapes


def _listed(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    out = [f"{title} ({len(lines)}):"] + [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        out.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return out


def _ignored(model: nn.Module, files: dict[str, Path]) -> set[str]:
    """Checkpoint names under the model's ``ignored_checkpoint_prefixes`` (``{prefix: why}``), logged once each."""
    ignored: set[str] = set()
    for prefix, why in getattr(model, "ignored_checkpoint_prefixes", {}).items():
        names = {name for name in files if name.startswith(prefix)}
        if names:
            logger.info("skipping %d checkpoint tensors under %s: %s", len(names), prefix, why)
            ignored |= names
    return ignored


class _FiniteSlice:
    """A safetensors slice whose reads are checked for NaN / inf (only the part this rank reads)."""

    def __init__(self, name: str, tensor_slice):
        self.name, self.tensor_slice = name, tensor_slice

    def get_shape(self):
        return self.tensor_slice.get_shape()

    def __getitem__(self, index) -> torch.Tensor:
        tensor = self.tensor_slice[index]
        check_finite(self.name, tensor)
        return tensor


def load_weights(model: nn.Module, path: str | Path, only_prefix: str | None = None) -> None:
    """Copy every checkpoint tensor into ``model`` (cast to each parameter's dtype), after checking that
    names and shapes match exactly; otherwise a ValueError lists the problems. ``only_prefix`` loads just
    the tensors under it (e.g. ``"mtp."`` into a module holding the MTP head as ``mtp``)."""
    path = Path(path)
    files = checkpoint_files(path)
    if only_prefix is not None:
        files = {name: file for name, file in files.items() if name.startswith(only_prefix)}
    ignored = _ignored(model, files)
    files = {name: file for name, file in files.items() if name not in ignored}
    slots = checkpoint_slots(model, files)
    shapes = checkpoint_shapes(files)
    missing = [f"{n} (expected shape {list(slot[0])})" for n, slot in slots.items() if n not in files]
    unexpected = [f"{n} (shape {list(shape)})" for n, shape in shapes.items() if n not in slots]
    wrong = [
        f"{n}: expected shape {list(slots[n][0])}, found {list(shape)}"
        for n, shape in shapes.items()
        if n in slots and shape != slots[n][0]
    ]
    if missing or unexpected or wrong:
        lines = [f"checkpoint {path} does not match {type(model).__name__}:"]
        lines += (
            _listed("wrong shape", wrong)
            + _listed("missing tensors", missing)
            + _listed("unexpected tensors", unexpected)
        )
        raise ValueError("\n".join(lines))
    # NOTE: a real checkpoint (tens of GB) takes minutes: show progress per tensor when it is large.
    total_bytes = sum(file.stat().st_size for file in set(files.values()))
    show = total_bytes >= LOAD_PROGRESS_BYTES
    with tqdm(total=len(files), desc="loading weights", unit="tensor", disable=not show) as bar:
        for file, names in _by_file(files).items():
            with open_safetensors(file) as f:
                for name in names:
                    try:
                        # NOTE: a slice, read lazily: a TP rank's loader reads only its part.
                        slots[name][1](_FiniteSlice(name, f.get_slice(name)))
                    except SafetensorError as exc:
                        raise ValueError(f"tensor {name} in {file} cannot be read: {exc}") from exc
                    bar.update()
    # NOTE: the slots write through .data, which leaves a parameter's version as it was; tensors derived
    # from parameters (layers/derived.py) key on the version, so tell them the weights changed.
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        torch.autograd.graph.increment_version(tensor)


def _read_config_json(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"model path {path} is not a directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} has no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{config_file} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return raw


def load_model_config(path: str | Path):
    """The transformers config of a checkpoint directory, checked; ValueError on an unknown architecture,
    a missing or unreadable config.json, or impossible sizes."""
    from transformers import AutoConfig

    path = Path(path)
    raw = _read_config_json(path)
    check_config_sizes(raw)
    model_class = resolve_name(architecture_of(raw))
    if hasattr(model_class, "check_raw_config"):
        model_class.check_raw_config(raw)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds (ValueError, KeyError, strict-field errors)
        raise ValueError(f"{path / 'config.json'}: transformers cannot read it: {exc}") from exc
    if hasattr(model_class, "check_config"):
        model_class.check_config(config)
    return config


def model_dtype(hf_config, dtype: str | torch.dtype = "auto") -> torch.dtype:
    """``"auto"`` -> the config's ``dtype`` (``torch_dtype``), bfloat16 when it has none; else ``dtype``."""
    default = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.bfloat16
    if isinstance(default, str):
        default = resolve_dtype(default, torch.bfloat16, "config dtype")
    return resolve_dtype(dtype, default, "dtype")


def load_model(path: str | Path, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> nn.Module:
    """Build the model of a checkpoint directory and load its weights (eval mode, no grad)."""
    config = load_model_config(path)
    torch_dtype = model_dtype(config, dtype)
    model_class = resolve(config)
    # NOTE: built on the meta device, then given uninitialised storage: random init of a 48B model
    # would cost minutes, and every weight is overwritten (a missing one is an error).
    with torch.device("meta"):
        model = model_class(config, torch_dtype)
    model = model.to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    load_weights(model, path)
    return model.eval().requires_grad_(False)

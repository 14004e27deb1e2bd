"""Load a Hugging Face model directory: config, safetensors weights (single or sharded), tokenizer.

Only safetensors are read: a directory holding just pickle checkpoints (``*.bin``, ``*.pt``) is refused,
because unpickling runs arbitrary code from the file. Every missing or unreadable file is reported
by path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from lorafleet.worker.kv_cache import resolve_dtype
from lorafleet.worker.model import LlamaModel, expected_hf_keys
from lorafleet.worker.model_config import ModelConfig, read_json
from lorafleet.worker.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Tensors some checkpoints carry that the model recomputes or shares.
_IGNORABLE_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    model: LlamaModel
    config: ModelConfig
    tokenizer: Tokenizer | None
    generation_config: dict[str, Any] = field(default_factory=dict)  # generation_config.json, or {}
    model_dir: Path = field(default_factory=Path)
    load_seconds: float | None = None  # wall time of load_model (the engine logs it as a start-up phase)


def load_model(
    model_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = "float32",
    require_tokenizer: bool = True,
    skip_tokenizer: bool = False,
) -> LoadedModel:
    """Load config, weights and tokenizer of the Hugging Face directory ``model_dir``.

    ``skip_tokenizer`` leaves the tokenizer unread (the model then takes token ids only, like vLLM's
    ``skip_tokenizer_init``); otherwise a missing tokenizer.json is an error when ``require_tokenizer``.

    Raises FileNotFoundError for a missing directory/file and ValueError for anything malformed
    (unsupported architecture, pickle-only weights, corrupt safetensors, missing or misshapen
    tensors); each message names the file.
    """
    t0 = time.perf_counter()
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory does not exist")
    torch_dtype = resolve_dtype(dtype)
    config = ModelConfig.from_dir(model_dir)
    gen_path = model_dir / "generation_config.json"
    generation_config = read_json(gen_path) if gen_path.is_file() else {}
    if not isinstance(generation_config, dict):
        raise ValueError(f"{gen_path}: expected a JSON object")
    files = checkpoint_files(model_dir)
    model = LlamaModel(config, torch_dtype, device)
    with SafetensorsReader(files) as tensors:
        expected = expected_hf_keys(config)
        unexpected = sorted(
            k
            for k in tensors
            if k not in expected
            and not k.endswith(_IGNORABLE_SUFFIXES)
            and not (config.tie_word_embeddings and k == "lm_head.weight")
        )
        if unexpected:
            raise ValueError(
                f"{model_dir}: checkpoint has {len(unexpected)} tensors this {config.architecture} "
                f"config does not use, e.g. {unexpected[0]!r} (wrong config.json?)"
            )
        model.load_hf_state(tensors, source=str(model_dir))
    model.eval()
    tokenizer = None
    tok_path = model_dir / "tokenizer.json"
    if skip_tokenizer:
        pass  # token ids only: a tokenizer.json, even a broken one, is not read
    elif tok_path.is_file():
        tokenizer = Tokenizer.from_dir(model_dir)
    elif require_tokenizer:
        raise FileNotFoundError(f"{tok_path}: no such file (the worker needs a fast tokenizer.json)")
    return LoadedModel(model, config, tokenizer, generation_config, model_dir, time.perf_counter() - t0)


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files holding the weights (via the index when sharded)."""
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index_path}: missing or empty 'weight_map'")
        names = sorted(set(weight_map.values()))
        files = []
        for name in names:
            if not isinstance(name, str) or Path(name).name != name:
                raise ValueError(f"{index_path}: bad shard file name {name!r}")
            path = model_dir / name
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard listed in {index_path.name} does not exist")
            files.append(path)
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    others = sorted(model_dir.glob("*.safetensors"))
    if others:
        return others
    pickles = sorted(p.name for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{model_dir / pickles[0]}: refusing to load a pickle checkpoint (loading it can run "
            "arbitrary code); convert the weights to safetensors first"
        )
    raise FileNotFoundError(f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file")


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """Read-only mapping over the tensors of several safetensors files, loaded on access.

    Keeps peak host memory at one tensor while the model copies weights in; a duplicate name across
    files or an unreadable file is a ValueError naming the file.
    """

    def __init__(self, files: list[Path]) -> None:
        self._files = files
        self._stack = ExitStack()
        self._where: dict[str, tuple[Path, Any]] = {}

    def __enter__(self) -> SafetensorsReader:
        try:
            for path in self._files:
                try:
                    handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
                    keys = list(handle.keys())
                except (SafetensorError, OSError, ValueError) as exc:
                    raise ValueError(f"{path}: not a readable safetensors file ({exc})") from exc
                for key in keys:
                    if key in self._where:
                        raise ValueError(f"{path}: tensor {key!r} also appears in {self._where[key][0]}")
                    self._where[key] = (path, handle)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __getitem__(self, key: str) -> torch.Tensor:
        path, handle = self._where[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read tensor {key!r} ({exc})") from exc

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

"""Load and validate PEFT LoRA adapters (``adapter_config.json`` + ``adapter_model.safetensors``).

Only what the engine can apply exactly is accepted: plain LoRA on the seven Llama projections.
Everything that would change the math (DoRA, biases, modules_to_save, ...) is refused with a
ValueError naming the field, rather than silently ignored, so an adapter never produces different
outputs here than in PEFT.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lorafleet.worker.lora_pool import PROJECTIONS
from lorafleet.worker.mapped_tensors import MappedTensors
from lorafleet.worker.model_config import ModelConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# The largest scaling (lora_alpha / r, or / sqrt(r) with rsLoRA) an adapter may ask for. Trained
# adapters use 0.5 to a few dozen; a scaling past this only saturates the activations (lora_alpha
# 1e38 once made every token 0), so it is refused at registration as a broken file.
MAX_LORA_SCALE = 1024.0
_PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_UNSUPPORTED_TARGETS = ("lm_head", "embed_tokens")
# Fields that change what the adapter computes; each must hold its neutral value.
_MUST_BE_NEUTRAL: dict[str, Any] = {
    "use_dora": (False, None),
    "fan_in_fan_out": (False, None),
    "bias": ("none", None),
    "lora_bias": (False, None),
    "modules_to_save": (None, []),
    "layers_to_transform": (None, []),
    "layer_replication": (None, []),
    "trainable_token_indices": (None, [], {}),
    "target_parameters": (None, []),
    "alora_invocation_tokens": (None, []),
    "use_qalora": (False, None),
    "arrow_config": (None, {}),
    "use_bdlora": (None, False, {}),
}
# Fields read here, or metadata / training-only options that do not affect inference.
_KNOWN = {
    "peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "exclude_modules",
    "rank_pattern", "alpha_pattern", "layers_pattern", "task_type", "base_model_name_or_path",
    "revision", "inference_mode", "lora_dropout", "init_lora_weights", "loftq_config",
    "megatron_config", "megatron_core", "eva_config", "corda_config", "lora_ga_config",
    "auto_mapping", "runtime_config", "qalora_group_size", "peft_version", "ensure_weight_tying",
    "kasa_config", "monteclora_config", "velora_config",
}  # fmt: skip
_KEY_RE = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")
_MODULE_RE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<proj>[a-z_]+)$")


class AdapterFormatError(ValueError):
    """The adapter directory is missing, malformed, or uses a feature the engine cannot apply."""


@dataclass
class ProjWeights:
    """One adapted projection: PEFT's lora_A.weight [r, h_in], lora_B.weight [h_out, r] and scale."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass
class AdapterWeights:
    """Host copies of one adapter's tensors, keyed by (layer, projection)."""

    name: str
    source: str
    projs: dict[tuple[int, str], ProjWeights]
    use_rslora: bool = False
    load_seconds: float = 0.0
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = sum(p.a.nbytes + p.b.nbytes for p in self.projs.values())

    @property
    def target_modules(self) -> tuple[str, ...]:
        present = {proj for _, proj in self.projs}
        return tuple(p for p in PROJECTIONS if p in present)


def module_key(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{'self_attn' if proj in _ATTN else 'mlp'}.{proj}"


def format_error(path: Path, msg: str) -> AdapterFormatError:
    return AdapterFormatError(f"adapter {path}: {msg}")


_fail = format_error  # the short name keeps this module's many messages on one line


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """Read and check ``adapter_config.json`` of the adapter directory ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise _fail(path, "is not a directory")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.is_file():
        raise _fail(path, f"{CONFIG_FILE} is missing")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"{CONFIG_FILE} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise _fail(path, f"{CONFIG_FILE} must hold a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise _fail(path, "field peft_type is not supported (only LORA)")
    for name, neutral in _MUST_BE_NEUTRAL.items():
        if name in cfg and cfg[name] not in neutral:
            raise _fail(path, f"field {name} is not supported (needs {neutral[0]!r})")
    for name, value in cfg.items():
        if name not in _KNOWN and name not in _MUST_BE_NEUTRAL and value not in (None, False, [], {}, ""):
            # Name the field but never echo what the (untrusted) file put in it.
            raise _fail(path, f"unsupported {CONFIG_FILE} field {name[:64]!r}")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise _fail(path, "field r must be a positive integer")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or alpha <= 0:
        raise _fail(path, "field lora_alpha must be a positive number")
    for name in ("rank_pattern", "alpha_pattern"):
        pattern = cfg.get(name) or {}
        if not isinstance(pattern, dict):
            raise _fail(path, f"field {name} must be an object")
        for key, value in pattern.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise _fail(path, f"field {name}[{key[:64]!r}] must be a positive number")
    targets = cfg.get("target_modules")
    if not targets or not isinstance(targets, (str, list)):
        raise _fail(path, "field target_modules must be a non-empty list or string")
    return cfg


def _matches_target(cfg: dict[str, Any], key: str) -> bool:
    """PEFT's rule for whether module ``key`` is adapted (after exclude_modules)."""
    excl = cfg.get("exclude_modules")
    if excl:
        if isinstance(excl, str):
            if re.fullmatch(excl, key):
                return False
        elif key in excl or any(key.endswith(f".{e}") for e in excl):
            return False
    targets = cfg["target_modules"]
    if isinstance(targets, str):
        return targets.lower() == "all-linear" or re.fullmatch(targets, key) is not None
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def targeted_modules(cfg: dict[str, Any], num_layers: int, path: Path) -> set[tuple[int, str]]:
    """The (layer, projection) pairs the config adapts; unknown or unsupported targets raise."""
    targets = cfg["target_modules"]
    keys = {module_key(i, p): (i, p) for i in range(num_layers) for p in PROJECTIONS}
    try:
        for bad in _UNSUPPORTED_TARGETS:
            if isinstance(targets, str) and targets.lower() != "all-linear" and re.fullmatch(targets, bad):
                raise _fail(path, f"target_modules {targets!r} matches {bad}, which is not supported")
        if isinstance(targets, list):
            for t in targets:
                if not isinstance(t, str):
                    raise _fail(path, f"target_modules entry {t!r} is not a string")
                if t in _UNSUPPORTED_TARGETS or any(t.endswith(f".{u}") for u in _UNSUPPORTED_TARGETS):
                    raise _fail(path, f"target_modules entry {t!r} is not supported (only {PROJECTIONS})")
                if not any(k == t or k.endswith(f".{t}") for k in keys):
                    raise _fail(path, f"unknown target module {t!r} (not a projection of this base model)")
        found = {pair for key, pair in keys.items() if _matches_target(cfg, key)}
    except re.error as e:
        raise _fail(path, f"target_modules / exclude_modules is not a valid regex ({e})") from e
    if not found:
        raise _fail(path, f"target_modules {targets!r} match no projection of this base model")
    return found


def _pattern_value(pattern: dict[str, Any], key: str, default: float) -> float:
    # PEFT's get_pattern_key: the first pattern matching a dotted suffix of the module name wins.
    for pat, value in pattern.items():
        if re.match(rf"(.*\.)?({pat})$", key):
            return value
    return default


def weights_file(path: Path) -> Path:
    weights = path / WEIGHTS_FILE
    if weights.is_file():
        return weights
    pickles = [p for p in _PICKLE_FILES if (path / p).exists()]
    if pickles:
        raise _fail(
            path,
            f"has {pickles[0]} but no {WEIGHTS_FILE}; pickle weight files are refused because loading "
            "them can execute arbitrary code. Convert the adapter to safetensors "
            "(PeftModel.save_pretrained(..., safe_serialization=True)).",
        )
    raise _fail(path, f"{WEIGHTS_FILE} is missing")


def _scan_keys(path: Path, keys: list[str]) -> dict[tuple[int, str], dict[str, str]]:
    """Map tensor names to (layer, proj) -> {"A": key, "B": key}; anything else is refused."""
    found: dict[tuple[int, str], dict[str, str]] = {}
    for key in keys:
        m = _KEY_RE.match(key)
        if m is None:
            if "lora_magnitude_vector" in key:
                raise _fail(path, f"tensor {key} is a DoRA magnitude; use_dora is not supported")
            raise _fail(path, f"unsupported tensor {key} in {WEIGHTS_FILE} (only lora_A/lora_B weights)")
        mm = _MODULE_RE.match(m["module"])
        if mm is None or mm["proj"] not in PROJECTIONS:
            raise _fail(path, f"tensor {key} targets unsupported module {m['module']}")
        found.setdefault((int(mm["layer"]), mm["proj"]), {})[m["ab"]] = key
    return found


@dataclass(frozen=True)
class ProjPlan:
    """One adapted projection as the header describes it, checked against the base model."""

    layer: int
    proj: str
    a_key: str
    b_key: str
    rank: int
    scale: float


def plan_projections(
    path: Path,
    cfg: dict[str, Any],
    model_config: ModelConfig,
    wanted: set[tuple[int, str]],
    keys: list[str],
    shape_of: Callable[[str], tuple[int, ...]],
) -> list[ProjPlan]:
    """Check the weight file's tensor names and shapes (``shape_of(key)``) against the config and
    the base model, in (layer, projection) order; every reader of adapter files goes through here,
    so they refuse the same files with the same messages."""
    num_layers = model_config.num_hidden_layers
    shapes = model_config.lora_shapes()
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    use_rslora = bool(cfg.get("use_rslora", False))
    found = _scan_keys(path, keys)
    beyond = sorted(pair for pair in found if pair[0] >= num_layers)
    if beyond:
        raise _fail(
            path,
            f"{WEIGHTS_FILE} has weights for layer {beyond[0][0]}, but the base model has only "
            f"{num_layers} layers (a different model's adapter?)",
        )
    extra = sorted(set(found) - wanted)
    if extra:
        layer, proj = extra[0]
        raise _fail(path, f"{WEIGHTS_FILE} has weights for layer {layer} {proj}, not in target_modules")
    missing = sorted(wanted - set(found))
    if missing:
        layer, proj = missing[0]
        raise _fail(path, f"{WEIGHTS_FILE} lacks weights for targeted layer {layer} {proj}")
    plans = []
    for (layer, proj), ab in sorted(found.items()):
        if set(ab) != {"A", "B"}:
            raise _fail(path, f"layer {layer} {proj} lacks lora_{'B' if 'A' in ab else 'A'}.weight")
        key = module_key(layer, proj)
        rank = int(_pattern_value(rank_pattern, key, cfg["r"]))
        alpha = float(_pattern_value(alpha_pattern, key, cfg["lora_alpha"]))
        h_in, h_out = shapes[proj]
        a_shape, b_shape = tuple(shape_of(ab["A"])), tuple(shape_of(ab["B"]))
        if a_shape != (rank, h_in) or b_shape != (h_out, rank):
            raise _fail(
                path,
                f"layer {layer} {proj}: lora_A {a_shape} / lora_B {b_shape} do not match the base "
                f"model and rank {rank}: expected ({rank}, {h_in}) / ({h_out}, {rank})",
            )
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        if not math.isfinite(scale) or scale > MAX_LORA_SCALE:
            # The value itself is not echoed: adapter files are untrusted input.
            in_pattern = _pattern_value(alpha_pattern, key, None) is not None
            culprit = "alpha_pattern" if in_pattern else "lora_alpha"
            raise _fail(
                path,
                f"field {culprit} gives layer {layer} {proj} a scaling "
                f"({'lora_alpha / sqrt(r)' if use_rslora else 'lora_alpha / r'}) that is not finite "
                f"or above {MAX_LORA_SCALE:g}",
            )
        plans.append(ProjPlan(layer, proj, ab["A"], ab["B"], rank, scale))
    return plans


def load_adapter(
    path: str | Path,
    model_config: ModelConfig,
    *,
    name: str | None = None,
    dtype: torch.dtype = torch.float32,
    load_tensors: bool = True,
    check_finite: bool = True,
) -> AdapterWeights:
    """Read, validate against ``model_config`` and convert one PEFT adapter to host tensors.

    With ``load_tensors=False`` only the header is read (shapes checked, tensors left empty), which
    is what registering an adapter needs. ``check_finite=False`` leaves the NaN/Inf check to the
    caller (``check_weights_finite``). The engine's loads do not come through here: they read the
    file straight into the slot layout (``adapter_reader.read_packed``), with the same checks.
    """
    path = Path(path)
    cfg = read_adapter_config(path)
    wanted = targeted_modules(cfg, model_config.num_hidden_layers, path)
    weights_path = weights_file(path)
    projs: dict[tuple[int, str], ProjWeights] = {}
    handle, tensors = _open_weights(path, weights_path, load_tensors)
    with handle as f:
        plans = plan_projections(
            path, cfg, model_config, wanted, list(f.keys()), lambda key: tuple(f.get_slice(key).get_shape())
        )
        shapes = model_config.lora_shapes()
        for p in plans:
            if tensors is not None:
                a, b = _read(path, tensors, p.a_key), _read(path, tensors, p.b_key)
                for t, which in ((a, "lora_A"), (b, "lora_B")):
                    if not t.is_floating_point():
                        raise non_float_error(path, p, which, t.dtype)
                    if check_finite and not bool(torch.isfinite(t).all()):
                        raise non_finite_error(path, p.layer, p.proj, which)
                a, b = a.to(dtype).contiguous(), b.to(dtype).contiguous()
            else:
                # Meta tensors carry shapes and sizes without holding memory.
                h_in, h_out = shapes[p.proj]
                a = torch.empty(p.rank, h_in, dtype=dtype, device="meta")
                b = torch.empty(h_out, p.rank, dtype=dtype, device="meta")
            projs[(p.layer, p.proj)] = ProjWeights(a, b, p.scale)
    return AdapterWeights(name or path.name, str(path), projs, bool(cfg.get("use_rslora", False)))


def non_float_error(path: Path, plan: ProjPlan, which: str, dtype: torch.dtype) -> AdapterFormatError:
    return _fail(path, f"layer {plan.layer} {plan.proj} {which} has non-float dtype {dtype}")


def non_finite_error(path: Path, layer: int, proj: str, which: str) -> AdapterFormatError:
    return _fail(path, f"layer {layer} {proj} {which} holds NaN or Inf values")


def check_file_finite(path: str | Path) -> None:
    """Raise AdapterFormatError naming the first tensor of the adapter's weights file that holds
    NaN or Inf (registration: refuse the adapter before any request can pick it up)."""
    path = Path(path)
    handle, tensors = _open_weights(path, weights_file(path), True)
    assert tensors is not None
    with handle as f:
        for key in sorted(f.keys()):
            t = _read(path, tensors, key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise _fail(path, f"tensor {key} holds NaN or Inf values")


def _open_weights(path: Path, weights_path: Path, load_tensors: bool) -> tuple[Any, MappedTensors | None]:
    """safetensors' handle (it checks the header, and gives names and shapes) and, to read tensors,
    a `MappedTensors` of the same file: safetensors' own get_tensor keeps memory on every call."""
    try:
        handle = safe_open(str(weights_path), framework="pt", device="cpu")
        tensors = MappedTensors(weights_path) if load_tensors else None
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise _fail(path, f"{WEIGHTS_FILE} cannot be read ({e})") from e
    return handle, tensors


def _read(path: Path, tensors: MappedTensors, key: str) -> torch.Tensor:
    try:
        return tensors.get_tensor(key)
    except (KeyError, ValueError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise _fail(path, f"{WEIGHTS_FILE} cannot be read ({message})") from e


def check_weights_finite(weights: AdapterWeights) -> None:
    """Raise AdapterFormatError naming the first tensor of ``weights`` that holds NaN or Inf."""
    for (layer, proj), pw in sorted(weights.projs.items()):
        for t, which in ((pw.a, "lora_A"), (pw.b, "lora_B")):
            if not bool(torch.isfinite(t).all()):
                raise non_finite_error(Path(weights.source), layer, proj, which)


def validate_adapter_dir(path: str | Path, model_config: ModelConfig) -> AdapterWeights:
    """Check an adapter directory without reading its tensors (for registration)."""
    return load_adapter(path, model_config, load_tensors=False)

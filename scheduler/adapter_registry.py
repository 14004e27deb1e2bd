"""The fleet-wide adapter registry: name -> adapter directory, validated once at registration.

Workers learn an adapter's path with the first request that needs it and load it on demand, so
registering is cheap and needs no worker. Unregistering only stops new requests from using the name;
sequences already running with it finish normally.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lorafleet.scheduler.errors import UnknownAdapterError
from lorafleet.worker.adapters import check_file_finite, read_adapter_config, validate_adapter_dir
from lorafleet.worker.engine_config import EngineConfig


class AdapterRegistry:
    def __init__(
        self, engine_config: EngineConfig, model_config: Any | None, roots: tuple[str, ...] = ()
    ) -> None:
        # model_config is None when the head cannot read the model (it lives only on the workers of
        # a remote cluster); registration then checks the adapter's own files only.
        self._engine_config = engine_config
        self._model_config = model_config
        self._roots = tuple(Path(r).expanduser().resolve() for r in roots)
        self._paths: dict[str, str] = {}

    def confine(self, path: str) -> None:
        """ValueError unless ``path`` (symlinks resolved) lies inside one of the adapter roots.

        Called before anything else looks at an API caller's path, and its message names neither the
        path nor what it resolves to: a caller must not learn which files exist outside the roots.
        """
        if not self._roots:
            raise ValueError(
                "registering adapters through the API is off: the server has no adapter roots "
                "(--adapter-root, --adapters-dir or --adapter)"
            )
        resolved = Path(path).expanduser().resolve()
        if not any(resolved == root or root in resolved.parents for root in self._roots):
            raise ValueError("adapter path is outside the server's adapter roots (--adapter-root)")

    def register(self, name: str, path: str) -> None:
        self.add(name, self.check(name, path))

    def add(self, name: str, resolved: str) -> None:
        """Record a directory ``check`` accepted."""
        self._paths[name] = resolved

    def check(self, name: str, path: str) -> str:
        """Validate ``path`` as adapter ``name`` for this model and these workers; its resolved path.

        Reads every tensor once (NaN or Inf is refused now, not by each request that would use it).
        """
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise ValueError(
                f"adapter name must be a non-empty string without surrounding spaces, got {name!r}"
            )
        resolved = Path(path).expanduser().resolve()
        if self._model_config is None:
            read_adapter_config(resolved)
            if not (resolved / "adapter_model.safetensors").is_file():
                raise ValueError(f"adapter {resolved}: adapter_model.safetensors is missing")
        else:
            weights = validate_adapter_dir(resolved, self._model_config)
            cfg = self._engine_config
            for (layer, proj), pw in weights.projs.items():
                if proj not in cfg.lora_target_modules:
                    raise ValueError(
                        f"adapter {name!r} targets {proj}, which the workers' LoRA pool does not hold "
                        f"(lora_target_modules={cfg.lora_target_modules})"
                    )
                if pw.a.shape[0] > cfg.max_lora_rank:
                    raise ValueError(
                        f"adapter {name!r}: rank {pw.a.shape[0]} of layer {layer} {proj} exceeds the "
                        f"workers' max_lora_rank {cfg.max_lora_rank}"
                    )
        check_file_finite(resolved)
        return str(resolved)

    def unregister(self, name: str) -> None:
        if name not in self._paths:
            raise UnknownAdapterError(f"unknown adapter {name!r}")
        del self._paths[name]

    def get(self, name: str) -> str | None:
        return self._paths.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._paths

    def as_dict(self) -> dict[str, str]:
        return dict(self._paths)

"""deploy/: the example config loads, and the dashboard and scrape config name real metrics."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

from lorafleet.config import ServeConfig
from lorafleet.serving.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_names() -> set[str]:
    names = set()
    for family in ServerMetrics().registry.collect():
        names.add(family.name)
        names.update(s.name for s in family.samples)
    # Histogram series exist once observed; their suffixes are part of the exposition format.
    for family in ServerMetrics().registry.collect():
        if family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def test_example_serve_config_is_valid() -> None:
    from lorafleet.worker.engine_config import EngineConfig

    config = ServeConfig.load(DEPLOY / "serve.example.yaml")
    assert config.device == "cuda" and config.ray_address == "auto" and config.max_workers == 4
    assert EngineConfig.from_dict(dict(config.engine)).max_batch_size == 32  # serve would refuse a typo


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lorafleet-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"lorafleet_[a-z_]+", expr)}
    assert used, "the dashboard queries no lorafleet metric"
    missing = used - _exported_names()
    assert not missing, f"dashboard uses metrics the server does not export: {sorted(missing)}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_the_default_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    targets = config["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"127.0.0.1:{ServeConfig(model='/m').metrics_port}"]


def test_cluster_script_parses_and_explains_itself() -> None:
    script = DEPLOY / "ray_cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert done.returncode == 2 and "worker HEAD_IP" in done.stderr

"""ServeConfig: YAML < flags, 1:1 flag mapping, validation with messages naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.cli import build_parser
from lorafleet.config import ServeConfig, parse_adapter_spec, parse_engine_option


def _serve_parser():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["serve"]


def test_every_config_field_has_a_flag_and_back() -> None:
    dests = {a.dest for a in _serve_parser()._actions} - {"help", "config", "log_level"}
    assert dests == set(ServeConfig.field_names())
    flags = {s for a in _serve_parser()._actions for s in a.option_strings}
    for name in ServeConfig.field_names():
        flag = "--" + name.replace("_", "-")
        # --adapter NAME=DIR fills `adapters`, --adapter-root DIR (repeatable) `adapter_roots`
        assert flag in flags or name in ("adapters", "adapter_roots"), flag
    assert "--adapter-root" in flags


def test_yaml_then_flags_win(tmp_path: Path) -> None:
    cfg = tmp_path / "serve.yaml"
    cfg.write_text(
        "model: /models/a\nworkers: 2\nmax_workers: 4\nport: 6000\n"
        "adapters: {alice: /ad/alice}\nengine: {max_batch_size: 8, block_size: 32}\n"
    )
    config = ServeConfig.load(cfg, {"port": 7000, "workers": None, "engine": {"max_batch_size": 4}})
    assert config.model == "/models/a"
    assert config.workers == 2 and config.max_workers == 4
    assert config.port == 7000
    assert config.adapters == (("alice", "/ad/alice"),)
    assert config.engine == {"max_batch_size": 4, "block_size": 32}
    again = ServeConfig.from_dict(config.to_dict())
    assert again == config


def test_defaults_and_max_workers_follow_workers() -> None:
    config = ServeConfig(model="/m", workers=3)
    assert config.max_workers == 3 and config.host == "127.0.0.1" and config.metrics_port == 9400
    assert config.http_port == 8000


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"workers": 0}, "workers"),
        ({"workers": 3, "max_workers": 2}, "max_workers"),
        ({"device": "tpu"}, "device"),
        ({"port": 70000}, "port"),
        ({"metrics_port": -1}, "metrics_port"),
        ({"http_port": 70000}, "http_port"),
        ({"pack_batch_target": 0}, "pack_batch_target"),
        ({"pack_batch_target": 9, "engine": {"max_batch_size": 8}}, "pack_batch_target"),
        ({"http_port": "8000"}, "http_port"),
        ({"policy": "best"}, "policy"),
        ({"max_queue": 0}, "max_queue"),
        ({"consolidation_interval_s": 0}, "consolidation_interval_s"),
        ({"adapters": ["a=/x", "a=/y"]}, "given twice"),
        ({"adapters": ["novalue"]}, "NAME=DIR"),
        ({"engine": ["x"]}, "engine"),
    ],
)
def test_validation_names_the_setting(values: dict, needle: str) -> None:
    with pytest.raises(ValueError) as info:
        ServeConfig(model="/m", **values)
    assert needle in str(info.value)


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: /m\nwrokers: 2\n")
    with pytest.raises(ValueError, match="wrokers"):
        ServeConfig.load(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="mapping"):
        ServeConfig.load(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        ServeConfig.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        ServeConfig.load(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="model"):
        ServeConfig.load(None, {"workers": 2})


def test_adapter_sources_from_dir(tmp_path: Path) -> None:
    for name in ("b", "a"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text("{}")
    (tmp_path / "not-an-adapter").mkdir()
    config = ServeConfig(model="/m", adapters=(("x", "/elsewhere/x"),), adapters_dir=str(tmp_path))
    assert config.adapter_sources() == [
        ("x", "/elsewhere/x"),
        ("a", str(tmp_path / "a")),
        ("b", str(tmp_path / "b")),
    ]
    clash = ServeConfig(model="/m", adapters=(("a", "/x"),), adapters_dir=str(tmp_path))
    with pytest.raises(ValueError, match="twice"):
        clash.adapter_sources()
    with pytest.raises(ValueError, match="not a folder"):
        ServeConfig(model="/m", adapters_dir=str(tmp_path / "missing")).adapter_sources()


def test_spec_parsers() -> None:
    assert parse_adapter_spec("alice=/a/b=c") == ("alice", "/a/b=c")
    assert parse_engine_option("max_batch_size=8") == ("max_batch_size", 8)
    assert parse_engine_option("gpu_memory_fraction=0.5") == ("gpu_memory_fraction", 0.5)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_engine_option("=3")


def test_adapter_roots_default_to_the_adapter_folders(tmp_path: Path) -> None:
    explicit = ServeConfig(model="/m", adapter_roots=("/r1", "/r2"), adapters_dir=str(tmp_path))
    assert explicit.effective_adapter_roots() == ("/r1", "/r2")
    (tmp_path / "x").mkdir()
    derived = ServeConfig(
        model="/m", adapters=(("x", str(tmp_path / "x")), ("y", str(tmp_path / "y"))), adapters_dir="/ad"
    )
    assert derived.effective_adapter_roots() == ("/ad", str(tmp_path.resolve()))
    assert ServeConfig(model="/m").effective_adapter_roots() == ()
    with pytest.raises(ValueError, match="adapter_roots must be folder paths"):
        ServeConfig(model="/m", adapter_roots=("",))


def test_pack_batch_target_flag_and_yaml_reach_the_fleet(tmp_path: Path) -> None:
    from lorafleet.cli import serve_config
    from lorafleet.serving.serve import fleet_config

    args = build_parser().parse_args(["serve", "--model", "/m", "--pack-batch-target", "24"])
    config = serve_config(args)
    assert config.pack_batch_target == 24 and fleet_config(config).pack_batch_target == 24
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("model: /m\npack_batch_target: 12\nengine: {max_batch_size: 16}\n")
    from_yaml = serve_config(build_parser().parse_args(["serve", "--config", str(cfg)]))
    assert fleet_config(from_yaml).pack_batch_target == 12
    assert fleet_config(ServeConfig(model="/m")).pack_batch_target is None  # default: off
    with pytest.raises(ValueError, match=r"pack_batch_target \(17\) must be <= the engine's max_batch_size"):
        serve_config(build_parser().parse_args(["serve", "--config", str(cfg), "--pack-batch-target", "17"]))

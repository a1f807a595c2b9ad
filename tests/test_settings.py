"""Every setting lives once: its flag, default and help come from its field, and it reaches a
server or worker process whole and unchanged (for the Ray backend: tests/test_ray_backend.py).
"""

import argparse
import json

import pytest

import ps.server
import worker.process
from ps.server import ServerConfig
from ps.settings import default_of, from_dict, from_flat, leaves, to_dict, to_flat
from tinyps import roles
from tinyps.cli import build_parser, main
from tinyps.cli.flags import _converter, _shown
from tinyps.config import LaunchConfig
from worker.process import WorkerSettings
from worker.settings import TrainConfig

TOKEN = "s3cret-token"


@pytest.fixture
def files(tmp_path):
    """Files and folders that settings must name: TLS files and a run to resume."""
    for name in ("cert.pem", "key.pem", "ca.pem"):
        (tmp_path / name).write_text("not read by these tests\n")
    (tmp_path / "old" / "checkpoints").mkdir(parents=True)
    return tmp_path


def _runs(files) -> dict[str, dict]:
    """Three launches that, between them, set every setting away from its default (the
    settings exclude each other: staleness is ssp's, backup workers sync's, DP fp32's)."""
    tls = {"tls_cert": str(files / "cert.pem"), "tls_key": str(files / "key.pem"),
           "tls_ca": str(files / "ca.pem")}
    return {
        "ssp": {"servers": 3, "workers": 4, "mode": "ssp", "staleness": 2, "staleness_lr": True,
                "max_staleness": 5, "lease_s": 7.5, "dataset": "synthetic", "hidden": (16, 8),
                "epochs": 3, "steps": 7, "batch_size": 16, "lr": 0.2, "optimizer": "momentum",
                "momentum": 0.5, "weight_decay": 0.01, "lr_schedule": "warmup:2,cosine",
                "augment": True, "eval_every": 3, "seed": 7,
                "partition": "label_skew", "alpha": 0.3, "placement": "round_robin",
                "split_bytes": 100, "precision": "bf16", "loss_scale": 8.0, "fused": False,
                "shared_memory": False, "slow_worker": (1, 2.0), "kill_server": (1, 5),
                "kill_worker": (2, 6), "max_restarts": 1, "poison_workers": 1,
                "poison": "label_flip", "checkpoint_dir": str(files / "ckpt"),
                "checkpoint_every": 9, "keep_checkpoints": 2, "resume": str(files / "old"),
                "host": "127.0.0.2", "startup_timeout_s": 30.0, "backend": "ray",
                "ray_address": "auto", "run_dir": str(files / "run"), "token": TOKEN, **tls},
        "sync": {"workers": 3, "mode": "sync", "backup_workers": 1, "aggregate": "median",
                 "model": "cnn:4/8",
                 "byzantine": 1, "precision": "fp16", "init_scale": 1024.0,
                 "growth_interval": 10, "loss_mean_over": 4096, "memory_budget_mb": 512,
                 "max_waiting": 8, "freeze_timeout_s": 5.0},
        "dp": {"dp_noise": 1.1, "dp_clip": 0.5, "dp_delta": 1e-6, "dp_noise_at": "server",
               "dp_target_epsilon": 50.0, "dp_seed": 3},
    }


def test_the_runs_below_set_every_setting_of_a_launch_away_from_its_default(files):
    defaults = {name: default_of(leaf) for name, leaf in leaves(LaunchConfig).items()}
    changed = set()
    for settings in _runs(files).values():
        config = LaunchConfig.from_flat(settings)
        changed |= {n for n, v in to_flat(config, secrets=True).items() if v != defaults[n]}
    assert changed == set(defaults), sorted(set(defaults) - changed)


@pytest.mark.parametrize("run", ["ssp", "sync", "dp"])
def test_config_json_round_trips_every_setting_but_the_token(files, run):
    config = LaunchConfig.from_flat(_runs(files)[run])
    saved = json.loads(json.dumps(config.to_json()))
    assert saved["token"] == (None if config.security.token is None else "(set, not saved)")
    assert TOKEN not in json.dumps(saved)
    saved["token"] = config.security.token
    assert LaunchConfig.from_json(saved) == config


def _capture(monkeypatch, module, name) -> list:
    seen = []

    class Stop(Exception):
        pass

    def fake(settings):
        seen.append(settings)
        raise Stop

    monkeypatch.setattr(module, name, fake)
    return seen, Stop


@pytest.mark.parametrize("run", ["ssp", "sync", "dp"])
def test_every_setting_reaches_a_local_server_and_worker_unchanged(files, monkeypatch, run):
    """What the local backend writes on a child's standard input, read as the child reads it
    (`tinyps server|worker --settings FILE`), with the token from the environment."""
    config = LaunchConfig.from_flat(_runs(files)[run])
    monkeypatch.setenv("TINYPS_TOKEN", config.security.token or "")
    import tinyps.cli.process as process

    seen, stop = _capture(monkeypatch, process, "serve")
    for i in range(config.servers):
        sent = roles.server_config(config, i, port=40000 + i, checkpoints=files / "ck",
                                   restore=i == 1)
        (files / "s.json").write_text(roles.to_json(roles.without_secrets(sent)))
        with pytest.raises(stop):
            main(["server", "--settings", str(files / "s.json")])
        assert seen[-1] == sent
    seen, stop = _capture(monkeypatch, process, "run_worker_process")
    for i in range(config.workers):
        sent = roles.worker_settings(config, i, ["h:1", "h:2"], steps=11, metrics="m.jsonl",
                                     start_time=12.5)
        (files / "w.json").write_text(roles.to_json(roles.without_secrets(sent)))
        with pytest.raises(stop):
            main(["worker", "--settings", str(files / "w.json")])
        assert seen[-1] == sent
        assert seen[-1].slowdown == config.faults.slowdown(i)  # the per-worker parts
        assert seen[-1].poison == config.faults.poison_of(i)


def test_the_settings_a_child_gets_never_hold_the_token(files):
    config = LaunchConfig.from_flat(_runs(files)["ssp"])
    for settings in (roles.server_config(config, 0), roles.worker_settings(config, 0, ["h:1"])):
        assert TOKEN in repr(to_flat(settings, secrets=True))
        text = roles.to_json(roles.without_secrets(settings))
        assert TOKEN not in text and TOKEN not in roles.to_json(settings)


@pytest.mark.parametrize("kind", [ServerConfig, WorkerSettings, LaunchConfig, TrainConfig])
def test_to_dict_and_from_dict_are_inverses(files, kind):
    if kind is LaunchConfig:
        config = LaunchConfig.from_flat(_runs(files)["ssp"])
    elif kind is TrainConfig:
        config = LaunchConfig.from_flat(_runs(files)["ssp"]).train
    else:
        launch = LaunchConfig.from_flat(_runs(files)["ssp"])
        config = (roles.server_config(launch, 2) if kind is ServerConfig
                  else roles.worker_settings(launch, 3, ["h:1"]))
    data = json.loads(json.dumps(to_dict(config)))
    assert from_dict(kind, data, token=TOKEN) == config


COMMANDS = {"launch": LaunchConfig, "server": ServerConfig, "worker": WorkerSettings,
            "train": TrainConfig}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_flag_is_a_setting_whose_help_shows_its_fields_default(command):
    """The parser says what the dataclass says: the default in the help is the field's own,
    and the flag reads that default's text back as the same value."""
    kind = COMMANDS[command]
    parser = build_parser().commands[command]
    actions = {a.dest: a for a in parser._actions}  # argparse keeps them here; read-only use
    for name, leaf in leaves(kind).items():
        action = actions[name]
        assert action.default is argparse.SUPPRESS  # no second default beside the field's
        assert action.help and leaf.field.metadata["help"] in action.help
        default = default_of(leaf)
        if (isinstance(default, bool) or default in (None, ())
                or leaf.field.metadata.get("env")):
            continue
        assert f"(default: {_shown(default)})" in action.help
        assert _converter(leaf)(_shown(default)) == default


@pytest.mark.parametrize("command", COMMANDS)
def test_no_flags_give_the_dataclasses_defaults(command, monkeypatch):
    monkeypatch.delenv("TINYPS_TOKEN", raising=False)
    kind = COMMANDS[command]
    extra = ["--servers", "h:1"] if command == "worker" else []
    from tinyps.cli.flags import settings_from

    args = build_parser().parse_args([command, *extra])
    given = settings_from(args, kind)
    assert set(given) <= {"servers"}
    built = from_flat(kind, given)
    assert built == (kind(servers=("h:1",)) if command == "worker" else kind())


def test_tinyps_train_and_launch_share_their_training_defaults():
    assert LaunchConfig().train == TrainConfig()
    assert LaunchConfig().train.epochs == 20 and TrainConfig().lr == 0.1


def test_a_bad_setting_is_refused_naming_it(capsys):
    assert main(["launch", "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse refuses what is not even a number
        main(["launch", "--lr", "fast"])
    assert "--lr: expected a number, got 'fast'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"unknown settings \['wrokers'\]"):
        LaunchConfig.from_flat({"wrokers": 2})


def test_settings_flags_and_a_settings_file_do_not_mix(tmp_path, capsys):
    (tmp_path / "s.json").write_text(roles.to_json(ServerConfig()))
    assert main(["server", "--settings", str(tmp_path / "s.json"), "--mode", "async"]) == 2
    assert "give --settings alone" in capsys.readouterr().err


def test_serve_takes_one_settings_object_or_its_settings_by_name():
    by_name = ps.server.serve(mode="async", workers=2, staleness_lr=True)
    try:
        assert by_name.store.config == from_flat(ServerConfig, {
            "mode": "async", "workers": 2, "staleness_lr": True}).store
    finally:
        by_name.stop(0)
    with pytest.raises(TypeError, match="not both"):
        ps.server.serve(ServerConfig(), mode="async")
    with pytest.raises(ValueError, match="unknown settings"):
        ps.server.serve(mdoe="async")


def test_worker_settings_are_checked_where_they_are_made():
    with pytest.raises(ValueError, match="at least one server address"):
        WorkerSettings()
    with pytest.raises(ValueError, match="worker index 2 is not in 0..1"):
        WorkerSettings(servers=("h:1",), index=2, workers=2)
    assert worker.process.parse_addresses("a:1, b:2") == ("a:1", "b:2")

"""The ``sea`` command: its subcommands, help without heavy imports, the resolved configuration, and
user errors as one ``sea <cmd>: error: ...`` line with exit status 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sea_model.commands import cli
from sea_model.config import STAGE_DEFAULTS


def test_subcommands_and_help_start_without_torch():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"demo", "train", "generate", "selfcheck", "bench"} <= set(sub.choices)
    code = "import sys; from sea_model.commands import cli; cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_train_help_states_the_stage_defaults(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for stage, d in STAGE_DEFAULTS.items():
        assert f"stage {stage} lr {d['lr']:g}, global batch {d['global_batch_size']}" in text


def test_print_config_resolves_shortcuts_files_and_overrides(tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1e-3\n  epochs: 2\ndata:\n  json_path: d.json\n")
    argv = ["train", "--stage", "2", "--config", str(path), "--print_config", "--train.epochs=3", "--out", "o"]
    assert cli.main(argv) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    t = printed["train"]
    assert (t["stage"], t["lr"], t["epochs"], t["out_dir"]) == (2, 1e-3, 3.0, "o")
    assert t["global_batch_size"] == STAGE_DEFAULTS[2]["global_batch_size"]  # the stage's default, resolved
    assert printed["data"] == {**printed["data"], "json_path": "d.json", "template": "auto"}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--stage", "1", "--train.nope", "1"], "unknown key train.nope"),
        (["train", "--stage", "1", "--train.max_steps", "many"], "train.max_steps: cannot read 'many'"),
        (["train", "--stage", "1", "--config", "/nonexistent.yaml"], "no such file"),
        (["train", "--stage", "1"], "data.json_path is required"),
        (["train", "--stage", "1", "--train.lr"], "--train.lr: missing value"),
        (["bench", "--ops", "nope"], "nope"),
        # values validated on load, before anything is built
        (["train", "--train.lr", "-1"], "train.lr must be a finite number > 0; got -1.0"),
        (["train", "--train.micro_batch_size", "3", "--train.global_batch_size", "8"], "must be a multiple of"),
        (["train", "--train.save_every", "-1"], "train.save_every must be >= 0"),
        (["train", "--train.keep_last", "0"], "train.keep_last must be >= 1"),
        (["train", "--train.epochs", "-1"], "train.epochs must be a finite number > 0"),
        (["train", "--train.grad_clip", "nan"], "train.grad_clip must be a finite number >= 0"),
        (["train", "--train.max_steps", "0"], "train.max_steps must be >= 1"),
        (["train", "--train.betas", "[0.9, 1.5]"], "train.betas must be two numbers in [0, 1)"),
        (["train", "--model.sea.min_scale", "0"], "model.sea.min_scale must be a finite number in (0"),
        (["train", "--data.num_workers", "-2"], "data.num_workers must be >= 0"),
        (["train", "--data.template", "chatml"], "data.template must be one of plain, chat, vicuna_v1, auto"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"sea {argv[0]}: error: ") and message in err and "Traceback" not in err


@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_bad_bench_rounds_is_an_argparse_error(value, capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["bench", "--rounds", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        stop.value.code == 2
        and err[-1] == f"sea bench: error: argument --rounds: must be a positive integer; got {value!r}"
    )


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="unknown key train.nope"):
        cli.main(["train", "--debug", "--stage", "1", "--train.nope", "1"])


@pytest.mark.parametrize(
    "content, message",
    [
        (b"train: {lr: [1, 2", "not valid YAML"),
        (b"train:\n  lr: \xff\xfe\n", "not UTF-8 text (byte 0xff at offset 13)"),
        (b"- 1\n- 2\n", "expected a mapping with sections model, data, train"),
        (b"train:\n  lr: fast\n", "train.lr: cannot read 'fast'"),
    ],
)
def test_bad_config_files_are_named(tmp_path, capsys, content, message):
    path = tmp_path / "run.yaml"
    path.write_bytes(content)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_devices_are_checked_before_anything_is_written(tmp_path, capsys):
    import torch

    cases = [(["train", "--data.json_path", "x.json", "--train.device", "gpu", "--out", str(tmp_path / "t")], "gpu")]
    if not torch.cuda.is_available():
        cases += [
            (["demo", "--quick", "--device", "cuda", "--out", str(tmp_path / "d")], "CUDA is not available"),
            (["generate", "--checkpoint", str(tmp_path), "--prompt", "hi", "--device", "cuda:1"], "CUDA is not"),
        ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(
            f"sea {argv[0]}: error: --device" if argv[0] != "train" else "sea train: error: train.device"
        )
        assert message in err
    assert not list(tmp_path.iterdir())

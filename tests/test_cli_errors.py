"""The command line on user errors (issue 20, item 7): one line ``error: <message>`` naming the file, key or
value, exit code 2 and no traceback; ``--debug`` and real bugs keep the traceback; ``caption`` and
``retrieve`` report an unreadable file and go on with the others (exit 1)."""
from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import SafetensorError

import mmstory
import mmstory.cli as cli
from conftest import tiny_config
from mmstory.cli import main
from mmstory.config import ConfigError
from mmstory.errors import UserError
from mmstory.model import build_model

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments" / "emoji_tiny.yaml")
DECODE = ["--max-new-tokens", "4"]


def error_line(capsys) -> str:
    """The single line a user error prints on stderr (and nothing else there)."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    build_model(tiny_config(audio=False)).save(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i in range(2):
        rgb = (np.random.RandomState(i).rand(40, 48, 3) * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{i}.png")
        paths.append(str(folder / f"{i}.png"))
    return paths


def broken_copy(checkpoint: Path, tmp_path: Path, file: str, content: bytes | None) -> Path:
    """A copy of the model folder with ``file`` replaced by ``content`` (None: removed)."""
    folder = tmp_path / "broken"
    folder.mkdir()
    for f in checkpoint.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    if content is None:
        (folder / file).unlink()
    else:
        (folder / file).write_bytes(content)
    return folder


# ---------------------------------------------------------------------------------------------- config values
@pytest.mark.parametrize("override, named", [
    ("--model.dim=-5", "config key 'model.dim': must be an integer >= 1, got -5"),
    ("--model.dim=abc", "config key 'model.dim': expected int, got str 'abc'"),
    ("--model.encoders.text.args.width=abc",
     "config key 'model.encoders.text.args.width': expected int, got str 'abc'"),
    ("--model.encoders.text.args.width=-3", "config key 'model.encoders.text.args.width': must be > 0, got -3"),
    ("--model.encoders.text.args.heads=0", "config key 'model.encoders.text.args.heads': must be > 0, got 0"),
    ("--model.encoders.text.args.heads=5",
     "config key 'model.encoders.text.args.heads': 5 heads do not divide width 192"),
    ("--model.decoder.heads=5", "config key 'model.decoder.heads': 5 heads do not divide the decoder's dim 192"),
    ("--model.decoder.depth=0", "config key 'model.decoder.depth': must be an integer >= 1, got 0"),
    ("--model.retrieval.heads=5", "config key 'model.retrieval.heads': 5 heads do not divide the model's dim 192"),
    ("--model.dim=[1,", "override '--model.dim=[1,': the value is not valid YAML"),
    ("--model.fusion.name=nope", "config key 'model.fusion.name': unknown fusion 'nope'; valid names: concat"),
    ("--model.encoders.text.args.widht=64", "config key 'model.encoders.text.args.widht': encoder 'text_transformer' "
                                            "has no argument 'widht'"),
])
def test_bad_config_value_is_one_line_naming_key_and_value(override, named, tmp_path, capsys):
    assert main(["train", EXPERIMENT, override, f"--out_dir={tmp_path / 'run'}"]) == 2
    assert error_line(capsys).startswith(f"error: {named}")
    assert not (tmp_path / "run").exists()  # refused before any run folder or model


def test_model_config_values_are_checked_when_made():
    with pytest.raises(ConfigError, match=r"config key 'decoder.heads': 3 heads do not divide the decoder's dim 32"):
        mmstory.config.from_dict(mmstory.config.ModelConfig, {"decoder": {"dim": 32, "heads": 3}})
    with pytest.raises(ConfigError, match=r"config key 'encoders.image.args': image_size 30 is not a multiple"):
        mmstory.config.from_dict(mmstory.config.ModelConfig, {"encoders": {"image": {"name": "vit",
                                                                                   "args": {"image_size": 30}}}})


@pytest.mark.parametrize("text, named", [
    ("", "is empty"),
    ("# only a comment\n", "is empty"),
    ("- a\n- b\n", "must hold a mapping at the top level, not a list"),
    ("steps: [1,\n", "is not valid YAML at line 2"),
])
def test_bad_config_file_is_one_line_naming_the_file(text, named, tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    # --steps=0: were the file taken as all defaults, the run stops at the steps check instead of training
    assert main(["train", str(path), "--steps=0", f"--out_dir={tmp_path / 'run'}"]) == 2
    line = error_line(capsys)
    assert str(path) in line and named in line


# ---------------------------------------------------------------------------------------------- model folders
@pytest.mark.parametrize("file, content, named", [
    ("model.safetensors", b"", "model.safetensors is not a readable safetensors file"),
    ("model.safetensors", b"hello", "model.safetensors is not a readable safetensors file"),
    ("model.safetensors", "truncate", "model.safetensors is not a readable safetensors file"),
    ("model.safetensors", None, "is not an mmstory model folder"),
    ("config.yaml", b"", "config.yaml is empty"),
    ("config.yaml", b"dim: [1,\n", "config.yaml is not valid YAML"),
    ("config.yaml", b"dim: -5\n", "config.yaml: config key 'dim': must be an integer >= 1, got -5"),
    ("config.yaml", None, "config.yaml missing"),
])
def test_broken_model_folder_is_one_line_naming_the_file(checkpoint, images, file, content, named, tmp_path, capsys):
    if content == "truncate":
        content = (checkpoint / file).read_bytes()[:-1000]
    folder = broken_copy(checkpoint, tmp_path, file, content)
    assert main(["caption", images[0], "--checkpoint", str(folder)]) == 2
    line = error_line(capsys)
    assert str(folder) in line and named in line
    with pytest.raises(UserError, match="model.safetensors|config.yaml"):
        mmstory.load(folder)


def test_weights_of_another_model_name_both_files(checkpoint, images, tmp_path, capsys):
    other = tiny_config(audio=False)
    other.dim = 64
    folder = broken_copy(checkpoint, tmp_path, "config.yaml",
                         yaml.safe_dump(mmstory.config.to_dict(other)).encode())
    assert main(["caption", images[0], "--checkpoint", str(folder)]) == 2
    assert "model.safetensors does not hold the weights of the model" in error_line(capsys)


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_not_a_model_folder(images, where, tmp_path, capsys):
    path = tmp_path / "nope" if where == "missing" else Path(images[0])
    assert main(["caption", images[0], "--checkpoint", str(path)]) == 2
    assert str(path) in error_line(capsys)
    with pytest.raises(FileNotFoundError):  # a UserError and, as before, a FileNotFoundError
        mmstory.load(path)


# ---------------------------------------------------------------------------------------------- disk full
def _command_raising(monkeypatch, action):
    """Make ``mmstory components`` run ``action`` instead."""
    def cmd(args):
        action()
        return 0
    monkeypatch.setattr(cli, "cmd_components", cmd)


def test_model_save_on_a_full_disk_names_the_file(checkpoint, tmp_path, monkeypatch, capsys):
    import safetensors.torch

    model = mmstory.load(checkpoint)

    def full(*args, **kwargs):  # what safetensors raises when the disk fills (seen on a 64 kB tmpfs)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", full)
    _command_raising(monkeypatch, lambda: model.save(tmp_path / "out"))
    assert main(["components"]) == 2
    written = tmp_path / "out" / "model.safetensors"
    assert error_line(capsys) == f"error: no space left on device while writing {written}"

    monkeypatch.undo()

    def write_text(self, *args, **kwargs):  # Path.write_text into a full disk: errno 28, no file name
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(UserError, match=f"no space left on device while writing {tmp_path / 'out2' / 'config.yaml'}"):
        model.save(tmp_path / "out2")


@pytest.mark.parametrize("exc, expected", [
    (OSError(errno.ENOSPC, "No space left on device", "runs/x/checkpoints/step_4.pt"),
     "error: no space left on device while writing runs/x/checkpoints/step_4.pt"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 662"),
     "error: writing a file failed, is the disk full? ([enforce fail at inline_container.cc:672]"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "data/x.json"),
     "error: data/x.json: No such file or directory"),
    (PermissionError(errno.EACCES, "Permission denied", "runs/x"), "error: runs/x: Permission denied"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "runs"), "error: runs: Is a directory"),
    (yaml.YAMLError("while parsing a block mapping in \"x.yaml\", line 1"), "error: invalid YAML: while parsing"),
    (UserError("shard a.tar: 3 samples, the manifest says 4"), "error: shard a.tar: 3 samples, the manifest says 4"),
])
def test_user_errors_from_any_command_are_one_line(exc, expected, monkeypatch, capsys):
    def fail():
        raise exc
    _command_raising(monkeypatch, fail)
    assert main(["components"]) == 2
    assert error_line(capsys).startswith(expected)


@pytest.mark.parametrize("exc", [TypeError("bug"), AttributeError("bug"), IndexError("bug"), KeyError("bug"),
                                 ValueError("bug"), RuntimeError("CUDA error: an illegal memory access")])
def test_a_real_bug_keeps_its_traceback(exc, monkeypatch):
    """A guard against catching too much: these passed through before the change as well."""
    def fail():
        raise exc
    _command_raising(monkeypatch, fail)
    with pytest.raises(type(exc)):
        main(["components"])


@pytest.mark.parametrize("argv", [["--debug", "train", EXPERIMENT, "--model.dim=-5"],
                                  ["train", EXPERIMENT, "--model.dim=-5", "--debug"]])
def test_debug_shows_the_traceback_of_a_user_error(argv, tmp_path):
    with pytest.raises(ConfigError, match="model.dim"):
        main(argv + [f"--out_dir={tmp_path / 'run'}"])


def test_interrupt_is_one_line_and_exit_130(monkeypatch, capsys):
    def stop():
        raise KeyboardInterrupt
    _command_raising(monkeypatch, stop)
    assert main(["components"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_allow_pipe_sets_the_environment(monkeypatch, capsys):
    monkeypatch.delenv("MMSTORY_ALLOW_PIPE", raising=False)
    assert main(["components", "--json"]) == 0
    assert "MMSTORY_ALLOW_PIPE" not in os.environ
    assert main(["--allow-pipe", "components", "--json"]) == 0
    assert os.environ["MMSTORY_ALLOW_PIPE"] == "1"
    monkeypatch.delenv("MMSTORY_ALLOW_PIPE")
    assert main(["components", "--allow-pipe"]) == 0
    assert os.environ["MMSTORY_ALLOW_PIPE"] == "1"


# ---------------------------------------------------------------------------------------------- inference commands
@pytest.mark.parametrize("question", ["", "   \n"])
def test_ask_refuses_an_empty_question(checkpoint, images, question, capsys):
    assert main(["ask", images[0], question, "--checkpoint", str(checkpoint)] + DECODE) == 2
    assert error_line(capsys) == "error: the question is empty"
    assert capsys.readouterr().out == ""


def test_ask_with_a_very_long_question_says_so_in_a_short_line(checkpoint, images, capsys):
    assert main(["ask", images[0], "why " * 2500, "--checkpoint", str(checkpoint)] + DECODE) == 2
    line = error_line(capsys)
    assert line.startswith("error: the question is too long") and len(line) < 300


def test_ask_with_an_unreadable_image_names_it(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert main(["ask", str(bad), "what is it?", "--checkpoint", str(checkpoint)] + DECODE) == 2
    assert error_line(capsys).startswith(f"error: {bad}: cannot read image")


@pytest.mark.parametrize("k", ["0", "-1"])
def test_retrieve_refuses_k_below_one(checkpoint, images, k, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["retrieve", "--checkpoint", str(checkpoint), "--query", "a cat", "--images", *images, "-k", k])
    assert exit_.value.code == 2
    assert "k must be >= 1" in capsys.readouterr().err


def test_caption_reports_an_unreadable_file_and_captions_the_rest(checkpoint, images, tmp_path, capsys):
    bad, missing, folder = tmp_path / "bad.png", tmp_path / "missing.png", tmp_path / "folder.png"
    bad.write_bytes(b"not an image")
    folder.mkdir()
    argv = [images[0], str(bad), str(missing), images[1], str(folder)]
    assert main(["caption", *argv, "--checkpoint", str(checkpoint)] + DECODE) == 1
    out, err = capsys.readouterr()
    expected = mmstory.caption(mmstory.load(checkpoint), [Image.open(p) for p in images], max_new_tokens=4)
    assert out.splitlines() == [f"{images[0]}\t{expected[0]}", f"{images[1]}\t{expected[1]}"]
    assert "Traceback" not in err
    assert err.splitlines() == [f"error: {bad}: cannot read image: ValueError: not an image file that PIL can read "
                                f"(12 bytes, starting b'not an i')",
                                f"error: {missing}: no such file", f"error: {folder}: is a folder, not a file"]


def test_caption_of_audio_with_an_image_only_model_names_the_file(checkpoint, images, tmp_path, capsys):
    clip = tmp_path / "clip.wav"
    clip.write_bytes(b"RIFF")
    assert main(["caption", images[0], str(clip), "--checkpoint", str(checkpoint)] + DECODE) == 1
    out, err = capsys.readouterr()
    assert out.startswith(f"{images[0]}\t") and err.startswith(f"error: {clip}: this model has no audio encoder")


def test_retrieve_reports_an_unreadable_gallery_file_and_ranks_the_rest(checkpoint, images, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    argv = ["retrieve", "--checkpoint", str(checkpoint), "--query", "a cat", "-k", "5"]
    assert main(argv + ["--images", images[0], str(bad), images[1]]) == 1
    out, err = capsys.readouterr()
    assert sorted(line.split("\t")[2] for line in out.splitlines()) == sorted(images)
    assert err.startswith(f"error: {bad}: cannot read image") and len(err.splitlines()) == 1
    assert main(argv + ["--images", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines()[1:] == ["error: none of the 1 image files could be read"]


def test_eval_split_with_shard_files_is_a_user_error(checkpoint, tmp_path, capsys):
    assert main(["eval", str(checkpoint), "--data", str(tmp_path / "a.tar"), "--split", "val", "--quiet"]) == 2
    assert error_line(capsys).startswith("error: --split needs --data to be a manifest JSON")

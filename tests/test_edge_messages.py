"""Paths and numbers at the edges are one clear line, never a traceback: a name part over 255 bytes, `~nosuchuser`,
a dangling symlink or a loop named like a Hub id, a local folder that shadows a Hub id (said), an absurd --timeout,
an infinite --atol, a config.json without model_type or with another member's sizes."""

import json
import os

import pytest
from sam_testing import tiny_sam_hq_config

from sam_split import push
from sam_split.tools.cli import ToolError, locate
from sam_split.tools.family import check_config_body
from sam_split.tools.models import resolve_model

LONG = "x" * 256


def parse_error(parse, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1
    return errors[0]


@pytest.mark.parametrize("text", [f"/tmp/{LONG}/model", f"./{LONG}", f"org/{LONG}"])
def test_a_name_over_255_bytes_is_one_line(text):
    with pytest.raises(ToolError, match="a name in it is 256 bytes long; file systems take at most 255"):
        locate(text, flag="--model")


def test_every_tool_refuses_a_too_long_path_in_one_line(tmp_path, capsys):
    from sam_split import evaluate, export_onnx, finetune

    long_path = str(tmp_path / LONG / "out")
    assert "256 bytes" in parse_error(push.parse_args, ["--source", long_path, "--no-push", "--output-dir",
                                                        str(tmp_path / "o")], capsys)
    assert "256 bytes" in parse_error(push.parse_args, ["--source", "random:sam-tiny", "--no-push", "--output-dir",
                                                        long_path], capsys)
    assert "256 bytes" in parse_error(evaluate.parse_args, ["--model", "org/m", "--data", "d", "--output-dir",
                                                            long_path], capsys)
    assert "256 bytes" in parse_error(finetune.parse_args, ["--model", "org/m", "--train-data", "d", "--max-steps", "1",
                                                            "--output-dir", long_path], capsys)
    rc = export_onnx.main(["--model", long_path, "--output-dir", str(tmp_path / "o")])
    assert rc == 1 and "256 bytes" in capsys.readouterr().err
    from sam_split.tools.data import DataOptions, open_source

    with pytest.raises(ToolError, match="256 bytes"):
        open_source(long_path, DataOptions())


def test_an_unknown_user_home_is_one_line(capsys):
    with pytest.raises(ToolError, match="~nosuchuser-sam-split names no user of this machine"):
        locate("~nosuchuser-sam-split/x")
    assert "names no user" in parse_error(push.parse_args, ["--source", "~nosuchuser-sam-split/x", "--no-push",
                                                             "--output-dir", "o"], capsys)


def test_links_named_like_a_hub_id_and_a_shadowing_folder_are_said(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    os.symlink(tmp_path / "missing", tmp_path / "org" / "dangling")
    os.symlink(tmp_path / "org" / "loop", tmp_path / "org" / "loop")
    for name in ("org/dangling", "org/loop"):
        with pytest.raises(ToolError, match=f"--model {name} is a symbolic link that leads nowhere .* not a Hub id"):
            locate(name)
    (tmp_path / "org" / "model").mkdir()
    assert locate("org/model").kind == "local"
    assert f"--model org/model: using the local folder {tmp_path / 'org' / 'model'}" in capsys.readouterr().out


def test_absurd_timeout_and_infinite_atol_are_refused(tmp_path, capsys):
    from sam_split import export_onnx

    assert "--timeout must be a positive number of seconds up to" in parse_error(
        push.parse_args, ["--source", "random:sam-tiny", "--no-push", "--output-dir", str(tmp_path / "o"),
                          "--timeout", "1e300"], capsys)
    for value in ("inf", "nan"):
        assert "--atol must be a finite positive number" in parse_error(
            export_onnx.parse_args, ["--model", "m", "--output-dir", str(tmp_path / "o"), "--atol", value], capsys)


def test_a_config_without_model_type_or_with_another_members_sizes(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ToolError, match="its config.json has no model_type"):
        resolve_model(str(tmp_path / "empty"), None)
    hq = {**tiny_sam_hq_config().to_dict(), "model_type": "sam2_split"}
    (tmp_path / "hq").mkdir()
    (tmp_path / "hq" / "config.json").write_text(json.dumps(hq))
    with pytest.raises(ToolError, match="this is a SAM-HQ checkpoint: its config.json holds SAM-HQ's sizes but says "
                                        "model_type 'sam2_split'"):
        resolve_model(str(tmp_path / "hq"), None)
    with pytest.raises(ValueError, match="this is a SAM-HQ checkpoint"):
        check_config_body({**hq, "model_type": "sam2"})
    check_config_body({**hq, "model_type": "sam_hq"})  # what it says is what it holds


def test_nan_pixels_of_a_float_tiff_are_named_not_made_zero(tmp_path):
    import numpy as np
    from PIL import Image
    from test_data import rect, scanned, skipped

    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    pixels = np.random.default_rng(0).random((64, 64)).astype(np.float32)
    Image.fromarray(pixels).save(tmp_path / "images" / "good.tif")
    pixels[3, 5] = np.nan
    Image.fromarray(pixels).save(tmp_path / "images" / "nan.tif")
    for stem in ("good", "nan"):
        Image.fromarray(rect(64, 64, 10, 10, 40, 40).astype(np.uint8) * 255).save(tmp_path / "masks" / f"{stem}_a.png")
    source, images, log = scanned(tmp_path)
    assert [image.name for image in images] == ["good.tif"]
    assert skipped(log)["nan.tif"].startswith("1 of its 4096 pixels are NaN or infinite"), log

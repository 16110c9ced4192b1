import os
import subprocess
import sys
from pathlib import Path

from mqsam2.data.__main__ import main

from .layouts import build_coco, build_davis, build_sav

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run(
        [sys.executable, "-m", "mqsam2.data", *args], capture_output=True, text=True, env=env
    )


def test_synth_writes_shards_then_resumes(tmp_path, capsys):
    args = [
        "synth",
        "--out",
        str(tmp_path),
        "--videos",
        "3",
        "--frames",
        "4",
        "--size",
        "32x48",
        "--seed",
        "2",
    ]
    args += ["--images", "2", "--workers", "2"]
    first = _run(*args)
    assert first.returncode == 0, first.stderr
    assert "3 samples" in first.stdout and "2 samples" in first.stdout
    assert sorted(p.name for p in (tmp_path / "videos").iterdir()) == ["synth-000000.tar", "synth-000001.tar"]
    assert main(args) == 0
    assert "0 written, 2 already complete" in capsys.readouterr().out


def test_bad_input_is_one_line_and_exit_status_2(tmp_path):
    build_sav(tmp_path / "sav", videos=2)
    (tmp_path / "sav" / "Annotations_6fps" / "sav_000002" / "000" / "00008.png").unlink()
    result = _run("convert-sav", "--root", str(tmp_path / "sav"), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "sav_000002/000: no mask for annotated frame 8" in line
    assert not list((tmp_path / "out").glob("*.tar*"))


def test_skip_bad_counts_what_it_left_out(tmp_path, capsys, caplog):
    build_sav(tmp_path / "sav", videos=3)
    (tmp_path / "sav" / "JPEGImages_24fps" / "sav_000001" / "00004.jpg").unlink()
    args = ["convert-sav", "--root", str(tmp_path / "sav"), "--out", str(tmp_path / "out"), "--skip-bad"]
    assert main([*args, "--workers", "1", "--maxcount", "2"]) == 0
    assert "2 samples, 1 bad items skipped" in capsys.readouterr().out
    [warning] = [r.getMessage() for r in caplog.records if r.name == "mqsam2.data"]
    assert warning.startswith("skipped: ") and "00004.png: has no frame 4" in warning


def test_davis_and_coco_commands(tmp_path, capsys):
    build_davis(tmp_path / "davis")
    annotations = build_coco(tmp_path / "coco")
    assert (
        main(
            [
                "convert-davis",
                "--root",
                str(tmp_path / "davis"),
                "--out",
                str(tmp_path / "d"),
                "--workers",
                "1",
            ]
        )
        == 0
    )
    assert "2 samples" in capsys.readouterr().out
    coco = ["convert-coco", "--images", str(tmp_path / "coco" / "val2017"), "--annotations", str(annotations)]
    assert main([*coco, "--out", str(tmp_path / "c"), "--workers", "1"]) == 0
    assert "3 samples" in capsys.readouterr().out


def test_unknown_layout(tmp_path, capsys):
    assert main(["convert-davis", "--root", str(tmp_path), "--out", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: unknown layout")

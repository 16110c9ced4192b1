"""The commands' reliability contract (docs/reliability.md), each case a real command in its own process
(tests/cli_runner.py) on a tiny run: random-init SAM2.1-tiny at 64 px, one 3-frame clip and one image, two
Hiera blocks reconstructed for 4 steps each.

- Bad input: exit status 2, one line naming the problem and the fix, and nothing written.
- Interruptions: SIGKILL, SIGTERM and SIGINT at several points (real signals, sent by the process to itself at
  an exact function call); the status is never 0, a stop is one line, and the rerun ends with an export
  bit-identical to an uninterrupted run's, every unit recorded once and no temporary left behind.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from mqsam2.config import config_dict, parse_config, parser
from mqsam2.export.card import card_paths
from mqsam2.files import write_text
from mqsam2.rundir import RunDir
from tests.cli_runner import Fault, Runner

TINY = """\
name: tiny
model: {size: t, image_size: 64}
data: {synth_videos: 1, synth_frames: 3, synth_size: 64, synth_images: 1,
       calib_videos: 1, calib_frames: 3, calib_images: 1, calib_objects: 1, val_videos: 1, val_frames: 3,
       val_images: 0}
quant: {observer_sample_size: 4096}
reconstruction: {units: [image_encoder.trunk.blocks.0, image_encoder.trunk.blocks.1], iters: 4, batch_size: 2,
                 checkpoint_every: 1, accelerator: cpu, devices: 1}
evaluation: {enabled: false}
logging: {wandb: false}
"""
UNITS = ("image_encoder.trunk.blocks.0", "image_encoder.trunk.blocks.1")


@dataclass
class Tiny:
    root: Path
    config: Path
    synth: Path
    run: RunDir  # finished, uninterrupted: the reference

    def args(self, run_root: Path, *extra: str) -> list[str]:
        return [
            "--config",
            str(self.config),
            "--run_root",
            str(run_root),
            "--data.root",
            str(self.synth),
            *extra,
        ]


@pytest.fixture(scope="session")
def runner(tmp_path_factory) -> Runner:
    env = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "TQDM_DISABLE": "1"}
    return Runner(tmp_path_factory.mktemp("commands"), env)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, runner) -> Tiny:
    root = tmp_path_factory.mktemp("tiny")
    (root / "tiny.yaml").write_text(TINY)
    tiny = Tiny(root, root / "tiny.yaml", root / "synth", RunDir(root / "runs" / "tiny"))
    done = runner("fit", *tiny.args(root / "runs"))
    assert done.status == 0, done.describe()
    assert [r["unit"] for r in tiny.run.unit_records()] == list(UNITS)
    return tiny


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


# ---- bad input: one line, exit status 2, nothing written -----------------------------------------------------


def _write(root: Path, name: str, content: bytes | str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


FIT_CASES = {
    # id: (extra arguments, with {root} for the case's folder; the message (regex))
    "unknown choice": (
        ["--allocation.method", "foo"],
        r"error: allocation\.method: 'foo' is not one of ilp, greedy, uniform \(see python -m mqsam2\.fit --help\)",
    ),
    "unknown option": (
        ["--reconstruction.itres", "3"],
        r"error: unrecognized arguments: --reconstruction\.itres 3",
    ),
    "bad YAML": (
        ["--config", "{root}/broken.yaml"],
        r"error: \S+/broken\.yaml:4:1: invalid YAML \(while parsing a flow sequence from line 3: expected ',' or ']'.*\); fix the file",
    ),
    "missing config file": (
        ["--config", "{root}/nope.yaml"],
        r"error: cannot read config file \S+/nope\.yaml: No such file or directory; check the path",
    ),
    "empty config file": (
        ["--config", "{root}/empty.yaml"],
        r"error: \S+/empty\.yaml: the config file is empty; write options into it \(see configs/demo\.yaml\)",
    ),
    "config file of a list": (
        ["--config", "{root}/list.yaml"],
        r"error: \S+/list\.yaml: a config file holds options as `key: value` lines, not a list; fix the file",
    ),
    "negative frame count": (
        ["--data.synth_frames", "-2"],
        r"error: data\.synth_frames is -2: give a positive number",
    ),
    "zero iterations": (
        ["--reconstruction.iters", "0"],
        r"error: reconstruction\.iters is 0: give a positive number",
    ),
    "zero-bit candidate": (
        ["--allocation.candidates", "[0, 4]"],
        r"error: allocation\.candidates: bit-width 0 is not supported: use an integer in 2\.\.8",
    ),
    "zero-bit baseline": (
        ["--evaluation.baselines", "[0]"],
        r"error: evaluation\.baselines: bit-width 0 is not supported: use an integer in 2\.\.8",
    ),
    "infeasible budget": (
        ["--allocation.target_avg", "6"],
        r"error: target_avg=6\.0 is outside the feasible range \[3, 5\] of candidates \[3, 4, 5\]: change",
    ),
    "no candidates": (
        ["--allocation.candidates", "[]"],
        r"error: no candidate bit-widths: give allocation\.candidates",
    ),
    "overflowing learning rate": (
        ["--reconstruction.lr_rounding", "1e38"],
        r"error: reconstruction\.lr_rounding 1e\+38 must lie in \(0, 1\]",
    ),
    "unknown unit": (
        ["--reconstruction.units", "[image_encoder.trunk.blocks.99]"],
        r"error: reconstruction\.units names no unit image_encoder\.trunk\.blocks\.99 of SAM2 t in mode qdrop; its "
        r"units are: image_encoder\.trunk\.blocks\.0, image_encoder\.trunk\.blocks\.1, ",
    ),
    "random-bytes checkpoint": (
        ["--model.checkpoint", "{root}/random.pt"],
        r"error: cannot read SAM2 checkpoint \S+/random\.pt: damaged or not a PyTorch file \(\w+\); copy it again, "
        r"or give a file saved as \{'model': state_dict\}",
    ),
    "missing checkpoint of another origin": (
        ["--model.checkpoint", "{root}/nope.pt"],
        r"error: SAM2 checkpoint not found: \S+/nope\.pt; check the path \(relative paths start at /\S*\)",
    ),
    "missing checkpoint of Meta's release": (
        ["--model.checkpoint", "{root}/sam2.1_hiera_tiny.pt"],
        r"error: SAM2 checkpoint not found: \S+/sam2\.1_hiera_tiny\.pt; download it from Meta's SAM2 release page",
    ),
    "truncated shard": (
        ["--data.video_shards", "[{root}/cut]", "--data.image_shards", "[{images}]"],
        r"error: \S+/cut/synth-000000\.tar: (corrupt or )?truncated shard \(.*\); rebuild the shard with "
        r"`python -m mqsam2\.data`, or leave it out of data\.\*_shards",
    ),
    "missing shards": (
        ["--data.video_shards", "[{root}/nope/sav-*.tar]", "--data.image_shards", "[{root}/nope]"],
        r"error: \S+/nope/sav-\*\.tar: no file matches this pattern; check the path",
    ),
    "empty shard folder": (
        ["--data.video_shards", "[{root}/empty]", "--data.image_shards", "[{root}/empty]"],
        r"error: \S+/empty: no \.tar shards in this folder",
    ),
    "run_root under a file": (
        ["--run_root", "{root}/a-file/runs"],
        r"error: cannot use \S+/a-file/runs/tiny: part of the path is a file, not a folder; check the path",
    ),
}


def _fit_options() -> list[str]:
    """Every option of fit's command line, as `section.key` (what `--help` lists)."""
    return list(parser().get_defaults().keys())


def _named_options(line: str) -> list[str]:
    """The fit options an error line tells the user about (`data.*_shards` as a pattern)."""
    return re.findall(
        r"(?<![\w./])((?:model|data|quant|allocation|reconstruction|evaluation|logging)\.[\w*]+)", line
    )


@pytest.mark.parametrize("case", list(FIT_CASES))
def test_fit_refuses_bad_input_in_one_line_writing_nothing(tiny, runner, tmp_path, case):
    extra, message = FIT_CASES[case]
    _write(tmp_path, "broken.yaml", "model:\n  size: t\n  image_size: [64\n")
    _write(tmp_path, "empty.yaml", "")
    _write(tmp_path, "list.yaml", "- model\n- data\n")
    _write(tmp_path, "random.pt", os.urandom(4096))
    _write(tmp_path, "a-file", "")
    (tmp_path / "empty").mkdir()
    (shard,) = tiny.synth.glob("*/videos/*.tar")
    _write(tmp_path, "cut/synth-000000.tar", shard.read_bytes()[: shard.stat().st_size // 2])
    (images,) = tiny.synth.glob("*/images")
    before = _files(tmp_path)
    arguments = [a.format(root=tmp_path, images=images) for a in extra]
    result = runner("fit", *tiny.args(tmp_path / "runs", *arguments))
    assert result.status == 2, result.describe()
    line = result.one_line()
    assert re.fullmatch(message + ".*", line), result.describe()
    assert _files(tmp_path) == before  # no run directory, no config.yaml, nothing else
    options = _fit_options()
    given = {a.removeprefix("--") for a in arguments}
    for named in set(_named_options(line)) - given:  # every option a hint names is one of fit's
        assert any(fnmatch.fnmatchcase(option, named) for option in options), (named, line)


def test_a_full_disk_is_one_line_and_leaves_no_partial_artifact(tiny, runner, tmp_path):
    """The file-size limit stands in for a full disk: calibrated.pt (150 MB) cannot be written."""
    result = runner("fit", *tiny.args(tmp_path), file_size_limit=16 << 20)
    assert result.status == 2, result.describe()
    line = result.one_line()
    assert (
        line
        == f"error: cannot use {tmp_path}/tiny/calibrated.pt: file too large (disk or file-size limit); free space or raise the limit"
    )
    assert {"config.yaml", "importance.json", "plan.json"} <= _files(tmp_path / "tiny")
    assert not any(name.startswith(("calibrated", ".calibrated")) for name in _files(tmp_path / "tiny"))


# ---- the export command ---------------------------------------------------------------------------------------


def test_export_of_a_run_with_a_subset_of_units_matches_the_fits_own_export(tiny, runner, tmp_path):
    result = runner("export", "--run", str(tiny.run.path), "--out", str(tmp_path / "again.mq"))
    assert result.status == 0, result.describe()
    assert (tmp_path / "again.mq").read_bytes() == tiny.run.export.read_bytes()


EXPORT_CASES = {
    "random bytes": (
        lambda root, run: ["--model", str(_write(root, "random.pt", os.urandom(4096)))],
        r"error: cannot read quantized model \S+: damaged or not a PyTorch file \(\w+\); give a file written by",
    ),
    "a torch file that is no quantized model": (
        lambda root, run: ["--model", str(_saved(root / "other.pt", {"weights": torch.ones(2)}))],
        r"error: \S+/other\.pt is not an mqsam2 quantized model \(expected format mqsam2-fakequant-v1\)",
    ),
    "not a run directory": (
        lambda root, run: ["--run", str(root)],
        r"error: \S+ is not a fit run directory: config\.yaml is missing",
    ),
    "unfinished run": (
        lambda root, run: ["--run", str(_unfinished(run, root))],
        r"error: run \S+ is unfinished: unit image_encoder\.trunk\.blocks\.1 has no qdrop\.pt; finish it with",
    ),
    "output under a file": (
        lambda root, run: ["--run", str(run.path), "--out", str(_write(root, "a-file", "")) + "/x.mq"],
        r"error: cannot use \S+/a-file/x\.mq: part of the path is a file, not a folder",
    ),
    "no source": (
        lambda root, run: [],
        r"error: one of the arguments --run --model is required \(see python -m mqsam2\.export --help\)",
    ),
}


def _saved(path: Path, obj) -> Path:
    torch.save(obj, path)
    return path


def _unfinished(run: RunDir, root: Path) -> Path:
    copy = root / "unfinished"
    shutil.copytree(run.path, copy, ignore=shutil.ignore_patterns("image_encoder.trunk.blocks.1", "export"))
    return copy


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_refuses_bad_input_in_one_line(tiny, runner, tmp_path, case):
    arguments, message = EXPORT_CASES[case]
    result = runner("export", *arguments(tmp_path, tiny.run))
    assert result.status == 2, result.describe()
    assert re.fullmatch(message + ".*", result.one_line()), result.describe()
    assert not list(tmp_path.rglob("*.mq")) and not list(tmp_path.rglob(".*.tmp"))


# ---- the compare and deploy commands ---------------------------------------------------------------------------

COMPARE_CASES = {
    "missing config file": (
        ["--config", "{root}/nope.yaml"],
        r"error: cannot read config file \S+/nope\.yaml: No such file or directory; check the path",
    ),
    "bad YAML": (
        ["--config", "{root}/broken.yaml"],
        r"error: \S+/broken\.yaml:4:1: invalid YAML \(while parsing a flow sequence from line 3: .*\); fix the file",
    ),
    "unknown option": (
        ["--reconstruction.itres", "3"],
        r"error: unrecognized arguments: --reconstruction\.itres 3 \(see python -m mqsam2\.compare --help\)",
    ),
}


@pytest.mark.parametrize("case", list(COMPARE_CASES))
def test_compare_refuses_bad_input_in_one_line(runner, tmp_path, case):
    arguments, message = COMPARE_CASES[case]
    _write(tmp_path, "broken.yaml", "model:\n  size: t\n  image_size: [64\n")
    before = _files(tmp_path)
    result = runner(
        "compare", *(a.format(root=tmp_path) for a in arguments), "--out_root", str(tmp_path / "out")
    )
    assert result.status == 2, result.describe()
    assert re.fullmatch(message + ".*", result.one_line()), result.describe()
    assert _files(tmp_path) == before


DEPLOY_CASES = {
    "no such run": (
        lambda root, run: ["--run", str(root / "nope")],
        r"error: \S+/nope is not a fit run directory: config\.yaml is missing",
    ),
    "a run without its export": (
        lambda root, run: ["--run", str(_without_export(run, root))],
        r"error: run \S+ has no export \(\S+/export/model\.mq is missing\): python -m mqsam2\.export --run \S+ "
        r"writes it once the run is finished \(python -m mqsam2\.fit --config \S+/config\.yaml finishes it\)",
    ),
    "zero repeats": (
        lambda root, run: ["--run", str(run.path), "--repeats", "0"],
        r"error: argument --repeats: '0' is not a positive integer \(see python -m mqsam2\.deploy --help\)",
    ),
}


def _without_export(run: RunDir, root: Path) -> Path:
    copy = root / "unexported"
    shutil.copytree(run.path, copy, ignore=shutil.ignore_patterns("export"))
    return copy


@pytest.mark.parametrize("case", list(DEPLOY_CASES))
def test_deploy_refuses_bad_input_in_one_line(tiny, runner, tmp_path, case):
    arguments, message = DEPLOY_CASES[case]
    result = runner("deploy", *arguments(tmp_path, tiny.run), "--target", "onnx")
    assert result.status == 2, result.describe()
    assert re.fullmatch(message + ".*", result.one_line()), result.describe()
    assert not list(tmp_path.rglob("deploy"))


def test_the_hint_of_a_run_without_export_works(tiny, runner, tmp_path):
    """The command deploy suggests for a finished run without its export writes that export."""
    run = _without_export(tiny.run, tmp_path)
    line = runner("deploy", "--run", str(run), "--target", "onnx").one_line()
    command = re.search(r"python -m mqsam2\.(export) (--run \S+)", line)
    assert command, line
    assert runner(command.group(1), *command.group(2).split()).status == 0
    assert (run / "export" / "model.mq").read_bytes() == tiny.run.export.read_bytes()


# ---- the data command -----------------------------------------------------------------------------------------

DATA_CASES = {
    "output under a file": (
        ["synth", "--out", "{root}/a-file/shards", "--videos", "1", "--images", "0"],
        r"error: cannot use \S+/a-file/shards: part of the path is a file, not a folder",
    ),
    "unknown command": (
        ["convert-everything"],
        r"error: argument command: invalid choice: 'convert-everything'",
    ),
    "negative video count": (
        ["synth", "--out", "{root}/out", "--videos", "-3", "--frames", "0"],
        r"error: argument --videos: '-3' is not an integer of at least 0 \(see python -m mqsam2\.data synth --help\)",
    ),
    "zero frames": (
        ["synth", "--out", "{root}/out", "--frames", "0"],
        r"error: argument --frames: '0' is not a positive integer",
    ),
    "nothing to write": (
        ["synth", "--out", "{root}/out", "--videos", "0", "--images", "0"],
        r"error: nothing to write: --videos and --images are both 0; give either a positive count",
    ),
    "missing annotations": (
        ["convert-coco", "--images", "{root}", "--annotations", "{root}/nope.json", "--out", "{root}/out"],
        r"error: \S+/nope\.json: no such annotations file; give the instances_\*\.json path",
    ),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_data_refuses_bad_input_in_one_line(runner, tmp_path, case):
    arguments, message = DATA_CASES[case]
    _write(tmp_path, "a-file", "")
    result = runner("data", *(a.format(root=tmp_path) for a in arguments))
    assert result.status == 2, result.describe()
    assert re.fullmatch(message + ".*", result.one_line()), result.describe()
    assert not (tmp_path / "out").exists()


# ---- the same through a fresh `python -m` process, as a user runs it ---------------------------------------------

FRESH = [  # (module, (arguments, with {root} for the case's folder; the message)): cases of the tables above
    ("mqsam2.fit", FIT_CASES["bad YAML"]),
    ("mqsam2.fit", FIT_CASES["missing checkpoint of Meta's release"]),  # past Lightning's Slurm detection
    ("mqsam2.compare", COMPARE_CASES["missing config file"]),
    ("mqsam2.export", ([], EXPORT_CASES["no source"][1])),
    ("mqsam2.deploy", (["--run", "{root}/nope", "--target", "onnx"], DEPLOY_CASES["no such run"][1])),
    ("mqsam2.data", DATA_CASES["negative video count"]),
]


def test_a_fresh_process_of_each_command_answers_bad_input_in_exactly_one_line(tmp_path):
    """No runner and no argv handed to main(), the commands in parallel: stderr holds the one line and nothing
    else (no library's warning, whatever is installed on the machine)."""
    _write(tmp_path, "broken.yaml", "model:\n  size: t\n  image_size: [64\n")
    _write(tmp_path, "bin/srun", "#!/bin/sh\n").chmod(0o755)  # as on a machine with Slurm installed
    env = os.environ | {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", module, *(a.format(root=tmp_path) for a in arguments)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for module, (arguments, _) in FRESH
    ]
    for (module, (_, message)), process in zip(FRESH, processes, strict=True):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (module, stdout, stderr)
        assert stdout == "" and stderr.count("\n") == 1, (module, stdout, stderr)
        assert re.fullmatch(message + ".*", stderr.strip()), (module, stderr)


# ---- interruptions: a real signal at an exact point, then a rerun to the same export ---------------------------

STARTS = {  # the artifacts of the reference run a case starts from (as an earlier, finished attempt left them)
    "nothing": (),
    "allocated": ("config.yaml", "importance.json", "plan.json", "allocation.png"),
    "calibrated": ("config.yaml", "importance.json", "plan.json", "allocation.png", "calibrated.pt"),
}
KILLS = {
    # id: (start, the fault, exit status, the stop line (None for SIGKILL), files that must exist after the stop,
    #      files that must not)
    "SIGTERM during importance": (
        "nothing",
        Fault("mqsam2.importance:ImportanceCollector.compute", signal.SIGTERM),
        143, "stopped by SIGTERM: the run is unfinished; rerun the same command to resume it",
        {"config.yaml"}, {"importance.json"},
    ),
    "SIGKILL while writing calibrated.pt": (
        "allocated",
        Fault("mqsam2.files:_KeepsWriteErrors.write", signal.SIGKILL, call=20),
        -9, None, {".calibrated.pt.tmp"}, {"calibrated.pt"},
    ),
    "SIGKILL between a unit's state and units.jsonl": (
        "calibrated",
        Fault("mqsam2.rundir:RunDir.write_unit_log", signal.SIGKILL, call=2),
        -9, None, {f"units/{UNITS[0]}/qdrop.pt", f"units/{UNITS[0]}/qdrop.json"}, {f"units/{UNITS[1]}"},
    ),
    "SIGINT while capturing a unit": (
        "calibrated",
        Fault("mqsam2.reconstruct.driver:Reconstructor.capture", signal.SIGINT, call=2),
        130, "stopped by SIGINT: the run is unfinished; rerun the same command to resume it",
        {f"units/{UNITS[0]}/qdrop.pt"}, {f"units/{UNITS[1]}"},
    ),
    "SIGTERM in the middle of a unit's fit": (
        "calibrated",
        Fault("mqsam2.reconstruct.module:UnitReconstruction.training_step", signal.SIGTERM, call=6),
        143, "stopped by SIGTERM: the run is unfinished; rerun the same command to resume it",
        {f"units/{UNITS[1]}/qdrop/last.ckpt"}, {f"units/{UNITS[1]}/qdrop.pt"},
    ),
    "SIGKILL in the middle of a unit's fit": (
        "calibrated",
        Fault("mqsam2.reconstruct.module:UnitReconstruction.training_step", signal.SIGKILL, call=7),
        -9, None, {f"units/{UNITS[1]}/qdrop/last.ckpt"}, {f"units/{UNITS[1]}/qdrop.pt"},
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(KILLS))
def test_an_interrupted_run_reruns_to_a_bit_identical_export(tiny, runner, tmp_path, case):
    start, fault, status, line, present, absent = KILLS[case]
    run = RunDir(tmp_path / "tiny")
    run.path.mkdir()
    for name in STARTS[start]:
        shutil.copy(tiny.run.path / name, run.path / name)
    first = ["--allocation.target_avg", "4.5"] if start == "nothing" else []  # a config later corrected
    stopped = runner("fit", *tiny.args(tmp_path, *first), fault=fault)
    assert stopped.status == status, stopped.describe()
    assert (stopped.one_line() if line else stopped.messages) == (line or [])
    files = _files(run.path)
    assert present <= files and not absent & files, files
    assert not run.export.exists()

    rerun = runner("fit", *tiny.args(tmp_path))
    assert rerun.status == 0, rerun.describe()
    assert run.export.read_bytes() == tiny.run.export.read_bytes()
    assert [r["unit"] for r in run.unit_records()] == list(UNITS)
    assert not [name for name in _files(run.path) if name.endswith(".tmp")]


# ---- what a finished run says: evaluation, its table, the closing summary, the rerun -----------------------------

EVALUATED = ["--evaluation.enabled", "true", "--evaluation.overlays", "1"]


def _averages(run: RunDir) -> tuple[float, float]:
    """The plan's weight (parameter-weighted) and activation (element-weighted) averages, from its widths."""
    plan, layers = json.loads(run.plan.read_text()), json.loads(run.importance.read_text())
    params = {name: layers[name]["num_params"] for name in plan["bits"]}
    elements = {name: layers[name]["act_elements"] for name in plan["bits"]}
    weights = sum(plan["bits"][n] * params[n] for n in params) / sum(params.values())
    return weights, sum(plan["act_bits"][n] * elements[n] for n in elements) / sum(elements.values())


def test_an_evaluated_run_says_what_it_does_labels_its_rows_and_reuses_its_evaluation(tiny, runner, tmp_path):
    run = RunDir(
        tmp_path / "tiny"
    )  # the reference run's stages, evaluated now (its settings are runtime ones)
    shutil.copytree(tiny.run.path, run.path, ignore=shutil.ignore_patterns("export"))
    done = runner("fit", *tiny.args(tmp_path, *EVALUATED))
    assert done.status == 0, done.describe()
    assert done.stderr == "", done.describe()  # no progress bar of sam2's, no library warning

    weights, acts = _averages(run)
    mixed = f"mixqsam2 Avg-4 (W{weights:.2f}/A{acts:.2f})"
    passes = [f"evaluate: {model}, memory {memory}, clip 1 of 1" for memory in ("fifo", "sis")
              for model in ("FP", "W4A4 (minmax)", mixed)]  # fmt: skip
    logged = [line.split(" | ", 1)[-1] for line in done.stdout.splitlines()]
    assert [line for line in logged if line.startswith("evaluate:")] == passes
    assert "evaluation: 1 clips and 0 images; the validation loop, then 3 models x memory fifo, sis" in logged

    metrics = json.loads(run.metrics.read_text())
    bits = {row["model"]: (row["weight_avg_bits"], row["act_avg_bits"]) for row in metrics["table"]}
    assert bits == {
        "FP": (None, None),
        "W4A4 (minmax)": (4.0, 4.0),
        mixed: (pytest.approx(weights), pytest.approx(acts)),
    }
    card = card_paths(run.export)[0].read_text()
    assert "seeded random init, not a trained SAM2" in card
    assert "| model | memory | weight_avg_bits | act_avg_bits |" in card and mixed in card
    if f"{acts:.2f}" != "4.00":
        assert f"their activations 4.00 / {acts:.2f} bits" in metrics["note"] and metrics["note"] in card

    closing = logged[logged.index(next(line for line in logged if line.startswith("done in"))) :]
    stages = ["model and data", "importance", "allocation", "quantize", "reconstruct", "evaluate", "export"]
    timed = re.fullmatch(r"done in [\d.]+ s \((.+)\): " + re.escape(str(run.path)), closing[0])
    assert timed, closing[0]
    named = re.findall(r"([a-z ]+) [\d.]+ s(?:, |$)", timed.group(1))  # reused stages take no time
    assert named == [stage for stage in stages if stage in named] and {"evaluate", "export"} <= set(named)
    listed = [line.split() for line in closing[1:]]
    assert [words[-1] for words in listed] == [
        str(p)
        for p in (run.metrics, card_paths(run.export)[0], run.allocation_figure, run.overlays, run.export)
    ]
    assert list(run.overlays.glob("*.png"))

    again = runner("fit", *tiny.args(tmp_path, *EVALUATED))
    assert again.status == 0 and again.stderr == "", again.describe()
    assert f"evaluation: reusing {run.metrics}" in again.stdout
    assert "evaluate:" not in again.stdout and "validation loop" not in again.stdout
    assert json.loads(run.metrics.read_text()) == metrics


# ---- a unit that reconstruction makes worse ---------------------------------------------------------------------


def test_a_unit_made_worse_stops_the_run_or_keeps_round_to_nearest(tiny, runner, tmp_path):
    """Adam at lr 1 throws the rounding variables around: the first unit ends far above its round-to-nearest
    error. The run stops with one line; rerun with on_blowup=keep_rtn it keeps that unit's calibrated weights,
    says so, and the model card lists it."""
    hot = ["--reconstruction.lr_rounding", "1", "--reconstruction.lr_act", "1"]
    run = RunDir(tmp_path / "tiny")
    for name in STARTS["calibrated"][1:]:  # the stages before reconstruction do not read the learning rates
        run.path.mkdir(exist_ok=True)
        shutil.copy(tiny.run.path / name, run.path / name)
    write_text(run.config_file, yaml.safe_dump(config_dict(parse_config(tiny.args(tmp_path, *hot)))))

    stopped = runner("fit", *tiny.args(tmp_path, *hot))
    assert stopped.status == 2, stopped.describe()
    assert re.fullmatch(
        rf"error: unit {re.escape(UNITS[0])} \(qdrop\): reconstruction made its output error [\d.]+x worse "
        r"\([\d.]+ -> [\d.]+\), beyond reconstruction\.max_error_growth=2: rerun with --reconstruction\.on_blowup "
        r"keep_rtn to keep round-to-nearest weights for such units \(finished units are kept\), or start a new "
        r"run with lower reconstruction\.lr_rounding / lr_act",
        stopped.one_line(),
    )
    assert not run.phase_state(UNITS[0], "qdrop").exists() and not run.export.exists()

    kept = runner("fit", *tiny.args(tmp_path, *hot, "--reconstruction.on_blowup", "keep_rtn"))
    assert kept.status == 0, kept.describe()
    assert "keeping its round-to-nearest weights" in kept.stdout + kept.stderr
    record = run.unit_records()[0]
    # the same float32 evaluation of the same weights, possibly reduced in another order: float32 rounding
    assert record["kept_rtn"] and record["error_after"] == pytest.approx(record["error_before"], rel=1e-5)
    assert record["reconstructed_error"] > 2 * record["error_before"]
    card = json.loads(card_paths(run.export)[1].read_text())
    assert UNITS[0] in card["method"]["units_kept_round_to_nearest"]
    calibrated = torch.load(run.calibrated, weights_only=True)
    state = torch.load(run.phase_state(UNITS[0], "qdrop"), weights_only=True)
    assert all(torch.equal(value, calibrated[f"{UNITS[0]}.{key}"]) for key, value in state.items())

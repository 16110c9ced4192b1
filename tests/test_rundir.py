"""The run directory: atomic writes that leave the old file or nothing, resume identity from the config's own
`runtime` metadata, a failed first attempt that may be rerun with a corrected config, and units.jsonl derived
from per-unit records so no finished unit's line can be lost."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from mqsam2.config import FitConfig, ReconstructionConfig, parse_config, resume_identity
from mqsam2.errors import MQSAM2Error
from mqsam2.files import atomic_output, load_torch, save_torch, temporary_path, write_text
from mqsam2.rundir import RunDir


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_text(target, "old")
    with pytest.raises(ValueError), atomic_output(target, "w") as stream:
        stream.write("half of the new")
        raise ValueError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


_FULL_DISK = """
import resource, signal, sys, torch
from mqsam2.files import save_torch
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    save_torch({"w": torch.zeros(1 << 16)}, sys.argv[1])
except OSError as exc:
    print(exc.errno, exc.filename)
"""


def test_torch_save_on_a_full_disk_is_an_os_error_naming_the_target_and_leaves_nothing(tmp_path):
    """torch.save itself reports a failed write as RuntimeError("unexpected pos"); the caller must see the
    OSError (so the CLI can say "no space"), and no truncated file may remain."""
    target = tmp_path / "calibrated.pt"
    done = subprocess.run([sys.executable, "-c", _FULL_DISK, str(target)], capture_output=True, text=True)
    assert done.stdout.split() == [str(errno.EFBIG), str(target)], done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content", [os.urandom(256), b"", b"PK\x03\x04 not really a zip"], ids=["random", "empty", "fake-zip"]
)
def test_a_damaged_torch_file_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "calibrated.pt"
    path.write_bytes(content)
    with pytest.raises(MQSAM2Error) as caught:
        load_torch(path, "run artifact", "delete it")
    message = str(caught.value)
    assert message.startswith(f"cannot read run artifact {path}: damaged or not a PyTorch file")
    assert "\n" not in message and message.endswith("; delete it")


def _config(tmp_path, *args: str) -> FitConfig:
    return parse_config(["--config", "configs/demo.yaml", "--run_root", str(tmp_path), *args])


def test_runtime_fields_are_exactly_the_execution_settings():
    """The resume identity drops what does not change results; a field that does (precision) stays."""
    runtime = {f.name for f in dataclasses.fields(ReconstructionConfig) if f.metadata.get("runtime")}
    assert runtime == {
        "checkpoint_every", "check_finite_every", "accelerator", "devices", "strategy", "cache_device",
        "compile", "cuda_graphs", "max_error_growth", "on_blowup", "cache_gb", "fused_kernels",
        "host_cache_gb",
    }  # fmt: skip
    identity = resume_identity(FitConfig())
    assert "precision" in identity["reconstruction"] and "cuda_graphs" not in identity["reconstruction"]
    assert {"name", "run_root", "evaluation", "logging", "export"}.isdisjoint(identity)


@pytest.mark.parametrize(
    "change,refused",
    [
        (["--reconstruction.cuda_graphs", "false", "--reconstruction.devices", "1"], None),
        (["--evaluation.enabled", "false", "--logging.wandb", "false"], None),
        (["--model.size", "s"], "model.size: 't' -> 's'"),
        (["--reconstruction.precision", "bf16-mixed"], "reconstruction.precision: '32-true' -> 'bf16-mixed'"),
    ],
    ids=["runtime", "runtime-sections", "model", "precision"],
)
def test_a_run_with_results_resumes_only_under_the_same_identity(tmp_path, change, refused):
    run = RunDir.of(_config(tmp_path))
    run.claim(_config(tmp_path))
    write_text(run.importance, "{}")  # a finished stage
    if refused is None:
        run.claim(_config(tmp_path, *change))
    else:
        with pytest.raises(
            MQSAM2Error, match=rf"made with another config \({refused}\) and holds its results"
        ):
            run.claim(_config(tmp_path, *change))


def test_a_first_attempt_that_finished_no_stage_may_be_rerun_with_another_config(tmp_path):
    run = RunDir.of(_config(tmp_path))
    run.claim(_config(tmp_path))
    temporary_path(run.calibrated).write_bytes(b"half a file a killed run left")
    run.claim(_config(tmp_path, "--model.size", "s"))
    assert run.read_config().model.size == "s"
    assert not temporary_path(run.calibrated).exists()


def test_unit_log_is_derived_from_the_records_of_finished_phases(tmp_path):
    """A kill after a unit's state was saved but before units.jsonl was rewritten loses nothing: the log is
    rebuilt from the per-unit records; a record without its state (killed before the save) is not listed."""
    run = RunDir(tmp_path)
    order = [("a", "qdrop"), ("b", "qdrop"), ("c", "qdrop")]
    for unit, _ in order:
        run.write_record(unit, "qdrop", {"unit": unit})
    save_torch({}, run.phase_state("b", "qdrop"))
    save_torch({}, run.phase_state("a", "qdrop"))
    run.write_unit_log(order)
    assert [r["unit"] for r in run.unit_records()] == ["a", "b"]
    run.write_unit_log(order)  # idempotent
    assert [json.loads(line)["unit"] for line in run.unit_log.read_text().splitlines()] == ["a", "b"]


def test_loading_an_unfinished_or_foreign_directory_names_what_is_missing(tmp_path):
    with pytest.raises(MQSAM2Error, match=r"is not a fit run directory: config.yaml is missing"):
        RunDir(tmp_path).load_model()
    run = RunDir.of(_config(tmp_path))
    run.claim(_config(tmp_path))
    with pytest.raises(MQSAM2Error, match=r"has no plan.json yet: finish it with python -m mqsam2.fit"):
        run.load_model()


def test_saved_state_round_trips(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    assert torch.equal(RunDir(tmp_path).load_state(save_torch(state, tmp_path / "s.pt"))["w"], state["w"])

"""Reproducible means replayable (issue 30): every checkpoint and final/ say what produced them,
`python -m train verify` replays a checkpoint and compares, a resume says what changed, and a
profile of chosen steps and ranks is written on demand.

One 2-rank run (6 steps, checkpoints at 3 and 6, a profile of steps 2-3 on rank 1) on a data
directory of two shards serves every test here; verify replays from its step-3 checkpoint.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from helpers import REPO, assert_refused, command, losses, train

from train.checkpoint.layout import MANIFEST
from train.checkpoint.provenance import FILE, code_identity
from train.config.exitcodes import NOT_REPRODUCED
from train.corpus import CORPUS_FILE

RUN = {"MAX_STEPS": 6, "CHECKPOINT_EVERY": 3, "KEEP_CHECKPOINTS": 2, "PROFILE_STEPS": "2-3", "PROFILE_RANKS": "1"}
STEP3 = "checkpoints/step_00000003"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    text = CORPUS_FILE.read_text()
    (d / "part-0.txt").write_text(text[: len(text) // 2])
    (d / "part-1.txt").write_text(text[len(text) // 2:])
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("run")
    p = train(out, DATASET=str(data), **RUN)
    return out, p.stdout


def manifest(path) -> dict:
    return json.loads((path / MANIFEST).read_text())


@pytest.mark.slow
def test_a_checkpoint_and_final_carry_what_produced_them(run, data):
    out, stdout = run
    prov = manifest(out / STEP3)["provenance"]
    assert json.loads((out / "final" / FILE).read_text()) == prov
    assert prov["code"] == code_identity()  # this checkout: its commit, dirty or not, the diff's hash
    assert prov["code"]["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                                    text=True).stdout.strip()
    assert prov["image"] is None  # not run in an image
    assert len(prov["constraints_sha256"]) == 16
    assert {"python", "torch", "cuda", "cudnn", "nccl", "deepspeed", "accelerate", "transformers", "datasets",
            "peft"} <= set(prov["packages"])
    assert prov["packages"]["torch"].startswith("2.")
    assert {"device", "gpu", "driver", "cpu"} <= set(prov["hardware"]) and prov["hardware"]["device"] == "cpu"
    assert prov["nodes"]["world_size"] == 2 and len(prov["nodes"]["hosts"]) == 2
    assert set(prov["data"]["files"]) == {"part-0.txt", "part-1.txt"} and prov["data"]["source"] == str(data)
    assert prov["config"]["data"]["seq_len"] == 32 and prov["strategy"] == "ddp"
    said = [ln for ln in stdout.splitlines() if ln.startswith("[provenance] ")]
    assert [ln.split()[1] for ln in said] == ["code", "packages", "hardware", "nodes", "data"]


@pytest.mark.slow
def test_a_profile_of_chosen_steps_on_chosen_ranks_is_a_chrome_trace(run):
    out, _ = run
    traces = sorted(p.name for p in (out / "profiles").iterdir())
    assert traces == ["trace-steps2-3-rank1.json"]  # rank 1 only, steps 2 to 3
    trace = json.loads((out / "profiles" / traces[0]).read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any(n.startswith("aten::") for n in names), "CPU operator activity is recorded"
    assert any("backward" in n.lower() for n in names)


@pytest.mark.slow
def test_verify_replays_a_checkpoint_bitwise(run):
    out, _ = run
    p = command("verify", str(out / STEP3))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "differs from this host: nothing" in p.stdout
    assert "verify: step_00000003 reproduces: 3 logged loss(es) of steps 4..6 replayed bitwise" in p.stdout
    replayed = [r["loss"] for r in map(json.loads, (out / "verify" / "step_00000003" / "metrics.jsonl")
                                       .read_text().splitlines()) if "loss" in r]
    assert replayed == losses(out)[3:]


@pytest.fixture(scope="module")
def tampered(run, tmp_path_factory):
    """verify of a copy of the run whose step-3 checkpoint says it was written by another commit,
    from a dirty tree, with another torch; replayed with a smaller gradient clip."""
    out = tmp_path_factory.mktemp("tampered") / "run"
    shutil.copytree(run[0], out, ignore=shutil.ignore_patterns("verify", "verify.*"))
    m = manifest(out / STEP3)
    m["provenance"]["code"] = {"commit": "0" * 40, "dirty": True, "diff_sha256": "feedfacefeedface", "source": "git"}
    m["provenance"]["packages"]["torch"] = "2.0.0"
    (out / STEP3 / MANIFEST).write_text(json.dumps(m))
    return command("verify", str(out / STEP3), "optim.grad_clip=0.001")


@pytest.mark.slow
def test_verify_names_a_changed_package_a_dirty_tree_and_a_changed_config(tampered):
    said = [ln for ln in tampered.stdout.splitlines() if ln.startswith("[verify] ")]
    assert any("differs from this host: package torch: 2.0.0 -> 2." in ln for ln in said), said
    assert any("note: the checkpoint was written from a dirty tree" in ln and "feedfacefeedface" in ln for ln in said)
    assert any("differs from this host: config optim.grad_clip: 1.0 -> 0.001" in ln for ln in said), said


@pytest.mark.slow
def test_a_resume_onto_another_commit_says_what_changed_in_its_first_lines(tampered):
    """verify's replay is a real resume through the launcher: its [resume] lines are the worker's."""
    head = code_identity()["commit"][:12]
    resume = [ln.split("[resume]", 1)[1].strip() for ln in tampered.stdout.splitlines() if "replay: [resume]" in ln]
    assert resume[0] == "step_00000003 was written by another recipe; changed since it was saved:"
    assert f"code: commit 000000000000 -> {head}" in resume
    assert any(ln.startswith("package torch: 2.0.0 -> ") for ln in resume)


@pytest.mark.slow
def test_a_replay_that_differs_exits_not_reproduced_at_its_first_differing_step(tampered):
    # Step 4's loss is the checkpoint's weights' (equal); step 5's follows the first clipped update.
    assert tampered.returncode == NOT_REPRODUCED, tampered.stdout[-3000:] + tampered.stderr[-3000:]
    assert "within a relative tolerance of 0.001" in tampered.stderr
    assert "does not reproduce" in tampered.stderr and ": step 5 loss " in tampered.stderr


@pytest.mark.slow
def test_verify_fails_on_a_tampered_data_shard_and_names_it(run, data):
    shard = data / "part-1.txt"
    original = shard.read_bytes()
    try:
        shard.write_bytes(original.replace(b"cat", b"cot", 1))
        p = command("verify", str(run[0] / STEP3))
    finally:
        shard.write_bytes(original)
    assert p.returncode == NOT_REPRODUCED, p.stdout[-3000:] + p.stderr[-3000:]
    assert "[verify] data: part-1.txt changed (sha256 " in p.stdout
    assert "replaying" not in p.stdout  # named at once, before any replay


def test_code_identity_is_the_commit_and_a_hash_of_uncommitted_changes(tmp_path):
    def git(*a):
        subprocess.run(["git", "-C", str(tmp_path), *a], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "loop.py").write_text("x = 1\n")
    (tmp_path / "README.md").write_text("docs\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    clean = code_identity(tmp_path)
    assert clean["dirty"] is False and clean["diff_sha256"] is None and len(clean["commit"]) == 40
    (tmp_path / "README.md").write_text("other docs\n")
    assert code_identity(tmp_path) == clean, "a change outside the code (docs, tests) is no dirty tree"
    (tmp_path / "train" / "loop.py").write_text("x = 2\n")
    edited = code_identity(tmp_path)
    assert edited["dirty"] is True and edited["commit"] == clean["commit"] and edited["diff_sha256"]
    (tmp_path / "train" / "new.py").write_text("y = 1\n")
    with_file = code_identity(tmp_path)
    assert with_file["diff_sha256"] != edited["diff_sha256"], "an untracked code file counts"
    (tmp_path / "train" / "venv").symlink_to(tmp_path)  # a link to a folder is its target, not a file to read
    assert code_identity(tmp_path)["diff_sha256"] != with_file["diff_sha256"]


@pytest.mark.parametrize("setting, fragments", [
    ("PROFILE_STEPS=3-1", ("PROFILE_STEPS='3-1'", "FIRST <= LAST")),
    ("PROFILE_RANKS=2", ("PROFILE_RANKS='2'", "rank 2 does not exist", "0..1")),
])
def test_profile_settings_that_cannot_work_are_refused_before_anything_starts(tmp_path, setting, fragments):
    key, value = setting.split("=")
    assert_refused(train(tmp_path / "run", check=False, MAX_STEPS=2, **{key: value}), *fragments)


def test_verify_of_a_folder_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    assert_refused(command("verify", str(tmp_path)), f"verify: {str(tmp_path)!r} is not a complete checkpoint",
                   "OUTPUT_DIR/checkpoints/step_N")


def test_env_shows_this_hosts_side_of_the_provenance():
    p = command("env")
    said = [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("[provenance] ")]
    assert p.returncode == 0 and said == ["code", "packages", "hardware"], p.stdout
    assert f"code {code_identity()['commit'][:12]}" in p.stdout


def test_a_prepared_corpus_is_identified_by_its_manifest_and_verify_rehashes_its_shards(tmp_path):
    """Start-up reads the manifest's recorded shard hashes (flat in corpus size); verify hashes the
    files again, so a shard changed after prepare is named."""
    from helpers import prepare_cli, write_docs

    from train.checkpoint.provenance import data_changes, data_identity
    from train.config import DataConfig

    write_docs(tmp_path / "docs.txt", 200)
    prepare_cli(tmp_path / "prepared", tmp_path / "docs.txt")
    cfg = DataConfig(dataset=str(tmp_path / "prepared"))
    at_start = data_identity(cfg)
    assert at_start["kind"] == "prepared" and at_start["files"]
    assert data_changes(at_start, data_identity(cfg, deep=True)) == []
    shard = sorted((tmp_path / "prepared").glob("*.tokens*"))[0] if list((tmp_path / "prepared").glob("*.tokens*")) \
        else sorted(p for p in (tmp_path / "prepared").iterdir() if p.name != "manifest.json")[0]
    blob = bytearray(shard.read_bytes())
    blob[0] ^= 1
    shard.write_bytes(bytes(blob))
    assert data_identity(cfg) == at_start  # the manifest did not change
    changed = data_changes(at_start, data_identity(cfg, deep=True))
    assert changed == [f"data: {shard.name} changed (sha256 {at_start['files'][shard.name][:12]} -> "
                       f"{data_identity(cfg, deep=True)['files'][shard.name][:12]})"]

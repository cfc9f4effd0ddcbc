"""OUTPUT_DIR and DATASET on object storage, against a real S3 API server process (moto_server,
tests/helpers/s3.py) with IAM enforced: no mock of the client library.

A checkpoint on a bucket counts only once its manifest is there, and the manifest is written after
every object's size was confirmed; a job killed in the middle of an upload resumes from the
previous complete checkpoint, bitwise; two gangs on one prefix leave one owner; a bucket that
does not exist or denies writes is one line before anything starts; prepared data shards train
from the bucket through a node-local cache; the credentials appear in no output.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from helpers import (REPO, args_for, assert_refused, job_env, kill_tree, prepare_cli, read_metrics, start_s3,
                     train)

from train.config import exitcodes

pytestmark = pytest.mark.slow
HARNESS_TASK = REPO / "configs" / "lm_eval" / "tiny_stories.yaml"  # lm-eval's offline task
RUN = {"STRATEGY": "zero2", "MAX_STEPS": 6, "CHECKPOINT_EVERY": 2, "KEEP_CHECKPOINTS": 2}
OUTPUTS: list[str] = []  # every job's output in this module, searched for the credentials at the end


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = start_s3(tmp_path_factory.mktemp("moto") / "moto.log")
    yield server
    server.stop()


def run(s3, out: str, *, keys: dict | None = None, env: dict | None = None, check: bool = True, tmp=None, **overrides):
    """`python -m train` with this server's endpoint and keys in the environment, as on a cloud node."""
    settings = {"SCRATCH_DIR": str(tmp / "scratch"), **overrides} if tmp else overrides
    p = train(out, env={**s3.env(keys), **(env or {})}, check=check, **settings)
    OUTPUTS.append(p.stdout + p.stderr)
    return p


def tool(s3, *args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "train", *args], cwd=REPO, env=job_env(s3.env()), capture_output=True,
                       text=True, timeout=600)
    OUTPUTS.append(p.stdout + p.stderr)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def bucket_metrics(s3, bucket: str, prefix: str) -> list[dict]:
    rows = [json.loads(ln) for ln in s3.read(bucket, f"{prefix}/metrics.jsonl").decode().splitlines() if ln.strip()]
    return [r for r in rows if "loss" in r]


def checkpoints(s3, bucket: str, prefix: str) -> tuple[list[str], list[str]]:
    """(complete, partial) checkpoint directory names under s3://bucket/prefix/checkpoints."""
    keys = s3.keys(bucket, f"{prefix}/checkpoints/")
    dirs = {k.split("/")[2] for k in keys}
    complete = sorted(d for d in dirs if f"{prefix}/checkpoints/{d}/manifest.json" in keys)
    return complete, sorted(dirs - set(complete))


# -- save, kill mid-upload, resume; the data from the bucket -----------------------------------------
@pytest.fixture(scope="module")
def corpus(s3, tmp_path_factory):
    """A prepared corpus on disk and the same files uploaded to s3://data-bucket/corpus."""
    prepared = tmp_path_factory.mktemp("data") / "prepared"
    prepare_cli(prepared, "builtin:tiny-stories", **{"data.shard_tokens": 40_000})
    s3.bucket("data-bucket")
    for f in sorted(prepared.iterdir()):
        s3.client().put_object(Bucket="data-bucket", Key=f"corpus/{f.name}", Body=f.read_bytes())
    return prepared


@pytest.fixture(scope="module")
def resumed(s3, corpus, tmp_path_factory):
    """A 2-rank ZeRO-2 run on s3://ckpt-bucket/run reading s3://data-bucket/corpus, SIGKILLed (the
    whole job) after two objects of the step-4 checkpoint were uploaded, then resumed; and the same
    run with the corpus and OUTPUT_DIR on a local disk."""
    tmp = tmp_path_factory.mktemp("s3run")
    reference = tmp / "local"
    train(reference, DATASET=str(corpus), **RUN, **{"checkpoint.export": "false"})
    s3.bucket("ckpt-bucket")
    out, data = "s3://ckpt-bucket/run", {"DATASET": "s3://data-bucket/corpus", "DATA_CACHE": str(tmp / "cache")}
    killed = run(s3, out, tmp=tmp, check=False, env={"TRAIN_FAILPOINTS": "kill_in_upload=4:2"}, **data, **RUN)
    after_kill = checkpoints(s3, "ckpt-bucket", "run")
    # Debris of some other cut-short upload: resume must ignore it, the next good save removes it.
    s3.client().put_object(Bucket="ckpt-bucket", Key="run/checkpoints/step_00000099/latest", Body=b"x")
    # A fresh scratch: the resuming node has none of the first one's checkpoint files (its data cache stays).
    again = run(s3, out, tmp=tmp / "node2", RESUME="auto", HARNESS_TASKS=str(HARNESS_TASK),
                **{"checkpoint.harness_limit": 8}, **data, **RUN)
    return {"reference": read_metrics(reference), "killed": killed, "after_kill": after_kill, "resumed": again,
            "cache": tmp / "cache"}


def test_a_kill_mid_upload_leaves_the_previous_checkpoint_and_resume_continues_bitwise(s3, resumed):
    assert resumed["killed"].returncode != 0
    # The step-4 upload had begun (objects under its directory) but never got its manifest.
    assert resumed["after_kill"] == (["step_00000002"], ["step_00000004"])
    assert "resumed from s3://ckpt-bucket/run/checkpoints/step_00000002 at step 2" in resumed["resumed"].stdout
    rows, reference = bucket_metrics(s3, "ckpt-bucket", "run"), resumed["reference"]
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["sample_hash"] for r in rows] == [r["sample_hash"] for r in reference]
    assert [r["loss"] for r in rows] == [r["loss"] for r in reference]  # bitwise: fp32 on CPU
    # Rotation kept the newest two; the partial uploads are gone.
    assert checkpoints(s3, "ckpt-bucket", "run") == (["step_00000004", "step_00000006"], [])
    # Every object the manifest lists is there with its size.
    manifest = json.loads(s3.read("ckpt-bucket", "run/checkpoints/step_00000006/manifest.json"))
    keys = s3.keys("ckpt-bucket", "run/checkpoints/step_00000006/")
    assert manifest["files"] and all(keys[f"run/checkpoints/step_00000006/{rel}"] == size
                                     for rel, size in manifest["files"].items())
    assert "run/final/config.json" in s3.keys("ckpt-bucket", "run/final/")


def test_the_benchmark_hook_scores_the_export_and_its_row_reaches_the_buckets_metrics(s3, resumed):
    """checkpoint.harness_tasks at the end of a run whose OUTPUT_DIR is a bucket: the harness scores
    the export (node 0's scratch holds what was uploaded) and its row joins the bucket's metrics."""
    assert "[launch] benchmark harness on" in resumed["resumed"].stdout
    rows = [json.loads(ln) for ln in s3.read("ckpt-bucket", "run/metrics.jsonl").decode().splitlines() if ln.strip()]
    assert any("harness/tiny_stories/bits_per_byte" in r for r in rows), rows[-3:]


def test_export_and_convert_read_a_checkpoint_from_the_bucket_and_write_there(s3, resumed, tmp_path):
    from safetensors.torch import load

    src = "s3://ckpt-bucket/run/checkpoints/step_00000006"
    tool(s3, "export", src, "s3://ckpt-bucket/exported")
    exported = load(s3.read("ckpt-bucket", "exported/model.safetensors"))
    final = load(s3.read("ckpt-bucket", "run/final/model.safetensors"))  # the run's own export at step 6
    assert exported.keys() == final.keys() and all((exported[k] == final[k]).all() for k in final)
    assert "exported/config.json" in s3.keys("ckpt-bucket", "exported/")
    tool(s3, "convert", src, "s3://ckpt-bucket/converted", "--to", "fsdp")
    manifest = json.loads(s3.read("ckpt-bucket", "converted/manifest.json"))
    keys = s3.keys("ckpt-bucket", "converted/")
    assert manifest["form"] == "portable" and manifest["strategy"] == "fsdp"
    assert all(keys[f"converted/{rel}"] == size for rel, size in manifest["files"].items())
    # ... and a run resumes from it where convert said: RESUME=<its URL>, under the new strategy.
    p = run(s3, "s3://ckpt-bucket/from-converted", tmp=tmp_path, RESUME="s3://ckpt-bucket/converted",
            DATASET="s3://data-bucket/corpus", DATA_CACHE=str(tmp_path / "cache"),
            **{**RUN, "STRATEGY": "fsdp", "MAX_STEPS": 7, "CHECKPOINT_EVERY": 0, "checkpoint.export": "false"})
    assert "resumed from s3://ckpt-bucket/converted at step 6" in p.stdout, p.stdout[-3000:]


# -- the run lock -----------------------------------------------------------------------------------
def test_two_gangs_on_one_prefix_leave_one_owner_and_the_other_exits_superseded(s3, tmp_path):
    s3.bucket("race-bucket")
    out = "s3://race-bucket/run"
    settings = dict(STRATEGY="ddp", MAX_STEPS=100000, CHECKPOINT_EVERY=2, KEEP_CHECKPOINTS=1000,
                    **{"checkpoint.export": "false"})

    def gang(name: str, sleep: float) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        with open(log, "w") as f:
            p = subprocess.Popen([sys.executable, "-m", "train", *args_for(out, SCRATCH_DIR=str(tmp_path / name),
                                                                           **settings)],
                                 cwd=REPO, env=job_env({**s3.env(), "TRAIN_FAILPOINTS": f"step_sleep={sleep}"}),
                                 stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        p.log_path = log
        return p

    def owner() -> str | None:
        try:
            return json.loads(s3.read("race-bucket", "run/generation.json"))["generation"]
        except Exception:  # noqa: BLE001 - not claimed yet
            return None

    def wait(pred, proc, what):
        deadline = time.monotonic() + 420
        while not pred():
            assert proc.poll() is None, f"exited {proc.returncode} before {what}:\n{proc.log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no {what}"
            time.sleep(0.3)

    old = gang("old", 1.0)
    new = None
    try:
        wait(lambda: checkpoints(s3, "race-bucket", "run")[0], old, "a checkpoint of the first gang")
        first = owner()
        new = gang("new", 0.2)
        wait(lambda: owner() not in (None, first), new, "the second gang's claim")
        second = owner()
        old.wait(timeout=300)
        old_log = old.log_path.read_text()
        OUTPUTS.append(old_log)
        assert old.returncode == exitcodes.SUPERSEDED, old_log[-3000:]
        assert "superseded: OUTPUT_DIR s3://race-bucket/run" in old_log and f"generation {second[:8]}" in old_log
        wait(lambda: any(int(c.split("_")[1]) >= 4 for c in checkpoints(s3, "race-bucket", "run")[0]
                         if json.loads(s3.read("race-bucket", f"run/checkpoints/{c}/manifest.json"))["generation"]
                         == second), new, "a checkpoint of the second gang")
        assert new.poll() is None, "the owner keeps training"
        new.send_signal(signal.SIGTERM)
        new.wait(timeout=120)
        OUTPUTS.append(new.log_path.read_text())
    finally:
        for p in (old, new):
            if p is not None:
                kill_tree(p)
    resumed_at = int(new.log_path.read_text().split(" at step ")[1].split()[0]) if " at step " in \
        new.log_path.read_text() else 0
    for name in checkpoints(s3, "race-bucket", "run")[0]:
        manifest = json.loads(s3.read("race-bucket", f"run/checkpoints/{name}/manifest.json"))
        if manifest["step"] > resumed_at + 2:  # (the old gang may finish the save it was in when overtaken)
            assert manifest["generation"] == second, f"{name} was committed by the superseded gang"


def test_two_claims_at_once_both_land_and_the_last_one_owns_the_run(s3, monkeypatch):
    """The claim is a compare-and-swap on generation.json (If-Match / If-None-Match): a claim
    that lost the race against another writes over it, never beside it."""
    from train.checkpoint.lock import claim_run, current_owner
    from train.storage import PreconditionFailed, RemotePath, read_with_tag, write_if

    s3.bucket("claim-bucket")
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    first = claim_run("s3://claim-bucket/run", 2)
    record = RemotePath("s3://claim-bucket/run/generation.json")
    _, seen = read_with_tag(record)
    second = claim_run("s3://claim-bucket/run", 2)  # lands between our read and our write below
    with pytest.raises(PreconditionFailed):
        write_if(record, b'{"generation": "stale"}', seen)
    with pytest.raises(PreconditionFailed):
        write_if(record, b'{"generation": "stale"}', None)  # If-None-Match: it exists
    assert current_owner("s3://claim-bucket/run")["generation"] == second != first


# -- refusals before launch -------------------------------------------------------------------------
def test_a_missing_bucket_or_one_that_denies_writes_is_one_line_before_launch(s3, tmp_path):
    p = run(s3, "s3://no-such-bucket/run", tmp=tmp_path, check=False)
    assert_refused(p, "OUTPUT_DIR='s3://no-such-bucket/run'", "bucket 'no-such-bucket' does not exist")
    s3.bucket("read-only-bucket")
    before = s3.keys("read-only-bucket")
    p = run(s3, "s3://read-only-bucket/run", tmp=tmp_path, keys=s3.reader, check=False)
    assert_refused(p, "OUTPUT_DIR='s3://read-only-bucket/run'", "cannot write objects there", "access denied")
    assert s3.keys("read-only-bucket") == before
    p = run(s3, "gs://some-bucket/run", tmp=tmp_path, check=False)  # gcsfs is not installed here
    assert_refused(p, "gs:// protocol is not available", "pip install gcsfs")


# -- data shards from the bucket --------------------------------------------------------------------
def test_prepared_shards_train_from_the_bucket_through_a_node_local_cache(s3, corpus, resumed, tmp_path):
    """The run above read its corpus from the bucket: fetched once into the node's cache (the same
    bytes as on disk), and its losses and samples matched the run reading the disk (checked above)."""
    assert "fetching DATASET='s3://data-bucket/corpus'" in resumed["killed"].stdout
    assert "fetching" not in resumed["resumed"].stdout  # the node's cache already holds it
    entry, = [d for d in (resumed["cache"] / "remote").iterdir() if d.is_dir()]
    assert {f.name: f.read_bytes() for f in entry.iterdir()} == {f.name: f.read_bytes() for f in corpus.iterdir()}
    # A corpus larger than the cache's bound is refused before launch.
    small = run(s3, str(tmp_path / "out"), DATASET="s3://data-bucket/corpus", DATA_CACHE=str(tmp_path / "c"),
                DATA_REMOTE_CACHE_GB="0.0001", check=False, **RUN)
    assert_refused(small, "DATA_REMOTE_CACHE_GB=0.0001", "s3://data-bucket/corpus")


def test_the_credentials_appear_in_no_output_and_no_object(s3, resumed):
    """Runs last (module order): every job, tool and refusal above, and every text object written."""
    secret, key_id = s3.admin["AWS_SECRET_ACCESS_KEY"], s3.admin["AWS_ACCESS_KEY_ID"]
    assert len(OUTPUTS) >= 3
    for text in OUTPUTS:
        assert secret not in text and key_id not in text
    client = s3.client()
    for bucket in [b["Name"] for b in client.list_buckets()["Buckets"]]:
        for key in s3.keys(bucket):
            if key.endswith((".json", ".jsonl", ".yaml")):
                body = s3.read(bucket, key).decode()
                assert secret not in body and key_id not in body, key

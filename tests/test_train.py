"""The train stage: vocabulary, data, memorisation, bitwise resume after SIGKILL, DDP, checkpoints, CLI."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import NO_DROPOUT, TRAIN_CAPTIONS, child_env, tiny_train_config, train_inputs
from safetensors.torch import load_file

from pcm import checkpoint
from pcm.dataset import EpochBatches, FeatureStore, caption_tokens, load_pairs
from pcm.split_images import load_split_images
from pcm.stages.train import TrainConfig, run_train, verify
from pcm.vocab import Vocab
from storage import checkpoints, jsonl
from storage.layout import RunLayout


# ---------------------------------------------------------------------- vocabulary
def test_vocab_build_encode_decode_and_round_trip(tmp_path):
    v = Vocab.build(["A dog, a DOG!", "the man's hat", "a cat"], min_count=2)
    assert v.words == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "dog"]
    assert (v.pad, v.bos, v.eos, v.unk) == (0, 1, 2, 3)
    assert v.encode("A dog sat") == [4, 5, v.unk] and v.encode("a a a", max_len=2) == [4, 4]
    assert v.decode([v.bos, 4, 5, v.pad, v.eos, 4]) == "a dog"
    assert Vocab.build(["the man's hat"]).words[4:] == ["'s", "hat", "man", "the"]  # the clitic is its own word
    v.save(tmp_path / "vocab.json")
    assert Vocab.load(tmp_path / "vocab.json").words == v.words
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")


def test_caption_tokens_are_bos_shifted_and_cut_to_max_len():
    v = Vocab.build(TRAIN_CAPTIONS)
    inp, out = caption_tokens(["a dog runs", "a " * 30], v, max_len=5)
    a, dog, runs = v.encode("a dog runs")
    assert inp[0].tolist() == [v.bos, a, dog, runs, v.pad, v.pad]
    assert out[0].tolist() == [a, dog, runs, v.eos, v.pad, v.pad]
    assert inp[1].tolist() == [v.bos] + [a] * 5 and out[1].tolist() == [a] * 5 + [v.eos]


# ---------------------------------------------------------------------- data
def test_pairs_skip_failed_rows_and_data_fraction_is_a_seeded_subset(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs", n_train=20)
    full = load_pairs(cap.stage_dir, enc.stage_dir)
    assert len(full) == 20 and "c9999" not in full.caption_ids
    half = load_pairs(cap.stage_dir, enc.stage_dir, data_fraction=0.5, seed=1)
    assert len(half) == 10 and set(half.caption_ids) < set(full.caption_ids)
    assert load_pairs(cap.stage_dir, enc.stage_dir, data_fraction=0.5, seed=1).caption_ids == half.caption_ids
    assert load_pairs(cap.stage_dir, enc.stage_dir, data_fraction=0.5, seed=2).caption_ids != half.caption_ids
    # Features come from the row the scores name, across shards.
    store = FeatureStore(enc.stage_dir, "features")
    store.check_rows(full.shard, full.row, full.caption_ids)
    g, v = store.gather(full.shard[[0, 15]], full.row[[0, 15]])
    assert g.shape == (2, 16) and v.shape == (2, 4, 24) and g.dtype == torch.float16  # the stored dtype: widened on the device
    with pytest.raises(ValueError, match="row 1 should hold 'c0000'"):
        store.check_rows(full.shard[:1], full.row[1:2], full.caption_ids[:1])
    # Validation reads the val split only: the encoded test image and its references are never touched.
    val = load_split_images(cap.stage_dir, enc.stage_dir, "val")
    assert val.image_ids == ["val0000", "val0001", "val0002"] and val.row.tolist() == [0, 1, 2]
    assert val.references[0] == [TRAIN_CAPTIONS[0], TRAIN_CAPTIONS[1]]
    assert load_split_images(cap.stage_dir, enc.stage_dir, "val", max_images=2).image_ids == ["val0000",
                                                                                                    "val0001"]


def test_data_fraction_changes_the_stage_fingerprint(tmp_path):
    from pcm.stages.train import plan

    cap, enc = train_inputs(tmp_path / "runs")
    layout = RunLayout(tmp_path / "runs")
    a, b = plan(tiny_train_config(), cap, enc, layout), plan(tiny_train_config(data_fraction=0.5), cap, enc, layout)
    c = plan(tiny_train_config(device="cuda", num_workers=3), cap, enc, layout)  # runtime fields do not count
    assert a.fingerprint != b.fingerprint and a.fingerprint == c.fingerprint


def test_epoch_batches_cover_each_pair_once_and_split_a_global_batch_over_ranks(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs", n_train=10)
    pairs = load_pairs(cap.stage_dir, enc.stage_dir)
    store = FeatureStore(enc.stage_dir, "features")
    inp, out = caption_tokens(pairs.texts, Vocab.build(pairs.texts), 20)
    one = EpochBatches(pairs, store, inp, out, batch_size=4, seed=3)
    assert len(one) == 2                                   # 10 // 4, the partial batch is dropped
    seen = np.concatenate([one.indices(i) for i in range(len(one))])
    assert len(set(seen.tolist())) == 8
    one.set_epoch(1)
    assert not np.array_equal(np.concatenate([one.indices(i) for i in range(2)]), seen)
    ranks = [EpochBatches(pairs, store, inp, out, batch_size=4, seed=3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(1)
    assert sorted(np.concatenate([r.indices(0) for r in ranks]).tolist()) == sorted(one.indices(0).tolist())
    batch = one[0]
    assert batch["patches"].shape == (4, 4, 24) and batch["inputs"].shape == (4, 21)


# ---------------------------------------------------------------------- training
@pytest.mark.heavy  # a real training: 120 steps
def test_tiny_model_memorises_eight_captions(tmp_path):
    from pcm.decode import greedy_decode

    cap, enc = train_inputs(tmp_path / "runs")
    config = tiny_train_config(model=NO_DROPOUT, batch_size=8, epochs=120, warmup=50, val_every=10_000,
                         checkpoint_every=10_000, log_every=20, deterministic=False)
    result = run_train(config, cap, enc, RunLayout(tmp_path / "runs"))
    assert result.counts == {"steps": 120, "train_pairs": 8, "val_images": 3, "vocab": len(Vocab.build(TRAIN_CAPTIONS))}
    model, vocab, meta = checkpoint.load(checkpoint.find(result.path, "best"))
    assert not model.training and meta["step"] == 120 and meta["clip"]["model"] == "tiny"
    assert meta["concepts"][0] == "dog"
    pairs = load_pairs(cap.stage_dir, enc.stage_dir)
    g, v = FeatureStore(enc.stage_dir, "features").gather(pairs.shard, pairs.row)
    decoded = [vocab.decode(ids) for ids in greedy_decode(model, g, v, bos=vocab.bos, eos=vocab.eos)]
    assert decoded == pairs.texts
    losses = [r["loss"] for r in jsonl.read(Path(result.path) / "metrics.jsonl") if "loss" in r]
    assert losses[-1] < 0.05 * losses[0]
    assert Path(result.extra["pictures"]["loss_curve"]).read_bytes()[:4] == b"\x89PNG"
    # A second run is served from disk; verify notices a missing output.
    assert run_train(config, cap, enc, RunLayout(tmp_path / "runs")).cached
    sd = result.stage_dir
    assert verify(sd) is None
    (sd.path / "metrics.jsonl").unlink()
    assert verify(sd) == "no metrics.jsonl"


def test_validation_by_cider_uses_the_decoder_and_the_coco_metrics(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs")
    result = run_train(tiny_train_config(epochs=2, val_metric="cider"), cap, enc,
                       RunLayout(tmp_path / "runs"))
    vals = [r for r in jsonl.read(Path(result.path) / "metrics.jsonl") if "val" in r]
    assert [r["step"] for r in vals] == [4] and vals[0]["val_metric"] == "cider"
    assert result.extra["best_value"] == vals[0]["val"] and 0.0 <= vals[0]["val"] <= 10.0


def _weights(ckpt: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(ckpt / "model.safetensors")), **load_file(str(ckpt / "optimizer.safetensors"))}


@pytest.mark.heavy
def test_sigkill_at_a_random_step_then_resume_gives_bitwise_equal_weights(tmp_path):
    config = tiny_train_config(epochs=40, checkpoint_every=2, val_every=7, log_every=1)   # 80 steps, dropout + noise on
    cap, enc = train_inputs(tmp_path / "ref")
    ref = run_train(config, cap, enc, RunLayout(tmp_path / "ref"))
    ref_ckpt = Path(ref.extra["latest"])

    root = tmp_path / "killed"
    cap2, enc2 = train_inputs(root)
    kill_at = random.Random().randrange(4, 40)
    code = ("import sys, torch; torch.set_num_threads(1); from pcm.stages.train import TrainConfig, run_train; "
            "from pcm.stages.contract import load_result; from storage.layout import RunLayout; "
            "run_train(TrainConfig.model_validate_json(sys.argv[1]), *map(load_result, sys.argv[2:4]), "
            "RunLayout(sys.argv[4]))")
    proc = subprocess.Popen([sys.executable, "-c", code, config.model_dump_json(), cap2.path, enc2.path, str(root)],
                            env=child_env(), stderr=subprocess.DEVNULL)
    ckdir = checkpoint.checkpoints_dir(root / "train" / ref.fingerprint)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = checkpoints.list_steps(ckdir)
        if steps and steps[-1][0] >= kill_at:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill at step {kill_at}"
    killed_at = checkpoints.list_steps(ckdir)[-1][0]
    assert killed_at < 80, f"killed after the end (kill_at={kill_at})"

    resumed = run_train(config, cap2, enc2, RunLayout(root))
    assert resumed.fingerprint == ref.fingerprint and resumed.counts["steps"] == 80
    a, b = _weights(ref_ckpt), _weights(Path(resumed.extra["latest"]))
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"killed at step {killed_at} (asked {kill_at}): {len(diff)} tensors differ, e.g. {diff[:3]}"
    # metrics.jsonl: every step once, the same losses, and the same best checkpoint.
    ra = [(r["step"], r.get("loss"), r.get("val")) for r in jsonl.read(Path(ref.path) / "metrics.jsonl")]
    rb = [(r["step"], r.get("loss"), r.get("val")) for r in jsonl.read(Path(resumed.path) / "metrics.jsonl")]
    assert ra == rb
    assert resumed.extra["best_step"] == ref.extra["best_step"]


@pytest.mark.heavy
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    config = tiny_train_config(model={**NO_DROPOUT, "noise": False}, epochs=3, log_every=1, val_every=100,
                         checkpoint_every=100)
    cap, enc = train_inputs(tmp_path / "one")
    one = run_train(config, cap, enc, RunLayout(tmp_path / "one"))
    cap2, enc2 = train_inputs(tmp_path / "two")
    env = child_env()
    code = ("import sys; from pcm.stages.train import TrainConfig, run_train; "
            "from pcm.stages.contract import load_result; from storage.layout import RunLayout; "
            "run_train(TrainConfig.model_validate_json(sys.argv[1]), *map(load_result, sys.argv[2:4]), "
            "RunLayout(sys.argv[4]))")
    two_config = config.model_copy(update={"devices": 2})
    subprocess.run([sys.executable, "-c", code, two_config.model_dump_json(), cap2.path, enc2.path,
                    str(tmp_path / "two")],
                   env=env, check=True, timeout=300)
    two_dir = tmp_path / "two" / "train" / one.fingerprint
    la = [r["loss"] for r in jsonl.read(Path(one.path) / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in jsonl.read(two_dir / "metrics.jsonl") if "loss" in r]
    assert len(la) == len(lb) == 6
    assert np.allclose(la, lb, rtol=1e-4, atol=1e-5), (la, lb)
    wa = load_file(str(Path(one.extra["latest"]) / "model.safetensors"))
    wb = load_file(str(checkpoints.latest(checkpoint.checkpoints_dir(two_dir)) / "model.safetensors"))
    # Attention key biases get a zero gradient in exact arithmetic (softmax ignores them), so Adam
    # turns rounding noise into lr-sized steps there; every weight matrix must agree.
    far = [k for k in wa if wa[k].ndim == 2 and not torch.allclose(wa[k], wb[k], atol=1e-4)]
    assert not far, far
    assert (two_dir / "stage.done.json").exists()


def test_checkpoint_loading_refuses_pickled_payloads(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs")
    result = run_train(tiny_train_config(epochs=2), cap, enc, RunLayout(tmp_path / "runs"))
    best = checkpoint.find(result.path, "best")
    model, _, _ = checkpoint.load(best)                        # fine before
    (best / "model.bin").write_bytes(b"\x80\x04K\x01.")          # a pickle
    with pytest.raises(ValueError, match="refusing"):
        checkpoint.load(best)
    latest = checkpoint.find(result.path, "latest")
    (latest / "optimizer.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="refusing"):
        checkpoint.load_weights(latest, model)
    (Path(result.path) / "stage.done.json").unlink()
    with pytest.raises(ValueError, match="refusing"):           # resume refuses it too
        run_train(tiny_train_config(epochs=2), cap, enc, RunLayout(tmp_path / "runs"))


def test_find_explains_a_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no best checkpoint"):
        checkpoint.find(tmp_path, "best")
    with pytest.raises(ValueError, match="which"):
        checkpoint.find(tmp_path, "newest")


def test_config_errors_name_the_parameter(tmp_path):
    from pcm.config import validate

    with pytest.raises(ValueError, match=r"model.*unknown model fields \['topk'\]"):
        validate(TrainConfig, {"model": {"topk": 3}}, "train")
    with pytest.raises(ValueError, match="preset 'nope' not found"):
        validate(TrainConfig, {"preset": "nope"}, "train")
    cap, enc = train_inputs(tmp_path / "runs")
    with pytest.raises(ValueError, match="d_embed=768 but the data has 16"):
        run_train(tiny_train_config(preset="vitl14"), cap, enc, RunLayout(tmp_path / "runs"))


def test_cli_train_runs_with_sets(tmp_path):
    import typer
    from typer.testing import CliRunner

    from pcm.cli.common import stage_values
    from pcm.cli.train import register

    assert stage_values(TrainConfig, ["model.pcm=false", "cxe_w=2.5", "val_metric=loss"]) == {
        "model": {"pcm": False}, "cxe_w": 2.5, "val_metric": "loss"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        stage_values(TrainConfig, ["pcm"])
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    cap, enc = train_inputs(tmp_path / "runs")
    sets = ["batch_size=4", "epochs=1", "warmup=5", "min_word_count=1", "val_metric=loss", "num_workers=0",
            "model.pcm=false", "cxe=false"]
    args = ["train", "--captions", cap.path, "--encode", enc.path, "--root", str(tmp_path / "runs"),
            "--model-preset", "tiny", "--set", "device=cpu", "--set", "progress_bar=false"] + [x for s in sets for x in ("--set", s)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "train done: 2 steps on 8 pairs" in res.output
    cfg = json.loads((Path(res.output.strip().split("-> ")[-1]) / "config.json").read_text())
    assert cfg["model"]["pcm"] is False and cfg["train"]["cxe"] is False


def test_without_val_images_best_is_the_final_model(tmp_path):
    cap, enc = train_inputs(tmp_path / "runs", n_val=0)
    result = run_train(tiny_train_config(epochs=2), cap, enc, RunLayout(tmp_path / "runs"))
    assert result.counts["val_images"] == 0 and result.extra["best_value"] is None
    assert result.extra["val_metric"] == "none" and result.extra["best_step"] == 4
    assert not [r for r in jsonl.read(Path(result.path) / "metrics.jsonl") if "val" in r]
    best, latest = checkpoint.find(result.path, "best"), checkpoint.find(result.path, "latest")
    assert (best / "model.safetensors").read_bytes() == (latest / "model.safetensors").read_bytes()


def test_flow_caches_on_the_fingerprint_and_publishes_artifacts(tmp_path, monkeypatch, prefect_api):
    import flows.train

    cap, enc = train_inputs(tmp_path / "runs")
    root = str(tmp_path / "runs")
    first = flows.train.train_flow(tiny_train_config(epochs=2), cap.path, enc.path, root=root)
    assert not first.cached and Path(first.extra["pictures"]["loss_curve"]).exists()
    # The second flow run hits Prefect's cache (keyed on the fingerprint): the stage is not called.
    monkeypatch.setattr(flows.train, "run_train", lambda *a, **k: pytest.fail("stage ran again"))
    second = flows.train.train_flow(tiny_train_config(epochs=2), cap.path, enc.path, root=root)
    assert second.path == first.path and second.counts == first.counts
    # Both runs are named after the stage directory (`train-<fingerprint[:8]>`), the optional inputs defaulted.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        named = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[f"train-{first.fingerprint[:8]}"])))
    assert len(named) >= 2   # (another test of the session may train the same directory)


def test_resolve_device_gives_each_training_process_its_own_gpu():
    from pcm.device import resolve_device

    # Stages pass the name through; a training process's bare `cuda` names its local rank's GPU.
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda") == "cuda" and resolve_device("cuda:1") == "cuda:1"
    assert resolve_device("cuda", local_rank=0) == "cuda:0" and resolve_device("cuda", local_rank=3) == "cuda:3"
    assert resolve_device("cuda:1", local_rank=3) == "cuda:1" and resolve_device("cpu", local_rank=3) == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto", local_rank=2) == ("cuda:2" if torch.cuda.is_available() else "cpu")


def test_warmup_fraction_fits_the_run_and_a_run_inside_its_warmup_is_warned(tmp_path, caplog):
    from pcm.stages.train_worker import lr_at, warmup_steps

    assert warmup_steps(tiny_train_config(), 8) == 20                       # steps, as given
    assert warmup_steps(tiny_train_config(warmup_fraction=0.25), 8) == 2    # a quarter of this run's 8 steps
    assert warmup_steps(tiny_train_config(warmup_fraction=0.01), 8) == 1    # never 0
    assert "warmup_fraction" not in tiny_train_config().content()           # old fingerprints stay
    cap, enc = train_inputs(tmp_path / "runs", n_val=0)
    with caplog.at_level("WARNING", logger="pcm.stages.train_worker"):
        run_train(tiny_train_config(epochs=2), cap, enc, RunLayout(tmp_path / "runs"))   # 4 steps against 20 of warm-up
    assert "4 steps in all but 20 of warm-up" in caplog.text
    caplog.clear()
    r = run_train(tiny_train_config(epochs=2, warmup_fraction=0.5), cap, enc,
                  RunLayout(tmp_path / "runs"))
    assert "of warm-up" not in caplog.text
    lrs = [rec["lr"] for rec in jsonl.read(Path(r.path) / "metrics.jsonl") if "lr" in rec]
    assert lrs == pytest.approx([lr_at(tiny_train_config(), s, 2) for s in (1, 2, 3, 4)])
    assert lrs[1] > lrs[2]                                            # past the peak at step 2: decaying

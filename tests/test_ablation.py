"""The toy-world ablation's bookkeeping: what it plans, how records resume it, and what the report says."""

from __future__ import annotations

import numpy as np
import pytest

from pcm.toyworld import ablation
from pcm.toyworld.world import ATTRIBUTES
from storage.atomic import write_json
from storage.layout import experiment_record, experiment_records


def fake_record(records, level: str, arm: str, seed: int, shift: float, rng) -> None:
    per_image = {f"img{i:03d}": float(100 + i % 7 + shift + rng.normal(0, 1)) for i in range(40)}
    rec = {"level": level, "arm": arm, "seed": seed, "per_image_cider": per_image, "control_cider": 30.0,
           "attributes": {a: 0.5 for a in ATTRIBUTES}, "cxe": {"cxe_w": 2.0, "weight_mean": 0.8, "weight_zero": 0.05}}
    path = experiment_record(records, level, arm, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, rec)


def test_every_level_runs_the_papers_four_arms_and_its_controls_with_valid_configs():
    for level in ablation.LEVELS:
        arms = ablation.ARMS_OF[level]
        assert arms[:4] == ["base", "+PCM", "+CXE", "PCM+CXE"]
        for arm in arms:
            cfg = ablation.arm_config(level, arm, seed=3)
            assert cfg.train.seed == 3 and cfg.train.cxe_w == "auto"
            assert cfg.train.model_preset().pcm == (arm not in ("base", "+CXE"))
            assert cfg.train.cxe == (arm in ("+CXE", "PCM+CXE", "uniform", "refine", "clip-filter"))
            assert cfg.refine.enabled == (arm in ("refine", "clip-filter"))
    assert ablation.arm_config("wrong30", "drop30", 0).train.data_fraction == 0.7
    assert ablation.arm_config("defective", "uniform", 0).train.cxe_uniform
    # Arms of a level share ingest, synthesize and encode: only train and evaluate differ.
    a, b = ablation.arm_config("defective", "base", 0), ablation.arm_config("defective", "PCM+CXE", 1)
    assert (a.ingest, a.synthesize, a.encode, a.evaluate) == (b.ingest, b.synthesize, b.encode, b.evaluate)
    with pytest.raises(ValueError, match="unknown levels"):
        ablation.planned(["nope"], 1)


def test_the_plan_runs_the_claims_arms_on_every_level_before_the_controls():
    plan = ablation.planned(["wrong30", "faithful"], 2)
    assert len(plan) == len(set(plan)) == 2 * (len(ablation.ARMS_OF["wrong30"]) + len(ablation.ARMS_OF["faithful"]))
    controls = [i for i, (_, arm, _) in enumerate(plan) if arm not in (*ablation.PAPER, "refine")]
    claims = [i for i, (_, arm, _) in enumerate(plan) if arm in (*ablation.PAPER, "refine")]
    assert max(claims) < min(controls)
    assert plan[:5] == [("wrong30", arm, 0) for arm in ("base", "+PCM", "+CXE", "PCM+CXE", "refine")]
    assert ("faithful", "PCM+CXE", 1) in plan[:max(claims) + 1]


def test_records_resume_the_plan_and_the_summary_pairs_arms_with_base(tmp_path):
    rng = np.random.default_rng(0)
    for seed in range(3):
        fake_record(tmp_path, "defective", "base", seed, 0.0, rng)
        fake_record(tmp_path, "defective", "+CXE", seed, 4.0, rng)
    done = ablation.load_records(tmp_path)
    assert set(done) == {("defective", arm, s) for arm in ("base", "+CXE") for s in range(3)}
    todo = [j for j in ablation.planned(["defective"], 3) if j not in done]
    assert ("defective", "base", 0) not in todo and ("defective", "+PCM", 0) in todo
    summary = ablation.summarise(done, n_boot=300)
    cxe = summary["defective"]["arms"]["+CXE"]
    assert cxe["vs"]["mean"] == pytest.approx(4.0, abs=0.5) and cxe["vs"]["excludes_0"]
    assert cxe["seeds"] == 3 and cxe["cxe_weight_mean"] == 0.8
    rows = ablation.table_rows(summary["defective"])
    assert [r["arm"] for r in rows] == ["base", "+CXE"] and rows[0]["difference [95% CI]"] == "-"
    assert rows[1]["compared with"] == "base"
    assert ablation.plot(summary, tmp_path / "ablation.png").stat().st_size > 1000


def test_record_names_are_checked():
    assert experiment_record("r", "wrong30", "+PCM", 2).as_posix() == "r/wrong30/plus-PCM/seed-2.json"
    for bad in (("../x", "base", 0), ("a", "b/c", 0), ("a", "b", -1)):
        with pytest.raises(ValueError, match="invalid experiment record"):
            experiment_record("r", *bad)


def test_experiment_records_lists_what_experiment_record_names(tmp_path):
    named = [experiment_record(tmp_path, "wrong30", "+PCM", 2), experiment_record(tmp_path, "demo", "base", 0)]
    for p in named + [tmp_path / "demo" / "base" / "notes.json", tmp_path / "demo" / "seed-1.json"]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("{}")
    assert experiment_records(tmp_path) == sorted(named)


@pytest.mark.heavy
def test_the_flow_reports_finished_records_as_dashboard_artifacts(tmp_path, prefect_api):
    from prefect.client.orchestration import get_client

    from flows.ablation import ablation_flow

    rng = np.random.default_rng(1)
    for arm in ablation.ARMS_OF["faithful"]:
        fake_record(tmp_path / "records", "faithful", arm, 0, 0.0, rng)
    out = ablation_flow(levels=["faithful"], seeds=1, root=str(tmp_path / "runs"), records=str(tmp_path / "records"),
                        plot=str(tmp_path / "ablation.png"))
    assert set(out["faithful"]) == set(ablation.ARMS_OF["faithful"])
    assert not (tmp_path / "runs").exists()   # every arm had its record: nothing was trained

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts()}

    import asyncio

    assert {"ablation-faithful", "ablation-arms"} <= asyncio.run(keys())


def test_refine_outcomes_tell_repaired_wrong_pairs_from_kept_and_dropped_ones(tmp_path):
    from builders import caption_row, ingest_stage, mark_done, new_stage

    from storage import tables

    texts = {"c0": "a dog", "c1": "a cat", "c2": "same scene", "c3": "same scene", "c4": "a ball"}
    captions = ingest_stage(tmp_path, [caption_row(c, t) for c, t in texts.items()])
    made_from = {"c1": "c2", "c2": "c1", "c4": "c0"}            # c1, c2 and c4 were given other captions' images
    syn = new_stage(tmp_path, "synthesize", "5" * 16)
    tables.write(syn.file("samples.parquet"), [{"caption_id": c, "shard": 0, "seed": 0, "rendered_from": made_from.get(c),
                                                "status": "ok", "error": None} for c in texts], tables.SAMPLES)
    ref = new_stage(tmp_path, "refine", "7" * 16)
    pairs = [("c0", "c0", "kept"), ("c1", "c2", "kept"), ("c2", "c1", "dropped"), ("c3", "c1", "kept"),
             ("c4", "c4", "kept")]
    tables.write(ref.file("pairs.parquet"), [
        {"caption_id": c, "image_caption_id": img, "shard": 0, "row": 0, "score": 0.5, "clip_score": 0.5, "rank": 1,
         "status": status, "reason": None if status == "kept" else "below"} for c, img, status in pairs], tables.PAIRS)
    assert ablation.refine_outcomes(mark_done(syn), mark_done(ref), captions) == {
        "right: own image": 1,              # c0 kept its own image
        "wrong: own image": 1,              # c1 moved to the key holding the image made from its caption: repaired
        "wrong: dropped": 1,                # c2
        "right: equivalent image": 1,       # c3 moved to an image made from a caption that says the same
        "wrong: kept its image": 1}         # c4 still trains on another caption's image

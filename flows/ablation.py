"""Prefect flow of the toy-world ablation (pcm/toyworld/ablation.py): one task per arm and seed still missing,
then per level a table of CIDEr with intervals and the figure of the arms, as dashboard artifacts.

    python -m flows.ablation                           # every level and arm, 5 seeds (hours on 2 cores)
    prefect deployment run toyworld-ablation/default --param seeds=3
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task

from flows import artifacts
from pcm.toyworld import ablation

REPO = Path(__file__).resolve().parents[1]


@task(name="ablation-arm", tags=["gpu"])
def arm_task(level: str, arm: str, seed: int, root: str, records: str) -> dict:
    """Train and evaluate one arm and seed (finished stages reused); its record is written last."""
    rec = ablation.run_arm(level, arm, seed, root, records)
    return {k: rec[k] for k in ("level", "arm", "seed", "cider", "seconds")}


@task(name="ablation-report")
def report_task(records: str, plot: str, root: str) -> dict:
    """Summarise every record; a table per level (and its generator's faithfulness) and the figure as artifacts."""
    from pcm.toyworld.faithfulness import table_rows

    summary = ablation.summarise(ablation.load_records(records))
    for level, lv in summary.items():
        if (faithful := ablation.level_faithfulness(level, root)) is not None:
            artifacts.table(f"ablation-{level}-faithfulness", table_rows(faithful),
                            f"How faithful the {level} level's generator is (toy-CLIP counterfactual tests)")
        artifacts.table(f"ablation-{level}", ablation.table_rows(lv),
                        f"Toy-world ablation, {level} ({lv['preset']}): CIDEr on {lv['images']} drawn test scenes, "
                        "mean, sd, 95% bootstrap interval (seeds x images), paired difference to base")
    if summary:
        artifacts.picture("ablation-arms", ablation.plot(summary, plot), "Toy-world ablation: arms with 95% intervals",
                          root)
    return {level: {a: round(s["mean"], 1) for a, s in lv["arms"].items()} for level, lv in summary.items()}


@flow(name="toyworld-ablation")
def ablation_flow(levels: list[str] | None = None, seeds: int = 5, root: str = "runs/ablation",
                  records: str = str(REPO / "bench" / "results" / "ablation"),
                  plot: str = str(REPO / "docs" / "ablation.png")) -> dict:
    """The ablation of PCM-Net's claims on the toy world's defect levels (docs/toyworld.md): each arm and seed
    without a record under `records` is trained and evaluated under `root`; then the summary artifacts."""
    done = ablation.load_records(records)
    for level, arm, seed in ablation.planned(levels or list(ablation.LEVELS), seeds):
        if (level, arm, seed) not in done:
            arm_task(level, arm, seed, root, records)
    return report_task(records, plot, root)


if __name__ == "__main__":
    ablation_flow()

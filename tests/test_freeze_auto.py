"""--freeze auto: the choice on score tables, the budget, and the whole path on images."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import ANTS_BEES, make_tree

from headstart.errors import UsageError
from headstart.freeze_auto import MIN_MARGIN, Trial, choose, format_table, retrain_seconds, trial_seconds


def _trial(name, trainable, losses, skipped=None):
    loss = None if losses is None else np.asarray(losses, dtype=float)
    acc = None if loss is None else float(np.nanmean(loss < 0.69))
    return Trial(name, "all" if trainable == 0 else 8 - trainable, trainable, loss, acc, 1.0, skipped=skipped)


def test_a_clearly_better_fine_tune_wins():
    rng = np.random.default_rng(0)
    frozen = rng.uniform(0.3, 0.5, 200)
    tuned = frozen - 0.1 + rng.normal(0, 0.01, 200)
    chosen, reason = choose([_trial("frozen", 0, frozen), _trial("top 1", 1, tuned)])
    assert chosen.name == "top 1" and "lowest" in reason


def test_a_gain_within_the_margin_keeps_the_cheaper_candidate():
    frozen = np.full(200, 0.40)
    tuned = frozen - MIN_MARGIN / 2  # better, by less than the smallest margin
    chosen, reason = choose([_trial("frozen", 0, frozen), _trial("top 1", 1, tuned)])
    assert chosen.name == "frozen" and "cheaper" in reason


def test_a_gain_within_the_noise_keeps_the_cheaper_candidate():
    frozen = np.linspace(0.6, 0.9, 50)
    tuned = frozen - 0.03 + np.resize([0.5, -0.5], 50)  # 0.03 lower on average, but one standard error is ~0.07
    chosen, _ = choose([_trial("frozen", 0, frozen), _trial("top 2", 2, tuned)])
    assert chosen.name == "frozen"


def test_among_fine_tunes_the_cheapest_within_the_noise_of_the_best_wins():
    base = np.full(100, 0.5)
    trials = [_trial("frozen", 0, base), _trial("top 1", 1, base - 0.195), _trial("top 2", 2, base - 0.2),
              _trial("top 3", 3, base - 0.1)]
    assert choose(trials)[0].name == "top 1"


def test_skipped_candidates_are_ignored_and_images_compared_pairwise():
    frozen = np.array([0.5, 0.5, np.nan, 0.5])  # the third image could not be used by the frozen head
    tuned = np.array([0.1, 0.1, 9.0, 0.1])
    trials = [_trial("frozen", 0, frozen), _trial("top 1", 1, tuned), _trial("top 2", 2, None, skipped="budget")]
    chosen, _ = choose(trials)
    assert chosen.name == "top 1"
    table = format_table(trials, chosen)
    assert "skipped: budget" in table and "* top 1" in table
    with pytest.raises(ValueError):
        choose([_trial("top 2", 2, None, skipped="budget")])


def test_cost_predictions_grow_with_depth_and_data():
    per_stage = [0.01] * 8 + [0.001]
    costs = [trial_seconds(per_stage, 8 - top, 200, 50, 5, 8) for top in (1, 2, 3)]
    assert costs[0] < costs[1] < costs[2]
    assert trial_seconds(per_stage, 6, 400, 100, 5, 8) > 1.9 * trial_seconds(per_stage, 6, 200, 50, 5, 8)
    assert retrain_seconds(per_stage, 6, 50, 250, 5, 8) > retrain_seconds(per_stage, 6, 50, 250, 5, 4)


def test_budget_is_validated(tree, tmp_path):
    from headstart import train

    with pytest.raises(UsageError, match="budget"):
        train(tree, tmp_path / "run", budget=5, progress=False)  # without --freeze auto
    with pytest.raises(UsageError, match="budget"):
        train(tree, tmp_path / "run", freeze="auto", budget=0, progress=False)


def test_too_few_images_per_class_for_auto_is_a_clear_error(tmp_path):
    from headstart import train

    data = make_tree(tmp_path / "data", per_class=2)
    with pytest.raises(UsageError, match=r"--freeze auto .* class '(red|blue)' has 2"):
        train(data, tmp_path / "run", freeze="auto", progress=False)


def test_a_budget_too_small_for_fine_tuning_keeps_the_frozen_head(tmp_path):
    from headstart import train

    data = make_tree(tmp_path / "data", per_class=10, classes=("red", "blue", "green"))
    run = train(data, tmp_path / "run", freeze="auto", budget=0.01, progress=False)
    auto = run.metrics["freeze_auto"]
    assert auto["chosen"] == "all" and run.info["backbone"]["freeze"] == "all"
    rows = auto["candidates"]
    assert rows[0]["trainable_stages"] == 0 and rows[0]["accuracy"] is not None
    assert [r["trainable_stages"] for r in rows[1:]] == [1, 2, 3]
    assert all(r["skipped"] and "budget" in r["skipped"] for r in rows[1:])
    assert any("raise --budget" in n for n in auto["notes"])
    assert run.metrics["n_train"] == 30  # retrained on every image, not only the fit part
    json.dumps(auto)  # the report is plain JSON


@pytest.mark.skipif(not ANTS_BEES.is_dir(), reason="needs ../shared/data/ants_bees_train")
def test_auto_on_real_photos_tries_fine_tuning_and_retrains_the_winner(tmp_path):
    """Real photos, one epoch per candidate: the whole path (held-out fold, cut caches, choice, retrain)."""
    import shutil

    from headstart import evaluate, train

    data = tmp_path / "photos"
    for cls in ("ants", "bees"):
        files = sorted(p for p in (ANTS_BEES / cls).iterdir() if p.suffix.lower() == ".jpg")[:20]
        (data / cls).mkdir(parents=True)
        for f in files:
            shutil.copy(f, data / cls / f.name)
    run = train(data, tmp_path / "run", freeze="auto", budget=30, finetune={"epochs": 1}, progress=False)
    rows = run.metrics["freeze_auto"]["candidates"]
    assert [r["trainable_stages"] for r in rows] == [0, 1, 2, 3]
    assert all(r["skipped"] is None and 0 <= r["accuracy"] <= 1 and r["log_loss"] > 0 for r in rows)
    chosen = run.metrics["freeze_auto"]["chosen"]
    assert run.info["backbone"]["freeze"] == chosen
    assert run.metrics["n_train"] == 40
    assert evaluate(run.path, data, progress=False)["accuracy"] >= 0.5


def test_calibration_removes_under_confidence_before_the_comparison():
    from headstart.calibration import calibrated_losses, fit_temperature

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    right = rng.random(200) < 0.95
    pred = np.where(right, y, (y + 1) % 3)
    timid = np.full((200, 3), 0.2)  # always right-ish but never confident, as label smoothing makes a net
    timid[np.arange(200), pred] = 0.6
    calibrated = calibrated_losses(timid, y)
    raw = -np.log(timid[np.arange(200), y])
    assert calibrated.mean() < raw.mean() - 0.2
    assert fit_temperature(timid, y) < 0.5  # under-confident: sharpened (the logits divided by T < 1)
    timid[5] = np.nan  # an unusable image stays unusable
    assert np.isnan(calibrated_losses(timid, y)[5])
    # the choice compares the calibrated losses when the trials carry them
    frozen = Trial("frozen", "all", 0, np.full(200, 0.55), 0.9, calibrated=np.full(200, 0.55))
    tuned = Trial("top 1", 7, 1, raw, 0.93, calibrated=calibrated_losses(timid, y))
    assert raw.mean() > 0.55  # uncalibrated, the fine-tuned model would lose
    assert choose([frozen, tuned])[0].name == "top 1"


def test_a_fine_tuned_winner_ships_with_its_temperature(tree, tmp_path, monkeypatch):
    """What auto compared (logits / T) is what the saved run predicts."""
    import headstart

    temperature = 2.0
    from headstart import freeze_auto

    def fake(choice_t):
        def auto_freeze(*args, **kwargs):
            trial = Trial("fine-tune top 1 stage", 7, 1, np.zeros(2), 1.0, best_epoch=1)
            return freeze_auto.AutoChoice(7, 1, choice_t, "light", 1, "test", [trial], 1.0, 0.0)
        return auto_freeze

    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False, "freeze": "auto",
          "finetune": {"batch_size": 4}}
    runs = []
    for t in (None, temperature):
        monkeypatch.setattr(freeze_auto, "auto_freeze", fake(t))
        runs.append(headstart.train(tree, tmp_path / f"run{t}", **kw))
    assert runs[1].metrics["freeze_auto"]["temperature"] == temperature and runs[1].info["backbone"]["freeze"] == 7
    x = np.random.default_rng(0).normal(size=(5, runs[0].head.n_features_in_)).astype(np.float32)
    log_p = np.log(runs[0].head.predict_proba(x))
    z = log_p / temperature
    expected = z - np.log(np.exp(z).sum(1, keepdims=True))
    got = np.log(runs[1].head.predict_proba(x))
    np.testing.assert_allclose(got, expected, atol=2e-3)  # two trainings agree to ~5e-4 (bf16), not exactly
    assert np.abs(got - log_p).max() > 5 * np.abs(got - expected).max()  # and T visibly changed them

"""Head selection by cross-validation on cached features: solver, folds, feature sources, training."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from headstart.errors import UsageError
from headstart.heads import LinearHead, MLPHead
from headstart.selection import (
    Candidate,
    Grid,
    fit_candidate,
    fold_count,
    format_leaderboard,
    make_folds,
    select_head,
    selection_sample,
)
from headstart.sources import Classifier, fold_into_pooled, source_features


def blobs(n: int = 90, d: int = 40, k: int = 3, seed: int = 0, spread: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % k
    centres = rng.normal(size=(k, d))
    return np.abs(centres[y] + rng.normal(size=(n, d)) * spread).astype(np.float32), y


def classifier(d: int = 40, n_out: int = 12, seed: int = 1) -> Classifier:
    rng = np.random.default_rng(seed)
    return Classifier(rng.normal(size=(n_out, d)).astype(np.float32), rng.normal(size=n_out).astype(np.float32))


def _per_fold_oof(c: Candidate, x: np.ndarray, y: np.ndarray, folds, cl: Classifier | None) -> np.ndarray:
    feats = source_features(x[:, None, :] if x.ndim == 2 else x, c.source, cl)
    oof = np.zeros((len(y), int(y.max()) + 1))
    for tr, te in folds:
        oof[te] = c.build(len(tr)).fit_views(feats[tr], y[tr]).predict_proba(feats[te, 0])
    return oof


CASES = [Candidate("linear", "pooled", C=1.0), Candidate("linear", "pooled", C=0.01, standardize=True),
         Candidate("linear", "logits", C=10.0),
         Candidate("linear", "pooled+logits", C=0.3, standardize=True, class_weight="balanced")]


# n=80: more training rows than features in every fold (one rotation serves all folds); n=40: fewer for the
# pooled sources (each fold in the span of its rows). logits at C=10 on 40 images is nearly separable, its
# optimum too flat for two solvers to agree on (log-loss ~9.5), so that case is tried on 80 only.
@pytest.mark.parametrize("candidate, n", [(c, 80) for c in CASES] + [(replace(c, C=min(c.C, 1.0)), 40) for c in CASES])
def test_batched_path_matches_one_head_per_fold(candidate, n):
    """The batched, reduced, warm-started solver gives what LinearHead gives fold by fold."""
    x, y = blobs()
    x = x[:n]
    y = y[:n] if candidate.class_weight is None else np.r_[np.zeros(n * 5 // 8, int), np.ones(n // 4, int),
                                                            np.full(n // 8, 2)]
    cl = classifier()
    sel = select_head(x, y, grid=Grid(head=("linear",), source=(candidate.source,),
                                      standardize=(candidate.standardize,),
                                      class_weight=(candidate.class_weight,)), classifier=cl)
    folds = make_folds(y, None, 5, 0)
    row = next(r for r in sel.leaderboard if r["setting"] == candidate.name)
    oof = _per_fold_oof(candidate, x, y, folds, cl)
    reference = -np.log(oof[np.arange(len(y)), y]).mean()
    assert row["cv_log_loss_raw"] == pytest.approx(reference, abs=2e-3)
    assert row["cv_accuracy"] == pytest.approx((oof.argmax(1) == y).mean(), abs=1.5 / len(y))


def test_a_single_fits_one_pass_objective_equals_the_two_pass_one():
    from headstart import linear_path

    rng = np.random.default_rng(0)
    x = rng.random((2500, 40)).astype(np.float32)  # 3 blocks of ONE_PASS_BLOCK rows, the last one short
    y = rng.integers(0, 3, 2500)
    problem, _ = linear_path.single_problem(x - x.mean(0), y, rng.random(2500) + 0.5, 3, 2500)
    decay = np.full((1, 1, 1), 1e-3)
    scale = 1 / np.sqrt(0.25 * problem.col_sq[:, :, None] + decay)
    theta = rng.normal(size=40 * 3 + 3)
    value, grad = linear_path._one_pass_objective(problem, decay, scale)(theta)
    value2, grad2 = linear_path._objective(problem, decay, scale)(theta)
    assert value == pytest.approx(value2, rel=1e-6)
    np.testing.assert_allclose(grad, grad2, atol=1e-5 * np.abs(grad2).max())


def test_views_train_on_every_view_and_score_the_clean_one():
    x, y = blobs(60, 20, 2)
    rng = np.random.default_rng(3)
    views = np.stack([x] + [x + rng.normal(size=x.shape).astype(np.float32) * 0.3 for _ in range(2)], axis=1)
    c = Candidate("linear", "pooled", C=1.0)
    sel = select_head(views, y, grid=Grid(head=("linear",), C=(1.0,), source=("pooled",), standardize=(False,)))
    oof = _per_fold_oof(c, views, y, make_folds(y, None, 5, 0), None)
    assert sel.leaderboard[0]["cv_log_loss_raw"] == pytest.approx(-np.log(oof[np.arange(len(y)), y]).mean(), abs=2e-3)


def test_leaderboard_is_sorted_by_log_loss_and_best_is_first():
    x, y = blobs()
    sel = select_head(x, y, grid=Grid(head=("linear",), source=("pooled",)))
    losses = [round(r["cv_log_loss"], 4) for r in sel.leaderboard]
    assert losses == sorted(losses)
    assert sel.best.name == sel.leaderboard[0]["setting"]
    assert len(sel.leaderboard) == 14  # 7 Cs x standardize off/on
    assert sel.oof_proba.shape == (len(y), 3)
    assert "rank" in format_leaderboard(sel.leaderboard) and sel.best.name in format_leaderboard(sel.leaderboard)


def test_selection_prefers_strong_decay_on_noise_and_weak_on_clean_data():
    x_noisy, y = blobs(90, 40, 3, spread=8.0)
    x_clean, _ = blobs(90, 40, 3, spread=0.2)
    grid = Grid(head=("linear",), source=("pooled",), standardize=(False,))
    assert select_head(x_noisy, y, grid=grid).best.C <= 0.1
    assert select_head(x_clean, y, grid=grid).best.C >= 1.0


def test_each_setting_is_scored_at_its_temperature_and_the_winner_ships_with_it():
    from headstart.calibration import apply_temperature

    x, y = blobs(120, 40, 3, spread=1.5)
    sel = select_head(x, y, grid=Grid(head=("linear",), source=("pooled",), standardize=(False,)))
    rows = {r["setting"]: r for r in sel.leaderboard}
    assert all(0.25 <= r["temperature"] <= 4 for r in rows.values())
    assert rows["linear C=0.01 pooled"]["temperature"] < 0.8  # strong decay is timid: sharpened
    assert rows["linear C=0.01 pooled"]["cv_log_loss"] < rows["linear C=0.01 pooled"]["cv_log_loss_raw"]
    assert sel.temperature == sel.leaderboard[0]["temperature"] != 1.0
    plain = fit_candidate(sel.best, x, y)
    shipped = fit_candidate(sel.best, x, y, temperature=sel.temperature)
    np.testing.assert_allclose(shipped.predict_proba(x), apply_temperature(plain.predict_proba(x), sel.temperature),
                               atol=1e-5)


def test_identical_files_share_a_fold():
    y = np.array([0, 1] * 20)
    groups = [f"g{i // 4}" for i in range(40)]  # four copies of each file
    for _, te in make_folds(y, groups, 5, seed=0):
        held = {groups[i] for i in te}
        for i in set(range(40)) - set(te):
            assert groups[i] not in held


def test_selection_sample_is_stratified_keeps_copies_together_and_small_classes_whole():
    y = np.r_[np.zeros(3000, int), np.ones(1000, int), np.full(12, 2)]
    groups = [f"g{i // 2}" for i in range(len(y))]  # every file twice
    sample = selection_sample(y, groups, 1000, folds=5, seed=0)
    assert 900 <= len(sample) <= 1100
    counts = np.bincount(y[sample], minlength=3)
    assert abs(counts[0] / counts[1] - 3) < 0.2  # the classes' proportions
    assert counts[2] == 12  # too few for 5 folds in a quarter: kept whole
    picked = {groups[i] for i in sample}
    assert all(groups[i] not in picked for i in set(range(len(y))) - set(sample))  # copies on one side
    assert selection_sample(y, groups, None, folds=5, seed=0) is None
    assert selection_sample(y, groups, len(y), folds=5, seed=0) is None
    assert len(selection_sample(y, None, len(y) - 1, folds=5, seed=0)) == len(y) - 3  # one of each class left out


def test_selection_ranks_on_a_sample_of_many_images_and_says_so():
    x, y = blobs(n=600)
    sel = select_head(x, y, grid=Grid(head=("linear",), C=(0.1, 1.0), standardize=(False,), max_images=200))
    assert sel.sample is not None and len(sel.sample) == len(sel.oof_proba) == 200
    assert any("sample of 200 of 600 images" in note for note in sel.notes)
    assert sel.summary()["images_ranked_on"] == 200
    full = select_head(x, y, grid=Grid(head=("linear",), C=(0.1, 1.0), standardize=(False,), max_images=None))
    assert full.sample is None and len(full.oof_proba) == 600
    with pytest.raises(UsageError, match="max_images"):
        Grid.from_options({"max_images": 5})


def test_fold_count_adapts_to_the_smallest_class():
    assert fold_count(np.array([0] * 10 + [1] * 10), 5) == (5, None)
    folds, note = fold_count(np.array([0] * 10 + [1] * 3), 5)
    assert folds == 3 and "3-fold" in note
    with pytest.raises(UsageError, match="at least 2 distinct images"):
        fold_count(np.array([0] * 10 + [1]), 5)
    y = np.array([0] * 10 + [1] * 4)
    groups = [f"a{i}" for i in range(10)] + ["b0", "b0", "b1", "b1"]  # two files, each twice
    assert fold_count(y, 5, groups)[0] == 2
    with pytest.raises(UsageError, match="folds must be"):
        fold_count(y, 1)


def test_no_fold_trains_without_a_class_when_its_files_are_copies():
    x, y = blobs(24, 10, 3)
    groups = [str(i) for i in range(24)]
    for i in np.flatnonzero(y == 2)[:6]:
        groups[i] = "copy-a"
    for i in np.flatnonzero(y == 2)[6:]:
        groups[i] = "copy-b"  # class 2: two distinct files
    sel = select_head(x, y, grid=Grid(head=("linear",), source=("pooled",), C=(1.0,)), groups=groups)
    assert sel.folds == 2
    for tr, _ in make_folds(y, groups, sel.folds, 0):
        assert set(y[tr]) == {0, 1, 2}


def test_default_grid_without_a_classifier_selects_on_pooled_features():
    x, y = blobs()
    sel = select_head(x, y, grid=Grid(head=("linear",), C=(1.0,)))
    assert {r["setting"].split()[-1] for r in sel.leaderboard} == {"pooled"} and sel.notes


def test_mlp_candidates_are_raced_against_the_best_linear():
    x, y = blobs(120, 30, 2, spread=0.5)
    grid = Grid(source=("pooled",), C=(1.0,), standardize=(False,), mlp_min_images=0)
    alone = select_head(x, y, grid=replace(grid, head=("mlp",), mlp=(2,), mlp_epochs=1))  # nothing to race
    assert alone.leaderboard[0]["folds_done"] == 5 and alone.leaderboard[0]["complete"]
    weak = select_head(x, y, grid=replace(grid, mlp=(2,), mlp_epochs=1))  # barely trained: far behind
    row = next(r for r in weak.leaderboard if r["setting"].startswith("mlp"))
    assert row["folds_done"] == 1 and not row["complete"]
    assert weak.leaderboard[-1] is row and "dropped after 1 fold" in format_leaderboard(weak.leaderboard)


def test_mlp_candidates_skipped_on_small_data_with_a_note():
    x, y = blobs(40, 10, 2)
    sel = select_head(x, y, grid=Grid(source=("pooled",), C=(1.0,)))
    assert all(r["setting"].startswith("linear") for r in sel.leaderboard)
    assert any("mlp" in n for n in sel.notes)


def test_balanced_candidates_only_for_imbalanced_classes():
    grid = Grid(source=("pooled",), mlp=())
    assert {c.class_weight for c in grid.candidates([50, 50])} == {None}
    assert {c.class_weight for c in grid.candidates([80, 20])} == {None, "balanced"}


@pytest.mark.parametrize("options, match", [
    ({"C": [0]}, "C must list numbers > 0"),
    ({"source": ["pixels"]}, "feature source must be one of"),
    ({"mlp": [0]}, "hidden widths"),
    ({"color": [1]}, "unknown grid option"),
    ({"head": ["forest"]}, "head must list"),
])
def test_grid_errors_name_the_option(options, match):
    with pytest.raises(UsageError, match=match):
        Grid.from_options(options)


def test_logits_source_needs_a_classifier():
    x, y = blobs()
    with pytest.raises(UsageError, match="classifier="):
        select_head(x, y, grid=Grid(source=("logits",)))
    with pytest.raises(UsageError, match="no candidate"):
        Grid.from_options({"head": ["mlp"], "mlp": []})


@pytest.mark.parametrize("source", ["logits", "pooled+logits"])
@pytest.mark.parametrize("make", [lambda: LinearHead(weight_decay=0.01, standardize=True),
                                  lambda: LinearHead(weight_decay=0.01),
                                  lambda: MLPHead(hidden=8, epochs=3)])
def test_head_on_a_source_folds_into_a_head_on_pooled_features(source, make):
    x, y = blobs()
    cl = classifier()
    feats = source_features(x, source, cl)
    head = make().fit(feats, y)
    folded = fold_into_pooled(head, source, cl, x.astype(np.float64).mean(0))
    assert folded.n_features_in_ == x.shape[1]
    np.testing.assert_allclose(folded.predict_proba(x), head.predict_proba(feats), atol=2e-5)
    logits = folded.logit_function()(__import__("torch").from_numpy(x)).numpy()
    np.testing.assert_allclose(logits, head.decision_function(feats), atol=2e-3, rtol=1e-4)


def test_fit_candidate_refits_on_every_image_with_decay_for_all_of_them():
    x, y = blobs()
    head = fit_candidate(Candidate("linear", "pooled", C=0.1), x, np.asarray(["a", "b", "c"])[y])
    assert head.weight_decay == pytest.approx(1 / (0.1 * len(x)))
    assert list(head.classes_) == ["a", "b", "c"]


# ------------------------------------------------------------------------------------ train / CLI


def test_default_train_selects_and_refits_on_every_image(tree, tmp_path):
    import headstart

    run = headstart.train(tree, tmp_path / "r", cache_dir=tmp_path / "c", num_workers=0, progress=False)
    n_images = 12
    sel = run.metrics["selection"]
    assert run.metrics["n_train"] == n_images == run.info["data"]["n_train"]
    assert "val" not in run.metrics  # nothing held out by default
    assert sel["chosen"] == sel["leaderboard"][0]["setting"] == run.info["head"]["setting"]
    chosen = run.info["head"]["candidate"]
    if chosen["head"] == "linear":
        assert run.head.weight_decay == pytest.approx(1 / (chosen["C"] * n_images))
    assert run.metrics["cv"]["folds"] == 5 and run.metrics["cv"]["selected_among"] == len(sel["leaderboard"])
    assert {r["setting"].split()[-1] for r in sel["leaderboard"]} >= {"pooled", "logits", "pooled+logits"}


def test_val_folder_is_scored_after_selection_not_used(tmp_path):
    from conftest import make_tree

    import headstart

    root = tmp_path / "d"
    make_tree(root / "train", per_class=6)
    make_tree(root / "val", per_class=2)
    run = headstart.train(root, tmp_path / "r", cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert run.metrics["n_train"] == 12 and run.metrics["val"]["n_images"] == 4
    assert run.metrics["selection"]["leaderboard"]


def test_select_none_trains_the_one_fixed_head(tree, tmp_path):
    import headstart

    run = headstart.train(tree, tmp_path / "r", select="none", head_params={"weight_decay": 0.5},
                          cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert "selection" not in run.metrics and run.head.weight_decay == 0.5
    assert run.info["head"] == {"selected": False, "setting": "linear (fixed)", "candidate": None,
                                "feature_source": "pooled"}


def test_fixed_head_params_with_selection_is_refused(tree, tmp_path):
    import headstart

    with pytest.raises(UsageError, match="--select none"):
        headstart.train(tree, tmp_path / "r", head_params={"weight_decay": 0.5}, progress=False)
    with pytest.raises(UsageError, match="class_weight dict"):
        headstart.train(tree, tmp_path / "r", head_params={"class_weight": {"red": 2.0}}, progress=False)


def test_head_mlp_by_name_is_tried_on_small_data(tree, tmp_path):
    import headstart

    run = headstart.train(tree, tmp_path / "r", head="mlp", grid={"mlp": [4], "mlp_epochs": 2},
                          cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert run.info["head"]["candidate"]["head"] == "mlp"


def test_logits_source_with_random_weights(tree, tmp_path):
    import headstart

    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False, "weights": "random"}
    with pytest.raises(UsageError, match="--weights random"):
        headstart.train(tree, tmp_path / "r", grid={"source": ["logits"]}, **kw)
    run = headstart.train(tree, tmp_path / "r", **kw)  # the default grid drops the logits sources
    assert {r["setting"].split()[-1] for r in run.metrics["selection"]["leaderboard"]} == {"pooled"}


def test_logits_choice_predicts_like_the_selection_saw_it(tree, tmp_path):
    """A head chosen on logits is saved folded into pooled features; evaluate/predict use it as is."""
    import headstart

    run = headstart.train(tree, tmp_path / "r", grid={"source": ["logits"], "C": [1.0]}, cache_dir=tmp_path / "c",
                          num_workers=0, progress=False)
    assert run.info["head"]["feature_source"] == "logits"
    result = headstart.evaluate(tmp_path / "r", tree, cache_dir=tmp_path / "c", num_workers=0, progress=False)
    assert result["accuracy"] == 1.0


def test_cli_train_prints_the_leaderboard_and_json(run_cli, tree, tmp_path):
    code, out, err = run_cli("train", tree, "--out", tmp_path / "r", "--cache-dir", tmp_path / "c", "--workers", "0",
                             "--grid-C", "0.1,1", "--grid-source", "pooled", "--grid-mlp", "none", "--json")
    assert code == 0
    assert "rank" in err and "chosen:" in err
    summary = json.loads(out)
    assert len(summary["selection"]["leaderboard"]) == 4  # 2 Cs x standardize off/on
    code, _, err = run_cli("train", tree, "--out", tmp_path / "r", "--grid-source", "pixels")
    assert code == 2 and "--grid-source" in err


def test_report_shows_the_chosen_setting_and_leaderboard(tree, tmp_path):
    import headstart

    run = headstart.train(tree, tmp_path / "r", grid={"C": [0.1, 1.0], "source": ["pooled"]},
                          cache_dir=tmp_path / "c", num_workers=0, progress=False)
    result = headstart.evaluate(tmp_path / "r", tree, report=tmp_path / "report.html", cache_dir=tmp_path / "c",
                                num_workers=0, progress=False)
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert result["report"] and "Head selection" in html
    assert f"chosen <b>{run.metrics['selection']['chosen']}</b>" in html
    assert all(r["setting"] in html for r in run.metrics["selection"]["leaderboard"])


def test_report_escapes_selection_text(tmp_path):
    from headstart.report import write_report

    row = {"setting": "<script>x</script>", "cv_accuracy": 1.0, "cv_std": 0.0, "cv_log_loss": 0.1}
    write_report(tmp_path / "r.html", evaluation={}, proba=np.array([[0.9, 0.1], [0.2, 0.8]]), y_true=np.array([0, 1]),
                 class_names=["a", "b"], image_paths=["a.png", "b.png"],
                 selection=[{"chosen": "<b>bad</b>", "folds": 5, "n_candidates": 1, "leaderboard": [row]}])
    html = (tmp_path / "r.html").read_text(encoding="utf-8")
    assert "<script>x" not in html and "&lt;script&gt;" in html and "<b>bad</b>" not in html

"""``headstart sweep``: head settings x views x backbones on the same folds, its files and the best run."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from conftest import ANTS_BEES, make_tree

import headstart
from headstart.errors import RunError, UsageError
from headstart.linear_path import HELD_OUT_TOL
from headstart.sweep import plot_rows, rank_rows

BACKBONES = ("test_efficientnet", "test_resnet")  # tiny timm test models: random weights, milliseconds a forward
SMALL_GRID = {"C": [0.1, 1.0], "source": ["pooled"], "mlp": [], "head": ["linear"]}


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """One sweep over 2 backbones x (clean, clean + 2 views) x 2 Cs x standardize off/on, shared by the tests."""
    root = tmp_path_factory.mktemp("sweep")
    data = make_tree(root / "data", per_class=6)
    cache = root / "cache"
    result = headstart.sweep(data, root / "out", backbone=",".join(BACKBONES), weights="random", aug_views=(0, 2),
                             grid=SMALL_GRID, cache_dir=cache, num_workers=0, progress=False)
    return result, root / "out", data, cache


def test_files_are_written(swept):
    result, out, _, _ = swept
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "sweep.png").stat().st_size > 10_000
    assert (out / "best" / "run.json").is_file()
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["leaderboard"] == result["leaderboard"] and saved["best"] == result["best"]
    assert saved["best_run"]["path"] == str(out / "best") and "refit" in saved["timings"]


def test_every_setting_of_every_pair_is_ranked_once(swept):
    result, _, _, _ = swept
    rows = result["leaderboard"]
    assert result["n_settings"] == len(rows) == 2 * 2 * 2 * 2  # backbones x view counts x Cs x standardize
    assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
    pairs = {(r["backbone"], r["aug_views"]) for r in rows}
    assert pairs == {(b, k) for b in BACKBONES for k in (0, 2)}
    assert len({r["setting"] for r in rows}) == len(rows)
    assert all(r["backbone"] in r["setting"] and r["head_setting"] in r["setting"] for r in rows)
    assert result["best"] == rows[0] and rows[0]["pair_winner"]
    winners = [(r["backbone"], r["aug_views"]) for r in rows if r["pair_winner"]]
    assert sorted(winners) == sorted(pairs)  # one winner per pair: what train would choose there
    assert {r["augment"] for r in rows if r["aug_views"]} == {"standard"}  # the default preset for counts > 0
    keys = [(round(r["cv_log_loss"], 4), -r["cv_accuracy"]) for r in rows]
    assert keys == sorted(keys)
    assert result["settings"]["folds"] == 5 and all(len(r["fold_accuracy"]) == 5 for r in rows)


def test_csv_and_json_hold_the_same_leaderboard(swept):
    result, out, _, _ = swept
    with open(out / "sweep.csv", newline="") as f:
        table = list(csv.DictReader(f))
    rows = result["leaderboard"]
    assert len(table) == len(rows)
    for line, row in zip(table, rows):
        assert int(line["rank"]) == row["rank"] and line["setting"] == row["setting"]
        assert line["backbone"] == row["backbone"] and int(line["aug_views"]) == row["aug_views"]
        assert float(line["cv_accuracy"]) == row["cv_accuracy"] and float(line["cv_std"]) == row["cv_std"]
        assert float(line["cv_log_loss"]) == row["cv_log_loss"]
        assert [float(a) for a in line["fold_accuracy"].split(";")] == row["fold_accuracy"]
        assert float(line["C"]) == row["C"] and line["standardize"] == str(row["standardize"])


def test_best_run_is_the_best_setting_refitted_on_every_image(swept):
    result, out, data, cache = swept
    best = result["best"]
    run = headstart.load_run(out / "best")
    assert run.backbone_name == best["backbone"]
    assert run.info["head"]["candidate"] == {k: best[k] for k in run.info["head"]["candidate"]}
    assert run.info["head"]["setting"] == best["head_setting"] and "note" not in result["best_run"]
    assert run.metrics["n_train"] == 12 == result["best_run"]["n_train"] == result["settings"]["n_images"]
    assert run.head.weight_decay == pytest.approx(1 / (best["C"] * 12))  # decay of all 12 images, not of a fold
    assert run.metrics["features"]["views_per_train_image"] == 1 + best["aug_views"]
    assert run.metrics["features"]["n_computed"] == 0  # the sweep cached every view the refit needs
    # the same folds: the refit's cross-validation of the one setting gives the sweep's fold accuracies
    assert run.metrics["cv"]["fold_accuracy"] == best["fold_accuracy"]
    # warm starts differ; each solve stops once the held-out log-loss settles (linear_path.HELD_OUT_TOL)
    assert run.metrics["cv"]["log_loss"] == pytest.approx(best["cv_log_loss"], rel=1e-4, abs=HELD_OUT_TOL)
    evaluation = headstart.evaluate(out / "best", data, cache_dir=cache, num_workers=0, progress=False)
    assert evaluation["n_images"] == 12 and evaluation["accuracy"] >= 0.9
    predictions = headstart.predict(out / "best", [data / "red"], cache_dir=cache, num_workers=0, progress=False)
    assert len(predictions["predictions"]) == 6


def test_a_backbone_is_extracted_once_for_every_view_count(swept, tmp_path):
    _, _, data, cache = swept
    again = headstart.sweep(data, tmp_path / "again", backbone=BACKBONES[0], weights="random", aug_views=(1, 2),
                            grid=SMALL_GRID, cache_dir=cache, num_workers=0, progress=False)
    assert again["timings"]["features"][BACKBONES[0]]["views_computed"] == 0  # views 1-2 are the views 1-2 above
    assert {r["aug_views"] for r in again["leaderboard"]} == {1, 2}
    run = headstart.load_run(tmp_path / "again" / "best")  # refitted with the augmented views it was chosen with
    k = again["best"]["aug_views"]
    assert run.info["augmentation"]["views"] == k and run.info["augmentation"]["seed"] == 0
    assert run.metrics["features"] == {**run.metrics["features"], "views_per_train_image": 1 + k, "n_computed": 0}


def test_rank_rows_orders_by_log_loss_then_accuracy_and_marks_the_pairs_winners():
    def row(name: str, loss: float, accuracy: float, complete: bool = True) -> dict:
        return {"setting": name, "cv_log_loss": loss, "cv_accuracy": accuracy, "complete": complete}

    rows = [row("b", 0.2, 0.90), row("a", 0.1, 0.85), row("tie-accurate", 0.20001, 0.95), row("dropped", 0.05, 1.0,
                                                                                             complete=False)]
    ranked = rank_rows(rows, {0, 1})
    assert [r["setting"] for r in ranked] == ["a", "tie-accurate", "b", "dropped"]  # 4 places, then accuracy
    assert [r["pair_winner"] for r in ranked] == [True, False, True, False]
    assert [r["rank"] for r in ranked] == [1, 2, 3, 4]


def test_the_plot_always_shows_every_pairs_winner():
    rows = [{"rank": r, "backbone": "a" if r <= 30 else "b", "aug_views": 0, "pair_winner": r in (2, 31)}
            for r in range(1, 41)]
    shown, winners = plot_rows(rows, top=5)
    assert [r["rank"] for r in shown] == [1, 2, 3, 4, 31] and winners == {2, 31}
    shown, winners = plot_rows([{**r, "pair_winner": False} for r in rows], top=5)  # no winners: pairs' first rows
    assert [r["rank"] for r in shown] == [1, 2, 3, 4, 31] and winners == {1, 31}


# ------------------------------------------------------------------------------------------------ CLI


def _cli_args(tree, tmp_path, *extra):
    return ("sweep", tree, "--out", tmp_path / "out", "--backbone", BACKBONES[0], "--weights", "random",
            "--grid-C", "1", "--grid-mlp", "none", "--grid-source", "pooled", "--workers", "0",
            "--cache-dir", tmp_path / "c", *extra)


def test_cli_prints_the_leaderboard_and_json(run_cli, tree, tmp_path):
    code, out, err = run_cli(*_cli_args(tree, tmp_path, "--json"))
    assert code == 0, err
    printed = json.loads(out)
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert printed["leaderboard"] == saved["leaderboard"] and len(printed["leaderboard"]) == 2  # std off/on
    assert "sweep: backbone 1/1" in err  # progress on stderr, JSON alone on stdout
    code, out, err = run_cli(*_cli_args(tree, tmp_path, "--quiet", "--aug-views", "0,1"))
    assert code == 0 and err == ""
    assert "rank" in out and "CV accuracy" in out and "standard x1" in out and "best:" in out
    assert f"saved to {tmp_path / 'out' / 'best'}" in out


@pytest.mark.parametrize("extra, flag", [
    (("--aug-views", "-1"), "--aug-views"),
    (("--aug-views", "four"), "--aug-views"),
    (("--backbone", "resnet5O"), "--backbone"),
    (("--augment", "none", "--aug-views", "0,4"), "--augment"),
    (("--augment", "heavy"), "--augment"),
    (("--cv", "1"), "--cv"),
    (("--grid-source", "pixels"), "--grid-source"),
    (("--top", "0"), "--top"),
])
def test_bad_flags_exit_2_naming_the_flag(run_cli, tree, tmp_path, extra, flag):
    code, out, err = run_cli(*_cli_args(tree, tmp_path, *extra))
    assert code == 2, err
    assert flag in err and out == ""
    assert not (tmp_path / "out").exists()  # refused before any work


def test_out_folder_that_is_not_a_sweep_is_protected(tree, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(RunError, match="not a headstart sweep"):
        headstart.sweep(tree, tmp_path / "out", weights="random", progress=False)
    with pytest.raises(UsageError, match="--aug-views"):
        headstart.sweep(tree, tmp_path / "new", aug_views=(0, -2), progress=False)


@pytest.mark.skipif(not ANTS_BEES.is_dir(), reason="needs ../shared/data/ants_bees_train")
def test_sweep_on_real_photos_two_packaged_backbones(tmp_path):
    """40 real photos through tf_efficientnet_lite0 and lite1 (packaged weights, their ImageNet logits too)."""
    data = tmp_path / "photos"
    for label in ("ants", "bees"):
        (data / label).mkdir(parents=True)
        for path in sorted(p for p in (ANTS_BEES / label).iterdir() if p.suffix.lower() == ".jpg")[:20]:
            shutil.copyfile(path, data / label / path.name)  # a temporary copy, never into the repository
    result = headstart.sweep(data, tmp_path / "out", backbone=["tf_efficientnet_lite0", "tf_efficientnet_lite1"],
                             grid={"C": [0.1, 1.0], "standardize": [False], "mlp": [], "head": ["linear"]},
                             cache_dir=tmp_path / "c", num_workers=0, progress=False)
    rows = result["leaderboard"]
    assert len(rows) == 2 * 3 * 2  # backbones x sources x Cs
    assert {r["source"] for r in rows} == {"pooled", "logits", "pooled+logits"}
    assert result["best"]["cv_accuracy"] >= 0.8
    evaluation = headstart.evaluate(tmp_path / "out" / "best", data, cache_dir=tmp_path / "c", num_workers=0,
                                    progress=False)
    assert evaluation["n_images"] == 40 and evaluation["accuracy"] >= 0.9

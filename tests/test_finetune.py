"""Fine-tuning: frozen stages stay frozen, the auto rule, resume, cut-cache keys, saved runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import headstart
from headstart.backbones import create_backbone
from headstart.cache import FeatureCache
from headstart.data import load_images
from headstart.errors import UsageError
from headstart.features import clean_view
from headstart.finetune import FinetuneConfig, finetune, param_groups, parse_freeze
from headstart.finetune_loop import evaluate
from headstart.stages import describe_stages, stage_plan


def _run(backbone, tree, tmp_path, n_frozen, evaluator=evaluate, **cfg):
    data = load_images(tree, val_split=0.25, seed=0)
    cfg = FinetuneConfig(**{"epochs": 2, "batch_size": 4, "checkpoint_every": 1, **cfg})
    with FeatureCache(tmp_path / "cache") as cache:
        return finetune(backbone, data.train, data.val, n_frozen=n_frozen, cfg=cfg, cache=cache,
                        train_views=[clean_view(backbone.data_config)], val_view=clean_view(backbone.data_config),
                        work_dir=tmp_path / "work", num_workers=0, progress=False, seed=0, evaluator=evaluator)


@pytest.fixture
def fresh_backbone():
    return create_backbone("tf_efficientnet_lite0")


@pytest.mark.parametrize("cache_cut", [True, False])
def test_frozen_stages_are_bit_identical_after_training(tree, tmp_path, fresh_backbone, cache_cut):
    n_frozen = 6
    plan = stage_plan(fresh_backbone.model)
    before = {k: v.clone() for k, v in fresh_backbone.model.state_dict().items()}
    frozen_prefixes = ("conv_stem.", "bn1.", *(f"blocks.{i}." for i in range(n_frozen - 1)))
    result = _run(fresh_backbone, tree, tmp_path, n_frozen, cache_cut=cache_cut)
    after = result.model.backbone.state_dict()
    frozen_keys = [k for k in before if k.startswith(frozen_prefixes)]
    assert frozen_keys and any("running_mean" in k for k in frozen_keys)
    for k in frozen_keys:  # weights and BatchNorm running statistics untouched
        assert torch.equal(before[k], after[k]), k
    trained = [k for k in before if k.startswith("blocks.6.") and k.endswith("weight")]
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    for i in range(n_frozen):
        assert all(not p.requires_grad for p in plan.stage_parameters(i))


def test_optimizer_groups_hold_only_unfrozen_parameters_with_discriminative_rates(fresh_backbone):
    from headstart.finetune import FinetuneModel, freeze_stages

    plan = stage_plan(fresh_backbone.model)
    model = FinetuneModel(plan, 5, 2, fresh_backbone.num_features)
    freeze_stages(plan, 5)
    groups = param_groups(model, FinetuneConfig(lr=1e-3, lr_decay=0.5))
    in_groups = {id(p) for g in groups for p in g["params"]}
    for i in range(5):
        assert not any(id(p) in in_groups for p in plan.stage_parameters(i))
    names = [g["name"] for g in groups]
    assert names == ["head", "tail", "blocks.6", "blocks.5", "blocks.4"]
    lrs = [g["lr"] for g in groups]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] == 1e-3 and lrs[1] == 5e-4


def test_parse_freeze():
    assert parse_freeze("3") == 3 and parse_freeze("auto") == "auto"
    with pytest.raises(UsageError, match="--freeze"):
        parse_freeze("most")


def test_resume_after_kill_matches_an_uninterrupted_run(tree, tmp_path, monkeypatch):
    reference = _run(create_backbone("tf_efficientnet_lite0"), tree, tmp_path / "a", 6, deterministic=True)
    calls = {"n": 0}
    real_step = torch.optim.AdamW.step

    def dies(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # killed in the middle of the second epoch
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", dies)
    with pytest.raises(KeyboardInterrupt):
        _run(create_backbone("tf_efficientnet_lite0"), tree, tmp_path / "b", 6, deterministic=True)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    data = load_images(tree, val_split=0.25, seed=0)
    bb = create_backbone("tf_efficientnet_lite0")
    with FeatureCache(tmp_path / "b" / "cache") as cache:
        resumed = finetune(bb, data.train, data.val, n_frozen=6,
                           cfg=FinetuneConfig(epochs=2, batch_size=4, checkpoint_every=1, deterministic=True),
                           cache=cache, train_views=[clean_view(bb.data_config)], val_view=clean_view(bb.data_config),
                           work_dir=tmp_path / "b" / "work", resume=True, num_workers=0, progress=False, seed=0)
    for (k, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_cut_cache_keys_change_with_depth_and_weights(tree, tmp_path, fresh_backbone):
    _run(fresh_backbone, tree, tmp_path, 6, epochs=1)
    _run(create_backbone("tf_efficientnet_lite0"), tree, tmp_path, 5, epochs=1)
    _run(create_backbone("tf_efficientnet_lite0", weights="random"), tree, tmp_path, 6, epochs=1)
    with FeatureCache(tmp_path / "cache") as cache:
        cuts = [json.loads(d)["cut"] + "|" + json.loads(d)["weights_digest"][:8]
                for (d,) in cache._db.execute("SELECT description FROM models")]
    assert len(set(cuts)) == 3  # stage6/lite0, stage5/lite0, stage6/random weights


def test_train_everything_from_images(tree, tmp_path, fresh_backbone):
    result = _run(fresh_backbone, tree, tmp_path, 0, epochs=1)
    assert result.n_frozen == 0 and len(result.history) == 1
    assert all(p.requires_grad for p in stage_plan(fresh_backbone.model).stage_parameters(0))


def test_finetuned_run_is_evaluated_like_a_head_only_run(tree, tmp_path):
    kw = {"cache_dir": tmp_path / "c", "num_workers": 0, "progress": False, "val_split": 0.25}
    run = headstart.train(tree, tmp_path / "run", freeze="7", finetune={"epochs": 2, "batch_size": 4},
                          augment="light", aug_views=1, **kw)
    assert run.info["backbone"]["freeze"] == 7 and (tmp_path / "run" / "backbone.safetensors").is_file()
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2
    assert {"backbone.safetensors", "metrics.jsonl", "head.safetensors"} <= set(run.info["artifacts"])
    result = headstart.evaluate(tmp_path / "run", tree, cache_dir=tmp_path / "c", progress=False)
    assert result["n_images"] == 12
    preds = headstart.predict(tmp_path / "run", [tree / "red"], cache_dir=tmp_path / "c2", progress=False)
    assert len(preds["predictions"]) == 6
    assert not (tmp_path / ".run.finetune").exists()  # checkpoints cleaned up after success


def test_finetune_settings_are_validated_early(tree, tmp_path):
    with pytest.raises(UsageError, match="lr_decay"):
        headstart.train(tree, tmp_path / "r", freeze="3", finetune={"lr_decay": 2.0}, progress=False)
    with pytest.raises(UsageError, match="unknown fine-tuning option"):
        headstart.train(tree, tmp_path / "r", freeze="3", finetune={"epoch": 2}, progress=False)
    with pytest.raises(UsageError, match="--cv"):
        headstart.train(tree, tmp_path / "r", freeze="3", cv=3, progress=False)


def test_too_deep_freeze_is_refused(tree, tmp_path, fresh_backbone):
    with pytest.raises(UsageError, match="has 8 stages"):
        _run(fresh_backbone, tree, tmp_path, 9)


def test_describe_stages_counts_every_parameter(fresh_backbone):
    rows = describe_stages(fresh_backbone.model, (3, 224, 224))
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in fresh_backbone.model.parameters())
    assert rows[-1]["output_shape"] == [1280] and np.prod(rows[4]["output_shape"]) == 80 * 14 * 14


@pytest.mark.parametrize("name", ["mobilenetv3_small_100", "convnext_atto", "resnet18"])
def test_every_trainable_parameter_is_optimised(name):
    from headstart.finetune import FinetuneModel, freeze_stages

    bb = create_backbone(name, weights="random")
    plan = stage_plan(bb.model)
    model = FinetuneModel(plan, 2, 3, bb.num_features)
    freeze_stages(plan, 2)
    in_groups = {id(p) for g in param_groups(model, FinetuneConfig()) for p in g["params"]}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in in_groups]
    assert trainable == []


def test_freeze_none_works_for_models_without_a_stage_map(tree, tmp_path):
    bb = create_backbone("vit_tiny_patch16_224", weights="random")
    result = _run(bb, tree, tmp_path, 0, epochs=1)
    assert len(result.history) == 1
    with pytest.raises(UsageError, match="not mapped"):
        _run(bb, tree, tmp_path / "b", 2, epochs=1)


def test_bad_images_are_skipped_and_reported_when_training_everything(tree, tmp_path, fresh_backbone):
    (tree / "red" / "broken.png").write_text("not an image")
    result = _run(fresh_backbone, tree, tmp_path, 0, epochs=1)
    assert [b.path.rsplit("/", 1)[-1] for b in result.bad_files] == ["broken.png"]


def test_resume_when_interrupted_during_end_of_epoch_validation(tree, tmp_path):
    calls = {"n": 0}

    def dies_once(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    with pytest.raises(KeyboardInterrupt):
        _run(create_backbone("tf_efficientnet_lite0"), tree, tmp_path, 6, evaluator=dies_once, checkpoint_every=2)
    assert calls["n"] == 1  # killed in the first epoch's validation, after its last step
    data = load_images(tree, val_split=0.25, seed=0)
    bb = create_backbone("tf_efficientnet_lite0")
    with FeatureCache(tmp_path / "cache") as cache:
        resumed = finetune(bb, data.train, data.val, n_frozen=6,
                           cfg=FinetuneConfig(epochs=2, batch_size=4, checkpoint_every=2), cache=cache,
                           train_views=[clean_view(bb.data_config)], val_view=clean_view(bb.data_config),
                           work_dir=tmp_path / "work", resume=True, num_workers=0, progress=False, seed=0)
    assert [r["epoch"] for r in resumed.history] == [1, 2]


def test_probe_rule():
    from headstart.probe import choose_from_probe

    rows = [{"stage": f"s{i}", "val_accuracy": a} for i, a in enumerate([0.6, 0.9, 0.8, 0.85])]
    assert choose_from_probe(rows)[0] == 2  # stage s1 is best: freeze stages 1..2, fine-tune the rest
    assert choose_from_probe(rows, tolerance=0.05)[0] == "all"
    rows[-1]["val_accuracy"] = 0.95
    assert choose_from_probe(rows)[0] == "all"


def test_probe_runs_in_one_cached_pass(tree, tmp_path, fresh_backbone):
    from headstart.probe import probe

    data = load_images(tree, val_split=0.25, seed=0)
    with FeatureCache(tmp_path / "c") as cache:
        choice, reason, rows = probe(fresh_backbone, data.train, data.val, cache, num_workers=0, progress=False)
        assert len(rows) == len(stage_plan(fresh_backbone.model)) + 1 and rows[-1]["features"] == 1280
        assert all(0 <= r["val_accuracy"] <= 1 for r in rows) and reason
        assert choice == "all" or 1 <= choice <= 8
        before = cache.stats()["rows"]
        probe(fresh_backbone, data.train, data.val, cache, num_workers=0, progress=False)
        assert cache.stats()["rows"] == before  # the second probe reads everything from the cache

"""The fine-tuning branch of ``headstart train`` (``--freeze`` other than ``all``).

The top stages of the backbone and a new linear head are trained by :func:`headstart.finetune.finetune`;
the run keeps the tuned backbone (``backbone.safetensors``) and the per-epoch history (``metrics.jsonl``).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from safetensors.torch import save as safetensors_bytes

from . import distributed
from .backbones import Backbone, state_dict_digest
from .cache import FeatureCache
from .ensemble import align_classes
from .features import AugmentedTransform, View, clean_view, extract_features
from .finetune import FinetuneConfig, FinetuneResult, cleanup, finetune
from .heads import LinearHead
from .metrics import classification_metrics
from .runs import Run, write_run
from .stages import stage_plan
from .train_common import HeldOut, TrainData, cached_views, log, report_bad_files, run_info, training_pipeline

if TYPE_CHECKING:
    from .training import TrainConfig


def train_finetuned(config: TrainConfig, data: TrainData, bb: Backbone, cache: FeatureCache, n_frozen: int,
                    out: Path, progress: bool, start: float,
                    auto: dict[str, Any] | None = None) -> tuple[Run | None, HeldOut | None]:
    """Fine-tune all but the first ``n_frozen`` stages of ``bb`` with a new head and save the run to ``out``.

    Under torchrun the ranks train one model with DistributedDataParallel (:mod:`headstart.finetune_loop`).

    Returns:
        The saved run and its validation probabilities (None without a validation set); ``(None, None)``
        on ranks other than 0 under torchrun.
    """
    ft_cfg = FinetuneConfig(**config.finetune)
    plan_names = stage_plan(bb.model, whole_ok=n_frozen == 0).names
    log(progress, f"fine-tuning {bb.name}: {n_frozen} of {len(plan_names)} stages frozen "
                  f"({', '.join(plan_names[:n_frozen]) or 'none'}); training the rest and a new head")
    pipeline, train_views, augment_transform = _augmentation(config, bb, data, cache, n_frozen, ft_cfg, progress)
    work_dir = out.parent / f".{out.name}.finetune"
    result = finetune(bb, data.train, data.val, n_frozen=n_frozen, cfg=ft_cfg, cache=cache, train_views=train_views,
                      val_view=train_views[0], augment_transform=augment_transform, work_dir=work_dir,
                      resume=config.resume, seed=config.seed, precision=config.precision,
                      num_workers=config.num_workers, progress=progress, log=lambda m: log(progress, m))
    if not distributed.is_main():  # under torchrun: rank 0 validates and writes the run
        return None, None
    tuned, head = _tuned_model(result, bb, data, auto)
    train_paths = {str(p) for p in data.train.paths}
    metrics: dict[str, Any] = {"n_train": len(data.train) - sum(1 for b in result.bad_files if b.path in train_paths),
                               "best_epoch": result.best_epoch, "history": result.history,
                               "seconds_per_epoch": round(result.seconds_per_epoch, 3),
                               "cut_cache_seconds": round(result.cut_seconds, 3),
                               "features": {"n_computed": 0, "n_cached": 0, "seconds": 0.0}}
    if auto is not None:
        metrics["freeze_auto"] = auto
    held_out = _validate(config, data, tuned, head, cache, metrics, progress)
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    backbone = {"name": bb.name, "weights": "run:backbone.safetensors", "weights_source": "fine-tuned",
                "base_weights": config.weights, "base_weights_digest": bb.weights_digest,
                "weights_digest": tuned.weights_digest, "num_features": bb.num_features, "freeze": n_frozen,
                "frozen_stages": plan_names[:n_frozen]}
    bad_files = data.loaded.bad_files + result.bad_files
    info = run_info(config, data, bb, metrics, len(bad_files), backbone=backbone,
                    precision=_resolve_precision(config.precision), engine=tuned.engine, pipeline=pipeline,
                    finetune=asdict(ft_cfg))
    bad = report_bad_files(progress, bad_files)
    state = {k: v.detach().cpu().contiguous() for k, v in tuned.model.state_dict().items()}
    path = write_run(out, info, head, metrics, bad, extra={
        "backbone.safetensors": safetensors_bytes(state, metadata={"headstart": "backbone"}),
        "metrics.jsonl": "".join(json.dumps(row) + "\n" for row in result.history).encode("utf-8")})
    cleanup(work_dir)
    log(progress, f"saved run to {path}")
    return Run.load(path), held_out


def _augmentation(config: TrainConfig, bb: Backbone, data: TrainData, cache: FeatureCache, n_frozen: int,
                  ft_cfg: FinetuneConfig, progress: bool) -> tuple[Any | None, list[View], AugmentedTransform | None]:
    """The pipeline, the views cached at the cut (clean first), and the per-epoch augmentation in workers."""
    pipeline = training_pipeline(config, bb, data.train, cache, progress)
    if pipeline is None:
        return None, [clean_view(bb.data_config)], None
    if n_frozen >= 1 and ft_cfg.cache_cut:
        log(progress, f"augmentation '{config.augment}': {config.aug_views} cached views per image at the cut")
        return pipeline, cached_views(config, bb, pipeline), None
    log(progress, f"augmentation '{config.augment}': a fresh view per image per epoch, in workers")
    return pipeline, [clean_view(bb.data_config)], AugmentedTransform(pipeline, bb.data_config, config.seed, 0)


def _tuned_model(result: FinetuneResult, bb: Backbone, data: TrainData,
                 auto: dict[str, Any] | None) -> tuple[Backbone, LinearHead]:
    """The fine-tuned backbone (weights inside the run) and its head, at ``--freeze auto``'s temperature."""
    from .calibration import scale_head

    model = result.model
    head = LinearHead.from_layer(model.head, data.train.class_names)
    if auto is not None and auto.get("temperature"):  # --freeze auto compared the model at this temperature
        scale_head(head, auto["temperature"])
    tuned = Backbone(bb.name, model.backbone.eval(), bb.data_config, bb.num_features, "run:backbone.safetensors",
                     state_dict_digest(model.backbone))
    tuned.engine = "torch"  # a tuned network is scored as it was trained, without a conversion per run
    return tuned, head


def _validate(config: TrainConfig, data: TrainData, tuned: Backbone, head: LinearHead, cache: FeatureCache,
              metrics: dict[str, Any], progress: bool) -> HeldOut | None:
    """Validation metrics of the tuned model into ``metrics``; its probabilities on the validation images."""
    if data.val is None:
        return None
    val_result = extract_features(tuned, data.val.paths, cache=cache, precision=config.precision,
                                  batch_size=config.batch_size, num_workers=config.num_workers,
                                  progress=progress, desc="val features")
    names = data.train.class_names
    proba = np.zeros((len(data.val), len(names)))
    if val_result.ok.any():
        x_val, y_val = val_result.features[val_result.ok], data.val.labels[val_result.ok]
        proba[val_result.ok] = align_classes(head.predict_proba(x_val), head.classes_, names)
        metrics["val"] = classification_metrics(y_val, proba[val_result.ok], names)
        log(progress, f"validation accuracy {metrics['val']['accuracy']:.4f} on {len(y_val)} images "
                      f"(best epoch {metrics['best_epoch']})")
    return HeldOut(proba, val_result.ok, data.val.labels)


def _resolve_precision(precision: str) -> str:
    import torch

    from .preprocess import resolve_precision

    return resolve_precision(precision, torch.device("cuda" if torch.cuda.is_available() else "cpu"))

"""The subcommands' handlers: each turns parsed arguments into one library call and prints the result.

The library (torch, timm, scikit-learn) is imported inside the handlers, so building the parser,
``--help`` and ``--version`` stay quick. Handlers return an exit code; errors propagate to
:func:`headstart.cli.main`, which maps them to exit codes 1 and 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .._constants import DEFAULT_BATCH_SIZE, FEATURE_SOURCES

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _head_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.weight_decay is not None:
        params["weight_decay"] = args.weight_decay
    if args.class_weight == "balanced":
        params["class_weight"] = "balanced"
    if args.head == "mlp":
        params["seed"] = args.seed
        if args.hidden is not None:
            params["hidden"] = args.hidden
        if args.epochs is not None and args.freeze == "all":
            params["epochs"] = args.epochs
    return params


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def parse_aug_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["affine.degrees=20"]`` -> ``{"affine": {"degrees": 20}}``; VALUE is parsed as JSON when it can be."""
    from ..errors import UsageError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, eq, raw = item.partition("=")
        step, dot, param = name.partition(".")
        if not eq or not dot or not step or not param:
            raise UsageError(f"--aug-param '{item}' must look like STEP.PARAM=VALUE, e.g. affine.degrees=20")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw  # a bare word, e.g. fill=reflect
        out.setdefault(step, {})[param] = value
    return out


def _split_list(value: str, flag: str, convert: Any, allowed: Sequence[str] | None = None) -> list[Any]:
    from ..errors import UsageError

    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        out = [convert(v) for v in items]
    except (ValueError, KeyError):
        out = []
    if not out or (allowed is not None and not set(items) <= set(allowed)):
        hint = f"any of {', '.join(allowed)}" if allowed else "values"
        raise UsageError(f"{flag} must list {hint} separated by commas; got '{value}'")
    return out


def parse_grid(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--grid-*`` flags as :class:`~headstart.selection.Grid` options."""
    grid: dict[str, Any] = {}
    if args.grid_C is not None:
        grid["C"] = _split_list(args.grid_C, "--grid-C", float)
    if args.grid_source is not None:
        grid["source"] = _split_list(args.grid_source, "--grid-source", str, FEATURE_SOURCES)
    if args.grid_mlp is not None:
        grid["mlp"] = [] if args.grid_mlp.strip() == "none" else _split_list(args.grid_mlp, "--grid-mlp", int)
        if not grid["mlp"]:
            grid["head"] = ["linear"]
    if args.grid_standardize is not None:
        grid["standardize"] = _split_list(args.grid_standardize, "--grid-standardize", {"off": False, "on": True}.get,
                                          ["off", "on"])
    if args.grid_max_images is not None:
        from ..errors import UsageError

        value = args.grid_max_images.strip()
        if value != "all" and not value.isdigit():
            raise UsageError(f"--grid-max-images must be a whole number of images or 'all'; got '{value}'")
        grid["max_images"] = None if value == "all" else int(value)
    return grid


def _finetune_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("lr", "lr_decay", "optimizer", "label_smoothing", "patience", "gradual"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.batch_size != DEFAULT_BATCH_SIZE:
        params["batch_size"] = args.batch_size
    if args.no_cut_cache:
        params["cache_cut"] = False
    if args.deterministic:
        params["deterministic"] = True
    return params


FINETUNE_FLAGS = ("lr", "lr_decay", "optimizer", "label_smoothing", "patience", "gradual", "no_cut_cache",
                  "deterministic", "resume")


def check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags that would be ignored with the other settings given (before any work)."""
    from ..errors import UsageError

    fixed_mlp = args.select == "none" and args.head == "mlp"
    if args.freeze == "all":
        given = [f"--{name.replace('_', '-')}" for name in FINETUNE_FLAGS
                 if getattr(args, name) is not None and getattr(args, name) is not False]
        if given:
            raise UsageError(f"{', '.join(given)} set(s) fine-tuning, but --freeze is 'all' (a head on frozen "
                             "features); add --freeze none, N, auto or probe, or drop them")
        if args.epochs is not None and not fixed_mlp and args.head != "mlp":
            raise UsageError("--epochs sets the epochs of fine-tuning (--freeze none, N, auto or probe) or of a fixed "
                             "mlp head (--select none --head mlp); neither is asked for, so drop it")
    if args.hidden is not None and args.head != "mlp":
        raise UsageError("--hidden is the width of the mlp head; add --select none --head mlp, or choose widths "
                         "by cross-validation with --grid-mlp")


def cmd_train(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..api import TrainConfig, train

    check_train_flags(args)
    config = TrainConfig(backbone=args.backbone, weights=args.weights, select=args.select, head=args.head,
                         head_params=_head_params(args), grid=parse_grid(args),
                         val_split=args.val_split, cv=args.cv, seed=args.seed, precision=args.precision,
                         engine=args.engine,
                         batch_size=args.batch_size, num_workers=args.workers, cache_dir=args.cache_dir,
                         augment=args.augment, aug_views=args.aug_views, aug_params=parse_aug_params(args.aug_param),
                         freeze=args.freeze, budget=args.budget, resume=args.resume, ensemble=args.ensemble,
                         finetune=_finetune_params(args) if args.freeze != "all" else {})
    with distributed.session():  # under torchrun: rank 0 alone prints and writes the run
        run = train(args.data, args.out, config, progress=not args.quiet)
        if not distributed.is_main() or run is None:
            return EXIT_OK
    summary = {"run": str(run.path), "class_names": run.class_names, **run.metrics}
    leaks = run.info.get("data", {}).get("identical_in_train_and_val")
    if leaks:
        summary["identical_in_train_and_val"] = leaks
    if hasattr(run, "members"):
        summary["ensemble_size"] = len(run.members)
    if args.json:
        _print_json(summary)
    else:
        val = run.metrics.get("val", {})
        line = f"run saved to {run.path}"
        if val:
            line += f"; validation accuracy {val['accuracy']:.4f} on {val['n_images']} images"
        if "selection" in run.metrics:
            line += (f"; chosen {run.metrics['selection']['chosen']}, {run.metrics['cv']['folds']}-fold CV accuracy "
                     f"{run.metrics['cv']['accuracy']:.4f} (the selection's own estimate: optimistic)")
        elif "cv" in run.metrics:
            line += f"; {run.metrics['cv']['folds']}-fold CV accuracy {run.metrics['cv']['accuracy']:.4f}"
        print(line)
    return EXIT_OK


def _table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..api import evaluate

    result = evaluate(args.run, args.data, tta=args.tta, tta_average=args.tta_average, ablation=args.ablation,
                      report=args.report, weights=args.weights, cache_dir=args.cache_dir,
                      batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    if args.json:
        _print_json(result)
        return EXIT_OK
    setting = result["ablation"][0]["setting"] if len(result["ablation"]) == 1 else _setting(result)
    print(f"accuracy {result['accuracy']:.4f} on {result['n_images']} images ({setting}; {result['seconds']:.1f}s, "
          f"{result['ms_per_image']:.2f} ms/image)")
    rows = [[name, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
            for name, m in result["per_class"].items()]
    print(_table(rows, ["class", "precision", "recall", "f1", "support"]))
    names = result["class_names"]
    print("confusion matrix (rows = true, columns = predicted):")
    print(_table([[n, *map(str, r)] for n, r in zip(names, result["confusion_matrix"])], ["", *names]))
    if len(result["ablation"]) > 1:
        print("ablation (ms/image cold: empty cache, up to 64 images; cached: features already on disk):")
        rows = [[r["setting"], f"{r['accuracy']:.4f}", f"{r['ms_per_image_cold']:.1f}", f"{r['ms_per_image']:.3f}"]
                for r in result["ablation"]]
        print(_table(rows, ["setting", "accuracy", "ms/image cold", "ms/image cached"]))
    if result.get("report"):
        print(f"report written to {result['report']}")
    for bad in result["bad_files"]:
        print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    return EXIT_OK


def _setting(result: dict[str, Any]) -> str:
    members = result["ensemble_size"]
    name = "single model" if members == 1 else f"ensemble of {members}"
    return name + (f" + {result['tta']} TTA" if result["tta"] != "none" else "")


def cmd_ensemble(args: argparse.Namespace) -> int:
    from ..api import make_ensemble
    from ..errors import UsageError

    member_weights = None
    if args.member_weights:
        try:
            member_weights = [float(w) for w in args.member_weights.split(",")]
        except ValueError:
            raise UsageError(
                f"--member-weights must be numbers separated by commas; got '{args.member_weights}'") from None
    run = make_ensemble(args.runs, args.out, member_weights)
    summary = {"run": str(run.path), "members": len(run.members), "class_names": run.class_names,
               "member_weights": run.member_weights}
    if args.json:
        _print_json(summary)
    else:
        print(f"ensemble of {len(run.members)} runs saved to {run.path}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from ..api import predict

    result = predict(args.run, args.paths, top_k=args.top_k, tta=args.tta, tta_average=args.tta_average,
                     weights=args.weights, cache_dir=args.cache_dir,
                     batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    preds = result["predictions"]
    k = min(args.top_k, len(result["class_names"]))
    if args.format == "json":
        _print_json(result)
    elif args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["path", *[f"{s}{i}" for i in range(1, k + 1) for s in ("label", "p")]])
        for p in preds:
            cells = [f"{v:.6f}" if isinstance(v, float) else v for pair in p["top_k"] for v in pair]
            writer.writerow([p["path"], *cells])
    else:
        rows = [[p["path"], ", ".join(f"{label} {prob:.3f}" for label, prob in p["top_k"])] for p in preds]
        if rows:
            print(_table(rows, ["path", "prediction"]))
    for bad in result["bad_files"]:
        print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    if not preds:
        print(f"headstart predict: error: no image could be classified ({len(result['bad_files'])} skipped)",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def cmd_features(args: argparse.Namespace) -> int:
    from .. import distributed
    from ..api import extract

    with distributed.session():  # under torchrun: each rank its share; rank 0 alone prints the summary
        result = extract(args.data, backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir,
                         precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
                         progress=not args.quiet, engine=args.engine)
        if not distributed.is_main():
            return EXIT_OK
    if args.json:
        _print_json(result)
    else:
        print(f"{result['n_images']} images: {result['n_computed']} computed, {result['n_cached']} from cache, "
              f"{result['n_bad']} bad; {result['seconds']:.1f}s ({result['images_per_second']:.1f} img/s); "
              f"cache {result['cache_dir']}")
        for bad in result["bad_files"]:
            print(f"skipped {bad['path']}: {bad['reason']}", file=sys.stderr)
    return EXIT_OK


def cmd_backbones(args: argparse.Namespace) -> int:
    from ..backbones import list_backbones

    if args.stages:
        return _print_stages(args)
    rows = list_backbones(args.pattern)
    if args.installed:
        rows = [r for r in rows if r["weights"].startswith("installed")]
    if args.json:
        _print_json(rows)
    elif not rows:
        print(f"headstart backbones: error: no backbone matches '{args.pattern}'", file=sys.stderr)
        return EXIT_FAILURE
    else:
        print(_table([[r["name"], r["weights"]] for r in rows], ["backbone", "weights"]))
    return EXIT_OK


def _print_stages(args: argparse.Namespace) -> int:
    import timm

    from ..backbones import check_backbone_name
    from ..stages import describe_stages

    check_backbone_name(args.pattern)
    model = timm.create_model(args.pattern, pretrained=False, num_classes=0)
    size = timm.data.resolve_data_config({}, model=model)["input_size"]
    rows = describe_stages(model, size)
    if args.json:
        _print_json(rows)
        return EXIT_OK
    table = [[str(r["index"] or ""), r["stage"], f"{r['params']:,}", "x".join(map(str, r["output_shape"]))]
             for r in rows]
    print(f"{args.pattern}: --freeze N freezes stages 1..N (input {size[1]}x{size[2]})")
    print(_table(table, ["N", "stage", "params", "output"]))
    return EXIT_OK


def cmd_augment_preview(args: argparse.Namespace) -> int:
    from ..augmented import preview

    result = preview(args.data, args.out, preset=args.preset, n=args.n, n_views=args.views, size=args.size,
                     seed=args.seed, overrides=parse_aug_params(args.aug_param), cache_dir=args.cache_dir,
                     progress=not args.quiet)
    if args.json:
        _print_json(result)
    else:
        print(f"wrote {result['out']}: {len(result['images'])} images x (original + {result['views']} "
              f"'{result['preset']}' views), {result['size'][0]}x{result['size'][1]} px")
    return EXIT_OK


def cmd_pca_stats(args: argparse.Namespace) -> int:
    from ..augmented import pca_stats

    stats = pca_stats(args.data, cache_dir=args.cache_dir, seed=args.seed, progress=not args.quiet)
    if args.json:
        _print_json(stats)
        return EXIT_OK
    print(f"RGB PCA colour statistics of {stats['n_images']} images (pixel values on a 0..1 scale unless noted)")
    vectors = stats["eigvecs"]  # column k is the eigenvector of eigenvalue k
    for k, value in enumerate(stats["eigvals"]):
        r, g, b = (vectors[row][k] for row in range(3))
        print(f"  component {k + 1}: eigenvalue {value:.6f}  eigenvector (R, G, B) = ({r:+.4f}, {g:+.4f}, {b:+.4f})")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    summary = run_demo(args.out, cache_dir=args.cache_dir, batch_size=args.batch_size,
                       num_workers=args.workers, progress=not args.quiet)
    if args.json:
        _print_json(summary)
    else:
        print(summary["text"])
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..sweep import format_sweep, sweep

    if args.top < 1:
        raise UsageError(f"--top must be >= 1; got {args.top}")
    views = _split_list(args.aug_views, "--aug-views", int)
    result = sweep(args.data, args.out, backbone=args.backbone, aug_views=views, augment=args.augment,
                   aug_params=parse_aug_params(args.aug_param), grid=parse_grid(args), cv=args.cv, seed=args.seed,
                   weights=args.weights, cache_dir=args.cache_dir, precision=args.precision, engine=args.engine,
                   batch_size=args.batch_size, num_workers=args.workers, progress=not args.quiet)
    if args.json:
        _print_json(result)
        return EXIT_OK
    settings, timings, best_run = result["settings"], result["timings"], result["best_run"]
    print(f"{result['n_settings']} settings, {settings['folds']}-fold CV on {settings['n_images']} images; "
          "best first:")
    print(format_sweep(result["leaderboard"], args.top))
    features = ", ".join(f"{name} {t['seconds']:.1f}s" for name, t in timings["features"].items())
    print(f"seconds: features {features}; selection {sum(timings['selection'].values()):.1f}; "
          f"refit {timings['refit']:.1f}; total {timings['total']:.1f}")
    print(f"best: {result['best']['setting']}; run refitted on {best_run['n_train']} images saved to "
          f"{best_run['path']}")
    if "note" in best_run:
        print(f"headstart sweep: warning: {best_run['note']}", file=sys.stderr)
    print(f"wrote {', '.join(result['files'][k] for k in ('json', 'csv', 'png'))}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from .export_cmd import run_export

    return run_export(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve_cmd import run_serve

    return run_serve(args)


def _number(value: str) -> float | str:
    """``value`` as a float, or as it is (for the API's check to name) when it is not a number."""
    try:
        return float(value)
    except ValueError:
        return value


def cmd_inspect(args: argparse.Namespace) -> int:
    from .._validation import check_positive_int
    from ..errors import UsageError
    from ..inspection import inspect
    from ..selection import DEFAULT_FOLDS

    thumbnail_near = None if args.thumbnail_near.strip().lower() == "off" else _number(args.thumbnail_near)
    folds = DEFAULT_FOLDS if args.cv is None else args.cv
    check_positive_int(folds, "--cv")
    if folds < 2:
        raise UsageError(f"--cv must be at least 2 (out-of-fold probabilities need 2 folds); got {folds}")
    found = inspect(args.data, out=args.out, fix=args.fix, backbone=args.backbone, weights=args.weights,
                    cache_dir=args.cache_dir, folds=folds, seed=args.seed, near_duplicate=args.near_duplicate,
                    thumbnail_near=thumbnail_near, batch_size=args.batch_size, num_workers=args.workers,
                    progress=not args.quiet)
    if args.json:
        _print_json(found)
        return EXIT_OK
    leaks = sum(d["across_splits"] for d in found["near_duplicates"]) + sum(
        g["across_splits"] for g in found["exact_duplicates"])
    print(f"{found['n_images']} images: {len(found['label_issues'])} likely label errors, "
          f"{len(found['exact_duplicates'])} groups of identical files, {len(found['near_duplicates'])} near-duplicate "
          f"pairs ({leaks} across train/val), {len(found['outliers'])} outliers; {found['seconds']:.1f}s")
    rows = [[t["path"], t["given"], t["suggested"], f"{t['confidence']:.2f}"] for t in found["label_issues"][:10]]
    if rows:
        print(_table(rows, ["likely label error", "given", "suggested", "confidence"]))
    print(f"page: {found['files']['html']}")
    if "fix" in found:
        fix = found["fix"]
        print(f"manifest {fix['manifest']}: {fix['rows']} rows, {fix['relabelled']} relabelled, {fix['dropped']} "
              f"left out; train on it with 'headstart train {fix['manifest']}'")
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    from ..cache import FeatureCache, default_cache_dir, maintenance
    from ..errors import UsageError

    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if args.action == "clear":
        if not args.yes:
            raise UsageError(f"'headstart cache clear' deletes every cached feature in {root}; add --yes to confirm")
        result = maintenance.clear(root)
    else:
        if not root.is_dir():
            raise UsageError(f"--cache-dir {root} is not a folder; pass the cache folder (see 'headstart cache info' "
                             "without --cache-dir for the default)")
        with FeatureCache(root) as cache:
            result = getattr(maintenance, args.action)(cache)
    if args.json:
        _print_json(result)
    else:
        print(_cache_text(args.action, result))
    return EXIT_FAILURE if args.action == "verify" and (result["damaged"] or result["index"] != "ok") else EXIT_OK


def _cache_text(action: str, result: dict[str, Any]) -> str:
    if action == "info":
        lines = [f"{result['root']}: {result['bytes'] / 2**20:.1f} MiB, {result['rows']} rows in {result['shards']} "
                 f"shards, {len(result['orphan_shards'])} orphan shards"]
        rows = [[m["key"], str(m["backbone"]), str(m["cut"]), str(m["view"])[:40], str(m["rows"])]
                for m in result["models"]]
        return "\n".join(lines + ([_table(rows, ["model key", "backbone", "cut", "view", "rows"])] if rows else []))
    if action == "verify":
        lines = [f"{result['root']}: index {result['index']}, {result['shards_checked']} shards checked, "
                 f"{len(result['damaged'])} damaged (dropped; their rows will be recomputed)"]
        return "\n".join(lines + [f"  {d['shard']}: {d['reason']}" for d in result["damaged"]])
    if action == "prune":
        return (f"{result['root']}: removed {result['removed_shards']} orphan shards and {result['removed_files']} "
                f"files, {result['bytes_freed'] / 2**20:.1f} MiB freed")
    return f"{result['root']}: cleared, {result['bytes_freed'] / 2**20:.1f} MiB freed"

"""``headstart`` command line: a thin skin over :mod:`headstart.api`.

Every subcommand parses its arguments and calls one public function. Humans get progress bars and
messages on stderr; ``--json`` prints one machine-readable object on stdout. Exit codes: 0 success,
1 failure (one-line reason on stderr), 2 usage error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_common(p: argparse.ArgumentParser, *, backbone: bool = True) -> None:
    if backbone:
        p.add_argument("--backbone", default="tf_efficientnet_lite0",
                       help="timm model name, or several separated by commas for an ensemble "
                            "(default: %(default)s; see 'headstart backbones')")
        p.add_argument("--weights", default="default",
                       help="'default' (packaged offline weights, else timm download), 'random', "
                            "or a .safetensors/.pth file (default: %(default)s)")
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: $HEADSTART_CACHE_DIR or the per-user cache)")
    p.add_argument("--batch-size", type=int, default=32, help="images per backbone forward (default: 32)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes (default: one per spare core; 0 = in-process)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages on stderr")


def _add_grid(g: Any) -> None:
    """The ``--grid-*`` flags that narrow the head selection (train and sweep)."""
    g.add_argument("--grid-C", default=None, metavar="C1,C2,...",
                   help="linear candidates' inverse L2 strength, as scikit-learn's C "
                        "(default: 0.01,0.03,0.1,0.3,1,3,10)")
    g.add_argument("--grid-source", default=None, metavar="S1,S2",
                   help="feature sources: pooled, logits (the backbone's own ImageNet scores), pooled+logits "
                        "(default: all three)")
    g.add_argument("--grid-mlp", default=None, metavar="H1,H2",
                   help="hidden widths of the mlp candidates, or 'none' (default: 64,256 from 500 training "
                        "images up; named widths are always tried)")
    g.add_argument("--grid-standardize", default=None, metavar="off,on",
                   help="linear candidates with raw and/or standardised features (default: off,on)")


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=["none", "flip", "5crop", "10crop", "multiscale"], default="none",
                   help="test-time views averaged per image: flip = centre + mirror; 10crop = centre and 4 corners "
                        "and their mirrors; multiscale = centre crops at 3 scales and mirrors (default: none)")
    p.add_argument("--tta-average", choices=["mean", "geomean"], default="mean",
                   help="average of the views' probabilities (default: mean)")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headstart",
        description="Turn a folder of images into an image classifier by transfer learning from a "
                    "pre-trained network: frozen backbone -> cached features -> trained head.",
        epilog="Start with 'headstart demo'. Data layouts: ROOT/<class>/<image>, ROOT/{train,val}/<class>/<image>, "
               "or a CSV with columns path,label.",
    )
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train a classifier: head on cached features, fine-tuning, or an ensemble",
                       description="Extract (or reuse cached) backbone features and train a head, or fine-tune "
                                   "the top stages (--freeze), or train an ensemble (--backbone A,B / --ensemble M); "
                                   "save the run.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest (path,label)")
    p.add_argument("--out", required=True, help="run folder to write")
    g = p.add_argument_group("the head (chosen by cross-validation unless --select none)")
    g.add_argument("--select", choices=["cv", "none"], default="cv",
                   help="cv = try a grid of head settings on the cached features with k-fold CV, keep the best by "
                        "log-loss at its own temperature and refit it on every training image, temperature folded "
                        "in (default); none = train one fixed head")
    g.add_argument("--cv", type=int, default=None,
                   help="folds of the selection (default 5; fewer when a class is smaller); with --select none, "
                        "report K-fold CV accuracy of the fixed head (default: off)")
    g.add_argument("--head", choices=["linear", "mlp"], default=None,
                   help="linear = softmax regression, mlp = one hidden layer; default: both are candidates "
                        "(linear with --select none)")
    _add_grid(g)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="with --select none: L2 penalty of the head (default: 1/n for linear, 1e-2 for mlp)")
    g.add_argument("--class-weight", choices=["none", "balanced"], default="none",
                   help="weight classes inversely to their frequency (default: none; with --select cv, balanced "
                        "candidates are added by themselves when the largest class is 1.5x the smallest)")
    g.add_argument("--hidden", type=int, default=None, help="with --select none: mlp hidden width (default 512)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of fine-tuning (default 8) or of the mlp head (default: enough for ~600 steps)")
    p.add_argument("--val-split", type=float, default=0.0,
                   help="fraction of each class held out and scored after training when DATA has no val/ folder; "
                        "never used to select (default: 0 = train on everything)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, folds and head (default: 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="backbone arithmetic (default: auto = bf16 on AMX CPUs and GPUs, else fp32)")
    p.add_argument("--ensemble", type=int, default=1,
                   help="members per backbone, each on its own bootstrap sample (default 1); with "
                        "--backbone A,B,C one member (or --ensemble M) per backbone; all stored as one run")
    p.add_argument("--augment", choices=["none", "light", "standard", "heavy"], default="none",
                   help="augmentation preset: caches --aug-views augmented views of each training image and "
                        "trains the head on them too (default: none; see docs/augmentation.md)")
    p.add_argument("--aug-views", type=int, default=None,
                   help="augmented views cached per training image (default: 8 when --augment is set)")
    p.add_argument("--aug-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                   help="override one augmentation hyperparameter, e.g. affine.degrees=20 (repeatable; "
                        "VALUE is JSON, e.g. '[0.5,1.0]')")
    g = p.add_argument_group("fine-tuning (when --freeze is not 'all')")
    g.add_argument("--freeze", default="all",
                   help="all = head only on cached features (default); none = train everything; N = freeze the "
                        "first N stages (see 'headstart backbones NAME --stages'); auto = compare the frozen head "
                        "with fine-tuning the top 1/2/3 stages on a held-out fold and retrain the winner; "
                        "probe = fit a linear head on every stage's output and choose from the validation scores")
    g.add_argument("--budget", type=float, default=None, metavar="MINUTES",
                   help="--freeze auto: time for the comparison and the retraining; candidates that would not "
                        "fit are skipped (default 10)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the head (default 1e-3)")
    g.add_argument("--lr-decay", type=float, default=None,
                   help="discriminative rates: each lower stage gets this times the rate above (default 0.5)")
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default=None, help="default adamw")
    g.add_argument("--label-smoothing", type=float, default=None, help="default 0.1")
    g.add_argument("--patience", type=int, default=None, help="early-stopping patience in epochs (default 3)")
    g.add_argument("--gradual", type=int, default=None,
                   help="gradual unfreezing: one more stage every N epochs, from the top (default 0 = off)")
    g.add_argument("--no-cut-cache", action="store_true",
                   help="recompute the frozen stages every step instead of caching their output")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (slower)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted fine-tuning from its checkpoint")
    p.add_argument("--json", action="store_true", help="print the run summary as one JSON object on stdout")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="accuracy, per-class metrics, TTA, ablation and HTML report on labelled data")
    p.add_argument("run", help="run folder written by 'headstart train'")
    p.add_argument("data", help="labelled data (a train/+val/ tree is evaluated on val/)")
    p.add_argument("--weights", default=None, help="weights file, if the run was trained from one that moved")
    _add_tta(p)
    p.add_argument("--ablation", action="store_true",
                   help="also measure single model / +TTA / +ensemble / both (accuracy, ms per image)")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="write a self-contained HTML report (plots, calibration, worst mistakes, ablation)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files or folders with a run")
    p.add_argument("run", help="run folder written by 'headstart train'")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to list per image (default: 1)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--weights", default=None, help="weights file, if the run was trained from one that moved")
    _add_tta(p)
    _add_common(p, backbone=False)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("ensemble", help="combine runs with the same classes into one ensemble run",
                       description="Copy existing runs (same class names) into one run whose predictions "
                                   "average the members' probabilities.")
    p.add_argument("runs", nargs="+", help="run folders (two or more)")
    p.add_argument("--out", required=True, help="ensemble run folder to write")
    p.add_argument("--member-weights", default=None, metavar="W1,W2,...",
                   help="weights of the members' probabilities (default: equal)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("features", help="pre-compute and cache backbone features only")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_common(p)
    p.set_defaults(func=cmd_features)

    p = sub.add_parser("backbones", help="list timm backbones and whether their weights are installed")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard pattern, e.g. 'efficientnet*' (default: all)")
    p.add_argument("--installed", action="store_true", help="only backbones whose weights are on this machine")
    p.add_argument("--stages", action="store_true",
                   help="list the stages of one backbone (the units of --freeze N) with parameters and output shapes")
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("augment-preview", help="write a PNG grid of images and their augmented views",
                       description="Look before training: per image, one row with the original and one with "
                                   "augmented views.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--preset", choices=["none", "light", "standard", "heavy"], default="standard")
    p.add_argument("--n", type=int, default=16, help="images to show (default: 16, spread over the classes)")
    p.add_argument("--views", type=int, default=7, help="augmented views per image (default: 7)")
    p.add_argument("--size", type=int, default=224, help="output size of a view in pixels (default: 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                   help="override one augmentation hyperparameter (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--cache-dir", default=None, help="where fitted PCA colour statistics are remembered")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_augment_preview)

    p = sub.add_parser("pca-stats", help="fit and print the RGB PCA colour statistics of a data set",
                       description="AlexNet-style PCA colour statistics (eigenvalues and eigenvectors of the RGB "
                                   "covariance) of the images in DATA; remembered in the cache for training.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--seed", type=int, default=0, help="pixel-sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_pca_stats)

    p = sub.add_parser("demo", help="the whole recipe on real photos that ship with scikit-image, offline")
    p.add_argument("--out", default="headstart-demo", help="folder for the demo images and run (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="compare head settings x feature sources x augmented views x backbones by CV",
                       description="Cross-validate the grid of head settings on every backbone's cached features, "
                                   "with each count of augmented views; rank all settings on the same folds, write "
                                   "OUT/sweep.json, sweep.csv and sweep.png, and save the best as the run OUT/best.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree (the sweep uses train/), or CSV manifest")
    p.add_argument("--out", required=True, help="folder for sweep.json, sweep.csv, sweep.png and the best run best/")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", metavar="A,B,...",
                   help="timm model names to compare, separated by commas (default: %(default)s)")
    p.add_argument("--weights", default="default",
                   help="'default' (packaged offline weights, else timm download), 'random', "
                        "or a .safetensors/.pth file (default: %(default)s)")
    p.add_argument("--aug-views", default="0", metavar="K1,K2,...",
                   help="augmented views per training image to compare, e.g. 0,4,8; 0 = the clean view only "
                        "(default: 0)")
    p.add_argument("--augment", choices=["none", "light", "standard", "heavy"], default=None,
                   help="augmentation preset of the augmented views (default: standard when a count is > 0)")
    p.add_argument("--aug-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                   help="override one augmentation hyperparameter, e.g. affine.degrees=20 (repeatable)")
    g = p.add_argument_group("the head settings (as 'train')")
    _add_grid(g)
    g.add_argument("--cv", type=int, default=None, help="folds (default 5; fewer when a class is smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, augmented views and heads (default: 0)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                   help="backbone arithmetic (default: auto = bf16 on AMX CPUs and GPUs, else fp32)")
    p.add_argument("--top", type=int, default=20, help="leaderboard rows to print (default: 20; all are saved)")
    p.add_argument("--json", action="store_true", help="print the sweep (leaderboard included) as JSON on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=cmd_sweep)
    return parser


# ------------------------------------------------------------------------------------------ commands


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")


def parse_aug_params(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["affine.degrees=20"]`` -> ``{"affine": {"degrees": 20}}``; VALUE is parsed as JSON when it can be."""
    from .errors import UsageError

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
    from .errors import UsageError

    items = [v.strip() for v in value.split(",") if v.strip()]
    try:
        out = [convert(v) for v in items]
    except (ValueError, KeyError):
        out = []
    if not out or (allowed is not None and not set(items) <= set(allowed)):
        hint = f"any of {', '.join(allowed)}" if allowed else "values"
        raise UsageError(f"{flag} must list {hint} separated by commas; got '{value}'")
    return out


def parse_grid(args: argparse.Namespace) -> dict[str, list[Any]]:
    """The ``--grid-*`` flags as :class:`~headstart.selection.Grid` options."""
    grid: dict[str, list[Any]] = {}
    if args.grid_C is not None:
        grid["C"] = _split_list(args.grid_C, "--grid-C", float)
    if args.grid_source is not None:
        grid["source"] = _split_list(args.grid_source, "--grid-source", str, ["pooled", "logits", "pooled+logits"])
    if args.grid_mlp is not None:
        grid["mlp"] = [] if args.grid_mlp.strip() == "none" else _split_list(args.grid_mlp, "--grid-mlp", int)
        if not grid["mlp"]:
            grid["head"] = ["linear"]
    if args.grid_standardize is not None:
        grid["standardize"] = _split_list(args.grid_standardize, "--grid-standardize", {"off": False, "on": True}.get,
                                          ["off", "on"])
    return grid


def _finetune_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for name in ("lr", "lr_decay", "optimizer", "label_smoothing", "patience", "gradual"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.batch_size != 32:
        params["batch_size"] = args.batch_size
    if args.no_cut_cache:
        params["cache_cut"] = False
    if args.deterministic:
        params["deterministic"] = True
    return params


def cmd_train(args: argparse.Namespace) -> int:
    from .api import TrainConfig, train

    config = TrainConfig(backbone=args.backbone, weights=args.weights, select=args.select, head=args.head,
                         head_params=_head_params(args), grid=parse_grid(args),
                         val_split=args.val_split, cv=args.cv, seed=args.seed, precision=args.precision,
                         batch_size=args.batch_size, num_workers=args.workers, cache_dir=args.cache_dir,
                         augment=args.augment, aug_views=args.aug_views, aug_params=parse_aug_params(args.aug_param),
                         freeze=args.freeze, budget=args.budget, resume=args.resume, ensemble=args.ensemble,
                         finetune=_finetune_params(args) if args.freeze != "all" else {})
    run = train(args.data, args.out, config, progress=not args.quiet)
    summary = {"run": str(run.path), "class_names": run.class_names, **run.metrics}
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
    from .api import evaluate

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
    from .api import make_ensemble
    from .errors import UsageError

    weights = None
    if args.member_weights:
        try:
            weights = [float(w) for w in args.member_weights.split(",")]
        except ValueError:
            raise UsageError(
                f"--member-weights must be numbers separated by commas; got '{args.member_weights}'") from None
    run = make_ensemble(args.runs, args.out, weights)
    summary = {"run": str(run.path), "members": len(run.members), "class_names": run.class_names,
               "weights": run.weights}
    if args.json:
        _print_json(summary)
    else:
        print(f"ensemble of {len(run.members)} runs saved to {run.path}")
    return EXIT_OK


def cmd_predict(args: argparse.Namespace) -> int:
    from .api import predict

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
    from .api import extract

    result = extract(args.data, backbone=args.backbone, weights=args.weights, cache_dir=args.cache_dir,
                     precision=args.precision, batch_size=args.batch_size, num_workers=args.workers,
                     progress=not args.quiet)
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
    from .backbones import list_backbones

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

    from .backbones import check_backbone_name
    from .stages import describe_stages

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
    from .augmented import preview

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
    from .augmented import pca_stats

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
    from .demo import run_demo

    summary = run_demo(args.out, cache_dir=args.cache_dir, batch_size=args.batch_size,
                       num_workers=args.workers, progress=not args.quiet)
    if args.json:
        _print_json(summary)
    else:
        print(summary["text"])
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from .errors import UsageError
    from .sweep import format_sweep, sweep

    if args.top < 1:
        raise UsageError(f"--top must be >= 1; got {args.top}")
    views = _split_list(args.aug_views, "--aug-views", int)
    result = sweep(args.data, args.out, backbone=args.backbone, aug_views=views, augment=args.augment,
                   aug_params=parse_aug_params(args.aug_param), grid=parse_grid(args), cv=args.cv, seed=args.seed,
                   weights=args.weights, cache_dir=args.cache_dir, precision=args.precision,
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


# ------------------------------------------------------------------------------------------ entry point


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used as the console-script entry point)."""
    from .errors import HeadstartError, UsageError

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"headstart {args.command}: usage error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except HeadstartError as exc:
        print(f"headstart {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"headstart {args.command}: interrupted; cached features are kept, re-run to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # one line for users; HEADSTART_DEBUG=1 shows the traceback
        if os.environ.get("HEADSTART_DEBUG"):
            raise
        print(f"headstart {args.command}: failed: {type(exc).__name__}: {exc} "
              "(set HEADSTART_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_FAILURE

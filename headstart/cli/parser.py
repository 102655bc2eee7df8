"""The ``headstart`` argument parser: subcommands, options, defaults and help texts.

Choices and defaults come from :mod:`headstart._constants`, the same objects the library checks
against; nothing here imports torch, timm or scikit-learn, so ``--help`` and ``--version`` are quick.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from typing import Any

from .. import __version__
from .._constants import (
    AUGMENT_PRESETS,
    CLASS_WEIGHTS,
    DEFAULT_AUG_VIEWS,
    DEFAULT_BACKBONE,
    DEFAULT_BATCH_SIZE,
    DEFAULT_BUDGET_MINUTES,
    DEFAULT_CS,
    DEFAULT_FOLDS,
    DEFAULT_MLP_HIDDEN,
    DEFAULT_MLP_WIDTHS,
    DEFAULT_SWEEP_AUGMENT,
    DEFAULT_WEIGHTS,
    ENGINES,
    HEAD_TYPES,
    MLP_MIN_IMAGES,
    OPTIMIZERS,
    PRECISIONS,
    SELECT_MAX_IMAGES,
    SELECT_MODES,
    TTA_AVERAGES,
    TTA_MODES,
)
from . import commands

ENGINE_HELP = ("what runs the backbone's forward: auto = OpenVINO on CPUs where installed (1.6-2x PyTorch), "
               "else PyTorch (default; $HEADSTART_ENGINE overrides auto)")
DEBUG_HELP = ("on an unexpected error, show the full Python traceback instead of one line (also "
              "$HEADSTART_DEBUG=1)")
WEIGHTS_HELP = ("'default' (packaged offline weights, else timm download), 'random', "
                "or a .safetensors/.pth file (default: %(default)s)")


def _add_common(p: argparse.ArgumentParser, *, backbone: bool = True) -> None:
    if backbone:
        p.add_argument("--backbone", default=DEFAULT_BACKBONE,
                       help="timm model name, or several separated by commas for an ensemble "
                            "(default: %(default)s; see 'headstart backbones')")
        p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--cache-dir", default=None,
                   help="feature cache folder (default: $HEADSTART_CACHE_DIR or the per-user cache)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE,
                   help="images per backbone forward (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding processes (default: one per spare core; 0 = in-process)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars or messages on stderr")


def _add_arithmetic(p: argparse.ArgumentParser) -> None:
    """How the backbone computes: ``--precision`` and ``--engine`` (train, features, sweep)."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="backbone arithmetic (default: auto = bf16 on AMX CPUs and GPUs, else fp32)")
    p.add_argument("--engine", choices=ENGINES, default="auto", help=ENGINE_HELP)


def _add_grid(g: Any) -> None:
    """The ``--grid-*`` flags that narrow the head selection (train and sweep)."""
    g.add_argument("--grid-C", default=None, metavar="C1,C2,...",
                   help="linear candidates' inverse L2 strength, as scikit-learn's C "
                        f"(default: {','.join(f'{c:g}' for c in DEFAULT_CS)})")
    g.add_argument("--grid-source", default=None, metavar="S1,S2",
                   help="feature sources: pooled, logits (the backbone's own ImageNet scores), pooled+logits "
                        "(default: all three)")
    g.add_argument("--grid-mlp", default=None, metavar="H1,H2",
                   help="hidden widths of the mlp candidates, or 'none' (default: "
                        f"{','.join(map(str, DEFAULT_MLP_WIDTHS))} from {MLP_MIN_IMAGES} training images up; named "
                        "widths are always tried)")
    g.add_argument("--grid-standardize", default=None, metavar="off,on",
                   help="linear candidates with raw and/or standardised features (default: off,on)")
    g.add_argument("--grid-max-images", default=None, metavar="N|all",
                   help="rank the settings on a stratified sample of at most N images, then refit the winner on "
                        f"all (default: {SELECT_MAX_IMAGES}; all: cross-validate on every image)")


def _add_tta(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=TTA_MODES, default="none",
                   help="test-time views averaged per image: flip = centre + mirror; 10crop = centre and 4 corners "
                        "and their mirrors; multiscale = centre crops at 3 scales and mirrors (default: none)")
    p.add_argument("--tta-average", choices=TTA_AVERAGES, default="mean",
                   help="average of the views' probabilities (default: mean)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headstart",
        description="Turn a folder of images into an image classifier by transfer learning from a "
                    "pre-trained network: frozen backbone -> cached features -> trained head.",
        epilog="Start with 'headstart demo'. Data layouts: ROOT/<class>/<image>, ROOT/{train,val}/<class>/<image>, "
               "or a CSV with columns path,label.",
    )
    parser.add_argument("--version", action="version", version=f"headstart {__version__}")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_train(sub)
    _add_runs(sub)
    _add_tools(sub)
    _add_sweep(sub)
    _add_export(sub)
    _add_serve(sub)
    _add_inspect(sub)
    _add_cache(sub)
    _add_debug(sub.choices.values())
    return parser


def _add_train(sub: Any) -> None:
    """The ``train`` subcommand."""
    p = sub.add_parser("train", help="train a classifier: head on cached features, fine-tuning, or an ensemble",
                       description="Extract (or reuse cached) backbone features and train a head, or fine-tune "
                                   "the top stages (--freeze), or train an ensemble (--backbone A,B / --ensemble M); "
                                   "save the run.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest (path,label)")
    p.add_argument("--out", required=True, help="run folder to write")
    g = p.add_argument_group("the head (chosen by cross-validation unless --select none)")
    g.add_argument("--select", choices=SELECT_MODES, default="cv",
                   help="cv = try a grid of head settings on the cached features with k-fold CV, keep the best by "
                        "log-loss at its own temperature and refit it on every training image, temperature folded "
                        "in (default); none = train one fixed head")
    g.add_argument("--cv", type=int, default=None,
                   help=f"folds of the selection (default {DEFAULT_FOLDS}; fewer when a class is smaller); with "
                        "--select none, "
                        "report K-fold CV accuracy of the fixed head (default: off)")
    g.add_argument("--head", choices=HEAD_TYPES, default=None,
                   help="linear = softmax regression, mlp = one hidden layer; default: both are candidates "
                        "(linear with --select none)")
    _add_grid(g)
    g.add_argument("--weight-decay", type=float, default=None,
                   help="with --select none: L2 penalty of the head (default: 1/n for linear, 1e-2 for mlp)")
    g.add_argument("--class-weight", choices=CLASS_WEIGHTS, default="none",
                   help="weight classes inversely to their frequency (default: none; with --select cv, balanced "
                        "candidates are added by themselves when the largest class is 1.5x the smallest)")
    g.add_argument("--hidden", type=int, default=None,
                   help=f"with --select none: mlp hidden width (default {DEFAULT_MLP_HIDDEN})")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of fine-tuning (default 8) or of the mlp head (default: enough for ~600 steps)")
    p.add_argument("--val-split", type=float, default=0.0,
                   help="fraction of each class held out and scored after training when DATA has no val/ folder; "
                        "never used to select (default: 0 = train on everything)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, folds and head (default: 0)")
    _add_arithmetic(p)
    p.add_argument("--ensemble", type=int, default=1,
                   help="members per backbone, each on its own bootstrap sample (default 1); with "
                        "--backbone A,B,C one member (or --ensemble M) per backbone; all stored as one run")
    p.add_argument("--augment", choices=AUGMENT_PRESETS, default="none",
                   help="augmentation preset: caches --aug-views augmented views of each training image and "
                        "trains the head on them too (default: none; see docs/augmentation.md)")
    p.add_argument("--aug-views", type=int, default=None,
                   help=f"augmented views cached per training image (default: {DEFAULT_AUG_VIEWS} when --augment is "
                        "set)")
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
                        f"fit are skipped (default {DEFAULT_BUDGET_MINUTES:g})")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of the head (default 1e-3)")
    g.add_argument("--lr-decay", type=float, default=None,
                   help="discriminative rates: each lower stage gets this times the rate above (default 0.5)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=None, help="default adamw")
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
    p.set_defaults(func=commands.cmd_train)


def _add_runs(sub: Any) -> None:
    """The subcommands that use runs: ``evaluate``, ``predict``, ``ensemble``."""
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
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("predict", help="classify image files or folders with a run")
    p.add_argument("run", help="run folder written by 'headstart train'")
    p.add_argument("paths", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=int, default=1, help="how many classes to list per image (default: 1)")
    p.add_argument("--format", choices=["table", "csv", "json"], default="table", help="output format")
    p.add_argument("--weights", default=None, help="weights file, if the run was trained from one that moved")
    _add_tta(p)
    _add_common(p, backbone=False)
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser("ensemble", help="combine runs with the same classes into one ensemble run",
                       description="Copy existing runs (same class names) into one run whose predictions "
                                   "average the members' probabilities.")
    p.add_argument("runs", nargs="+", help="run folders (two or more)")
    p.add_argument("--out", required=True, help="ensemble run folder to write")
    p.add_argument("--member-weights", default=None, metavar="W1,W2,...",
                   help="weights of the members' probabilities (default: equal)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.set_defaults(func=commands.cmd_ensemble)


def _add_tools(sub: Any) -> None:
    """``features``, ``backbones``, ``augment-preview``, ``pca-stats`` and ``demo``."""
    p = sub.add_parser("features", aliases=["extract"],
                       help="pre-compute and cache backbone features only (the API's headstart.extract)")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    _add_arithmetic(p)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_common(p)
    p.set_defaults(func=commands.cmd_features)

    p = sub.add_parser("backbones", help="list timm backbones and whether their weights are installed")
    p.add_argument("pattern", nargs="?", default="*", help="wildcard pattern, e.g. 'efficientnet*' (default: all)")
    p.add_argument("--installed", action="store_true", help="only backbones whose weights are on this machine")
    p.add_argument("--stages", action="store_true",
                   help="list the stages of one backbone (the units of --freeze N) with parameters and output shapes")
    p.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    p.set_defaults(func=commands.cmd_backbones)

    p = sub.add_parser("augment-preview", help="write a PNG grid of images and their augmented views",
                       description="Look before training: per image, one row with the original and one with "
                                   "augmented views.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--preset", choices=AUGMENT_PRESETS, default="standard")
    p.add_argument("--n", type=int, default=16, help="images to show (default: 16, spread over the classes)")
    p.add_argument("--views", type=int, default=7, help="augmented views per image (default: 7)")
    p.add_argument("--size", type=int, default=224, help="output size of a view in pixels (default: 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aug-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                   help="override one augmentation hyperparameter (repeatable)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--cache-dir", default=None, help="where fitted PCA colour statistics are remembered")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=commands.cmd_augment_preview)

    p = sub.add_parser("pca-stats", help="fit and print the RGB PCA colour statistics of a data set",
                       description="AlexNet-style PCA colour statistics (eigenvalues and eigenvectors of the RGB "
                                   "covariance) of the images in DATA; remembered in the cache for training.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--seed", type=int, default=0, help="pixel-sampling seed (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=commands.cmd_pca_stats)

    p = sub.add_parser("demo", help="the whole recipe on real photos that ship with scikit-image, offline")
    p.add_argument("--out", default="headstart-demo", help="folder for the demo images and run (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=commands.cmd_demo)


def _add_sweep(sub: Any) -> None:
    """The ``sweep`` subcommand."""
    p = sub.add_parser("sweep", help="compare head settings x feature sources x augmented views x backbones by CV",
                       description="Cross-validate the grid of head settings on every backbone's cached features, "
                                   "with each count of augmented views; rank all settings on the same folds, write "
                                   "OUT/sweep.json, sweep.csv and sweep.png, and save the best as the run OUT/best.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree (the sweep uses train/), or CSV manifest")
    p.add_argument("--out", required=True, help="folder for sweep.json, sweep.csv, sweep.png and the best run best/")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, metavar="A,B,...",
                   help="timm model names to compare, separated by commas (default: %(default)s)")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help=WEIGHTS_HELP)
    p.add_argument("--aug-views", default="0", metavar="K1,K2,...",
                   help="augmented views per training image to compare, e.g. 0,4,8; 0 = the clean view only "
                        "(default: 0)")
    p.add_argument("--augment", choices=AUGMENT_PRESETS, default=None,
                   help=f"augmentation preset of the augmented views (default: {DEFAULT_SWEEP_AUGMENT} when a "
                        "count is > 0)")
    p.add_argument("--aug-param", action="append", default=[], metavar="STEP.PARAM=VALUE",
                   help="override one augmentation hyperparameter, e.g. affine.degrees=20 (repeatable)")
    g = p.add_argument_group("the head settings (as 'train')")
    _add_grid(g)
    g.add_argument("--cv", type=int, default=None,
                   help=f"folds (default {DEFAULT_FOLDS}; fewer when a class is smaller)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds, augmented views and heads (default: 0)")
    _add_arithmetic(p)
    p.add_argument("--top", type=int, default=20, help="leaderboard rows to print (default: 20; all are saved)")
    p.add_argument("--json", action="store_true", help="print the sweep (leaderboard included) as JSON on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=commands.cmd_sweep)


def _add_debug(subparsers: Iterable[argparse.ArgumentParser]) -> None:
    """``--debug`` after the command too (``headstart train ... --debug``); an alias's parser gets it once."""
    for p in {id(p): p for p in subparsers}.values():
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)


def _add_export(sub: Any) -> None:
    """The ``export`` subcommand."""
    p = sub.add_parser("export", help="export a run to one ONNX graph (image -> probabilities), verified in "
                                      "ONNX Runtime, with a model card",
                       description="Write one self-contained graph from a uint8 image batch (N x 3 x H x W, the run's "
                                   "input size) to class probabilities: normalisation, backbone, head, and for "
                                   "ensembles every member and the averaging. The file is checked with onnx.checker, "
                                   "run in ONNX Runtime on images of the run's data and compared with headstart's "
                                   "own probabilities; model_card.md and model_card.json are written next to it. "
                                   "Needs: pip install 'headstart[export]'.")
    p.add_argument("run", help="run folder written by 'headstart train'")
    p.add_argument("--format", choices=("onnx", "torchscript"), default="onnx", help="(default: %(default)s)")
    p.add_argument("--out", default=None, help="file to write (default: RUN/model.onnx or RUN/model.pt)")
    p.add_argument("--tta", choices=("none", "flip", "10crop"), default="none",
                   help="test-time views averaged inside the graph (default: %(default)s)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="also write an int8 model (static quantization calibrated on the run's training images) "
                        "and compare size, speed and accuracy with fp32")
    p.add_argument("--check-images", nargs="+", default=None, metavar="PATH",
                   help="images (or folders) to verify on (default: a few of the run's own data)")
    p.add_argument("--data", default=None, help="labelled data for the int8 accuracy comparison and calibration "
                                                "(default: the run's own data folder)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    _add_common(p, backbone=False)
    p.set_defaults(func=commands.cmd_export)


def _add_serve(sub: Any) -> None:
    """The ``serve`` subcommand."""
    p = sub.add_parser("serve", help="serve a run over HTTP (POST /predict, GET /health, GET /metadata)",
                       description="An HTTP server for a run (FastAPI + uvicorn; pip install 'headstart[serve]'). "
                                   "Concurrent requests are batched; request size and image pixels are limited; "
                                   "bad uploads get a JSON 4xx error and the server keeps serving.")
    p.add_argument("run", help="run folder written by 'headstart train'")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--engine", choices=("torch", "onnx"), default="torch",
                   help="torch: the run as headstart computes it; onnx: the exported graph in ONNX Runtime "
                        "(exported first if RUN/model.onnx is missing) (default: %(default)s)")
    p.add_argument("--max-batch", type=int, default=32, help="largest batch of requests (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="how long a request may wait for others to batch with (default: %(default)s)")
    p.add_argument("--max-bytes", type=int, default=20 * 2**20, help="largest upload (default: 20 MiB)")
    p.add_argument("--quiet", "-q", action="store_true", help="no log line per request")
    p.set_defaults(func=commands.cmd_serve)


def _add_inspect(sub: Any) -> None:
    """The ``inspect`` subcommand."""
    p = sub.add_parser("inspect", help="find likely label errors, near-duplicates, train/val leakage and outliers",
                       description="Look at labelled data through its cached features: likely label errors by "
                                   "confident learning on out-of-fold probabilities of the head the selection "
                                   "chooses, exact and near-duplicates (marked when they span train/ and val/), "
                                   "outliers far from every other image, and per-class counts, accuracy and "
                                   "confusions. Writes OUT/findings.json, findings.csv and inspect.html; the "
                                   "images are never changed.")
    p.add_argument("data", help="class-folder tree, train/+val/ tree, or CSV manifest")
    p.add_argument("--out", default="inspect", help="folder for findings.json, findings.csv and inspect.html "
                                                    "(default: %(default)s)")
    p.add_argument("--fix", default=None, metavar="CSV",
                   help="also write a path,label manifest for 'headstart train' with the likely label errors "
                        "relabelled (suggested class >= 0.8 likely) or left out; it must lie in a folder that "
                        "holds the images, e.g. next to the data folder")
    p.add_argument("--near-duplicate", type=float, default=0.93, metavar="COSINE",
                   help="cosine similarity of the features from which two images are near-duplicates "
                        "(default: %(default)s; see benchmarks/inspection.py)")
    p.add_argument("--thumbnail-near", default="0.985", metavar="CORR|off",
                   help="correlation of 16 x 16 thumbnails from which two images are near-duplicates too, which "
                        "finds shrunk or recompressed copies the features miss (default: %(default)s; 'off': "
                        "features only, e.g. for scans or products on a plain background, whose thumbnails look alike)")
    p.add_argument("--cv", type=int, default=None, help="folds of the out-of-fold probabilities (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the findings as one JSON object on stdout")
    _add_common(p)
    p.set_defaults(func=commands.cmd_inspect)


def _add_cache(sub: Any) -> None:
    """The ``cache`` subcommand."""
    p = sub.add_parser("cache", help="look after the feature cache: info, verify, prune, clear",
                       description="info: size, models and rows, orphan shards. verify: SQLite's integrity check "
                                   "and every shard's sha256 (damaged shards are dropped, to be recomputed; exit 1 "
                                   "if any). prune: delete orphan shards (older than 10 minutes), temporary files "
                                   "and moved-aside corrupt indexes. clear: delete everything in the folder "
                                   "(needs --yes).")
    p.add_argument("action", choices=("info", "verify", "prune", "clear"))
    p.add_argument("--cache-dir", default=None, help="the cache folder (default: $HEADSTART_CACHE_DIR or the "
                                                     "per-user cache folder)")
    p.add_argument("--yes", action="store_true", help="confirm 'clear'")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=commands.cmd_cache)

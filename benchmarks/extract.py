"""Feature extraction throughput: the model alone, the hand-written baseline and headstart, in one run.

usage:
    python benchmarks/extract.py [DATA ...] [--seconds 8] [--batch-size 32]
                                 [--engines eager,compile,onnxruntime,openvino]

DATA defaults to both sets of ../shared/data (605 photos, joined as one class-folder tree through
links). Rows, all on this machine in this run (its speed drifts ~2x between days: only the ratios
printed here count):

  model only        the backbone's forward on a random batch, ``--seconds`` after a warm-up, for each
                    engine and precision (torch eager fp32 and bf16 channels-last; ``torch.compile``,
                    ONNX Runtime and OpenVINO when installed). The ceiling for any pipeline.
  baseline          ../shared/bench/naive_baseline.py DATA --cv 2: its own printed features img/s
                    (ImageFolder + DataLoader with 2 workers + fp32 eager), process start excluded
  headstart cold    ``headstart features DATA`` with an empty cache: its own printed img/s (hashing,
                    decoding in workers, forward, cache writes), process start excluded. Twice: the
                    first use of the backbone on a machine (OpenVINO's one-off conversion of the
                    network included), then a new empty feature cache with the converted network kept

Then the features headstart cached are compared per image with an fp32 eager reference of the same
decode + transform (cosine). Targets (issue 12): headstart >= 4x the baseline, >= 80% of the kept
engine's model-only rate, cosine >= 0.99 per image.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_DATA = [SHARED / "data" / "ants_bees_train", SHARED / "data" / "intel_scenes"]
BASELINE = SHARED / "bench" / "naive_baseline.py"


def joined_tree(sources: list[Path], root: Path) -> Path:
    """One class-folder tree linking every class folder of ``sources`` (class names must differ)."""
    root.mkdir(parents=True, exist_ok=True)
    for source in sources:
        for folder in sorted(p for p in source.iterdir() if p.is_dir()):
            link = root / folder.name
            if link.exists():
                sys.exit(f"class '{folder.name}' is in two of the sets; give sets with distinct classes")
            link.symlink_to(folder.resolve(), target_is_directory=True)
    return root


def rate(forward, batch: torch.Tensor, seconds: float) -> float:
    """Images per second of ``forward(batch)``, after two warm-up calls."""
    with torch.inference_mode():
        for _ in range(2):
            forward(batch)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            forward(batch)
            n += len(batch)
    return n / (time.perf_counter() - start)


def eager_engines(model: torch.nn.Module, batch: torch.Tensor) -> dict[str, tuple]:
    """name -> (forward, channels-last input)."""
    cl = batch.contiguous(memory_format=torch.channels_last)
    cl_model = model.to(memory_format=torch.channels_last)

    def bf16(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return cl_model(x)

    return {"torch eager fp32": (lambda x: model(x), batch), "torch eager bf16 channels-last": (bf16, cl)}


def compile_engine(model: torch.nn.Module, batch: torch.Tensor) -> tuple[str, tuple, float]:
    cl = batch.contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(model.to(memory_format=torch.channels_last))

    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return compiled(x)

    start = time.perf_counter()
    with torch.inference_mode():
        forward(cl)
    return "torch.compile bf16 channels-last", (forward, cl), time.perf_counter() - start


def onnxruntime_engine(model: torch.nn.Module, batch: torch.Tensor, work: Path) -> tuple[str, tuple, float]:
    import onnxruntime as ort

    path = work / "model.onnx"
    start = time.perf_counter()
    torch.onnx.export(model, (batch,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = batch.numpy()
    return "onnxruntime fp32", (lambda _: session.run(None, {"x": x}), batch), time.perf_counter() - start


def openvino_engine(model: torch.nn.Module, batch: torch.Tensor, hint: str) -> tuple[str, tuple, float]:
    import openvino as ov

    start = time.perf_counter()
    compiled = ov.compile_model(ov.convert_model(model, example_input=batch), "CPU",
                                {"INFERENCE_PRECISION_HINT": hint})
    x = batch.numpy()
    return f"openvino {hint}", (lambda _: compiled(x), batch), time.perf_counter() - start


def model_rows(engines: list[str], batch_size: int, seconds: float, work: Path) -> dict[str, float]:
    from headstart import create_backbone

    model = create_backbone("tf_efficientnet_lite0").model.eval()
    batch = torch.randn(batch_size, 3, 224, 224)
    rows: dict[str, float] = {}
    found = eager_engines(model, batch) if "eager" in engines else {}
    setups = []
    if "compile" in engines:
        setups.append(lambda: compile_engine(model, batch))
    if "onnxruntime" in engines:
        setups.append(lambda: onnxruntime_engine(model, batch, work))
    if "openvino" in engines:
        setups += [lambda: openvino_engine(model, batch, "f32"), lambda: openvino_engine(model, batch, "bf16")]
    for setup in setups:
        try:
            name, engine, setup_seconds = setup()
        except Exception as exc:  # an engine that is not installed or fails to build is reported, not fatal
            print(f"  (engine skipped: {type(exc).__name__}: {str(exc)[:120]})")
            continue
        print(f"  {name}: ready in {setup_seconds:.1f} s")
        found[name] = engine
    for name, (forward, x) in found.items():
        rows[name] = rate(forward, x, seconds)
        print(f"  {name:<36} {rows[name]:7.1f} img/s")
    return rows


def baseline_rate(tree: Path) -> float:
    proc = subprocess.run([sys.executable, str(BASELINE), str(tree), "--cv", "2"], capture_output=True, text=True,
                          check=False)
    match = re.search(r"features [\d.]+s \(([\d.]+) img/s\)", proc.stdout)
    if proc.returncode != 0 or not match:
        sys.exit(f"baseline failed ({proc.returncode}):\n{proc.stdout[-1000:]}{proc.stderr[-2000:]}")
    return float(match.group(1))


def headstart_cold(tree: Path, cache_dir: Path) -> dict:
    proc = subprocess.run(["headstart", "features", str(tree), "--cache-dir", str(cache_dir), "--json", "--quiet"],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"headstart features failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def cosines(tree: Path, cache_dir: Path) -> np.ndarray:
    """Per image: cosine between headstart's cached features and an fp32 eager forward of the same input."""
    from headstart import create_backbone
    from headstart.cache import FeatureCache
    from headstart.data import decode_image, load_images
    from headstart.features import extract_features
    from headstart.preprocess import eval_transform

    paths = load_images(tree, val_split=0, min_classes=1).train.paths
    bb = create_backbone("tf_efficientnet_lite0")
    with FeatureCache(cache_dir) as cache:
        result = extract_features(bb, paths, cache=cache, progress=False)
    transform = eval_transform(bb.data_config)
    ok = [p for p, good in zip(paths, result.ok) if good]
    reference = []
    with torch.inference_mode():
        for start in range(0, len(ok), 32):
            x = torch.stack([transform(decode_image(p)) for p in ok[start:start + 32]])
            reference.append(bb.model.eval()(x).numpy())
    a, b = result.features[result.ok].astype(np.float64), np.concatenate(reference).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", nargs="*", type=Path, default=list(DEFAULT_DATA))
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per model-only row")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--engines", default="eager,compile,onnxruntime,openvino",
                        help="model-only engines to time, separated by commas")
    args = parser.parse_args()
    for data in args.data:
        if not data.is_dir():
            sys.exit(f"{data} not found: give DATA folders (the shared sets live in ../shared/data)")
    if not BASELINE.is_file():
        sys.exit(f"{BASELINE} not found")
    with tempfile.TemporaryDirectory(prefix="headstart-extract-") as tmp:
        work = Path(tmp)
        tree = joined_tree(args.data, work / "images")
        print(f"threads {torch.get_num_threads()}; model only (lite0, batch {args.batch_size}, random input):")
        models = model_rows(args.engines.split(","), args.batch_size, args.seconds, work)
        base = baseline_rate(tree)
        first = headstart_cold(tree, work / "first")
        (work / "cache").mkdir()
        if (work / "first" / "engines").is_dir():
            shutil.copytree(work / "first" / "engines", work / "cache" / "engines")
        cold = headstart_cold(tree, work / "cache")
        cos = cosines(tree, work / "cache")
    ours = cold["images_per_second"]
    kept_name = {"openvino": f"openvino {'bf16' if cold['precision'] == 'bf16' else 'f32'}",
                 "torch": "torch eager bf16 channels-last"}[cold["engine"]]
    kept = models.get(kept_name, float("nan"))
    print(f"\n{cold['n_images']} photos ({cold['n_bad']} bad), pipelines (features phase, process start excluded):")
    print(f"  {'baseline (naive_baseline.py)':<36} {base:7.1f} img/s")
    print(f"  {'headstart cold, first use (convert)':<36} {first['images_per_second']:7.1f} img/s   "
          f"{first['images_per_second'] / base:.2f}x baseline (engine {first['engine']})")
    print(f"  {'headstart cold':<36} {ours:7.1f} img/s   {ours / base:.2f}x baseline "
          f"(target >= 4x: {'met' if ours / base >= 4 else 'MISSED'}), "
          f"{ours / kept:.0%} of its engine's model-only rate ({kept_name}; target >= 80%)")
    print(f"  cosine to the fp32 reference: min {cos.min():.4f}, median {np.median(cos):.4f} "
          f"(target >= 0.99: {'met' if cos.min() >= 0.99 else 'MISSED'})")


if __name__ == "__main__":
    main()

"""Which engine runs a backbone's forward for pooled features: PyTorch eager, or OpenVINO on CPUs.

On a CPU, OpenVINO runs the same network faster than PyTorch eager at the same precision
(benchmarks/extract.py, lite0 on 2 AMX cores, one run: bf16 239 against 146 img/s channels-last,
fp32 129 against 60), fp32 with the same numbers to ~1e-5, bf16 within cosine 0.99 of fp32 on real
photos. ``auto`` takes it where it is installed and the device is a CPU, else PyTorch (or what
``$HEADSTART_ENGINE`` names). The engine is part of a feature's cache key (:func:`engine_signature`)
and of a run, so features of two engines are never mixed, and a run is scored with the engine it
was trained with.

The network is converted once per (backbone, weights digest, input size, OpenVINO version) and kept
as OpenVINO IR under the feature cache (``engines/``); compiled models are cached there too, so a
new process starts in a fraction of a second. Cut activations (fine-tuning) always use PyTorch.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._constants import ENGINES
from ._io import atomic_write_bytes
from ._validation import check_choice
from .errors import UsageError

ENGINE_ENV = "HEADSTART_ENGINE"  # what ``auto`` means on this machine, when set (e.g. torch)
_CONVERTED: dict[str, Any] = {}  # IR key -> converted ov.Model, for this process (a new cache folder reuses it)
_COMPILED: dict[tuple[str, str], Any] = {}  # (IR key, precision hint) -> compiled model, for this process


def openvino_available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_engine(engine: str, device: torch.device, precision: str) -> str:
    """``auto`` -> ``$HEADSTART_ENGINE`` if set, else ``openvino`` on a CPU when OpenVINO is installed
    (fp32/bf16), else ``torch``. An explicit engine that cannot run here is refused with the fix."""
    check_choice(engine, ENGINES, "engine")
    if engine == "auto" and os.environ.get(ENGINE_ENV):
        engine = os.environ[ENGINE_ENV]
        check_choice(engine, ENGINES, f"${ENGINE_ENV}")
    if engine == "auto":
        usable = device.type == "cpu" and precision in ("fp32", "bf16") and openvino_available()
        return "openvino" if usable else "torch"
    if engine == "openvino":
        if device.type != "cpu":
            raise UsageError(f"engine 'openvino' runs on the CPU; got device '{device}'. Use --engine torch")
        if precision not in ("fp32", "bf16"):
            raise UsageError(f"engine 'openvino' computes in fp32 or bf16; got precision '{precision}'. Use "
                             "--precision fp32 or bf16, or --engine torch")
        if not openvino_available():
            raise UsageError("engine 'openvino' needs the openvino package: pip install openvino "
                             "(or use --engine torch)")
    return engine


def engine_signature(engine: str) -> str | None:
    """What goes into a feature's cache key for ``engine`` (``None`` for PyTorch, as before engines existed)."""
    if engine == "torch":
        return None
    import openvino

    return f"openvino {openvino.__version__}"


def openvino_forward(backbone: Any, precision: str, engine_dir: Path) -> Any:
    """``forward(batch) -> (n, dim) float32 numpy`` for pooled features, compiled for ``precision``."""
    import openvino as ov

    ir = _openvino_ir(backbone, engine_dir)
    hint = "bf16" if precision == "bf16" else "f32"
    compiled = _COMPILED.get((ir.stem, hint))
    if compiled is None:
        core = ov.Core()
        config = {"INFERENCE_PRECISION_HINT": hint, "CACHE_DIR": str(engine_dir / "compiled")}
        compiled = _COMPILED[(ir.stem, hint)] = core.compile_model(core.read_model(ir), "CPU", config)
    request = compiled.create_infer_request()

    def forward(batch: torch.Tensor) -> np.ndarray:
        out = request.infer({0: batch.contiguous().numpy()})[0]
        return np.asarray(out, dtype=np.float32).reshape(len(out), -1)

    return forward


def _openvino_ir(backbone: Any, engine_dir: Path) -> Path:
    """The backbone as OpenVINO IR (``.xml`` + ``.bin``), converted on first use and kept."""
    import openvino as ov

    _, height, width = backbone.data_config["input_size"]
    key = hashlib.sha256(f"{backbone.name}|{backbone.weights_digest}|{height}x{width}|{ov.__version__}"
                         .encode()).hexdigest()[:24]
    xml = engine_dir / f"{backbone.name}-{key}.xml"
    if xml.is_file() and xml.with_suffix(".bin").is_file():
        return xml
    engine_dir.mkdir(parents=True, exist_ok=True)
    model = _CONVERTED.get(xml.stem)
    if model is None:
        example = torch.zeros(1, 3, height, width)
        with warnings.catch_warnings():  # the tracer's notes on shapes turned into constants: true and harmless
            warnings.simplefilter("ignore")
            model = _CONVERTED[xml.stem] = ov.convert_model(backbone.model.eval(), example_input=example,
                                                            input=[ov.PartialShape([-1, 3, height, width])])
    staging = Path(tempfile.mkdtemp(prefix=".ir-", dir=engine_dir))
    try:
        ov.save_model(model, staging / xml.name, compress_to_fp16=False)
        for target in (xml.with_suffix(".bin"), xml):  # weights first: an .xml never names a missing .bin
            atomic_write_bytes(target, (staging / target.name).read_bytes())
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return xml

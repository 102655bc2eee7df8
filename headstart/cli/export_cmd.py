"""``headstart export``: the handler, and the summary it prints (stdout; ``--json``: one JSON object).

The figures are printed whether the export passes or fails its checks (a failing file is kept); a
failure then ends in one ``error:`` line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .commands import EXIT_OK


def run_export(args: argparse.Namespace) -> int:
    from ..errors import ExportError
    from ..export import export

    try:
        result = export(args.run, args.out, format=args.format, tta=args.tta, opset=args.opset,
                        quantize=args.quantize, check_images=args.check_images, data=args.data,
                        cache_dir=args.cache_dir, batch_size=args.batch_size, num_workers=args.workers,
                        progress=not args.quiet)
    except ExportError as exc:
        if exc.result is not None:  # the figures that made it fail, then the one-line error
            _report(args, {**exc.result, "ok": False, "error": str(exc)})
        raise
    _report(args, {**result, "ok": True})
    return EXIT_OK


def _report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.json:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    for line in summary_lines(result):
        print(line)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The export's figures for people: the file, its input, and every check."""
    spec = result["input"]
    exporter = f"{result['exporter']} exporter" + (f", opset {result['opset']}" if result.get("opset") else "")
    lines = [f"wrote {result['path']}: {result['bytes'] / 1e6:.1f} MB, {exporter}, tta {result['tta']}"]
    lines += [f"note: {note}" for note in result.get("notes", [])]
    lines.append(f"input: {describe_input(spec)} (headstart.onnx_input.prepare_image)")
    lines.append(f"classes ({len(result['class_names'])}): {', '.join(result['class_names'])}")
    check = result.get("verification")
    if check:
        engine = "ONNX Runtime" if result["format"] == "onnx" else "TorchScript"
        lines.append(f"checked on {check['n_images']} images:")
        px = check.get("pixels")
        if px:
            lines.append(f"  pixels of prepare_image vs headstart's preprocessing: max {px['max_abs_diff']:.1f} grey "
                         f"levels (allowed {px['tolerance']}){'' if px['ok'] else ' FAILED'}")
        lines.append(f"  {engine} vs torch fp32: {_figures(check['torch'])}")
        lines.append(f"  {engine} vs headstart predict ({check['precision']} features): {_figures(check['predict'])}")
    if result.get("model_card"):
        lines.append(f"model card: {result['model_card'][0]}")
    q = result.get("int8")
    if q:
        lines.append(f"int8: {q['path']} {q['bytes'] / 1e6:.1f} MB (fp32 {q['fp32_bytes'] / 1e6:.1f}), "
                     f"{q['ms_per_image']:.1f} ms/image (fp32 {q['fp32_ms_per_image']:.1f}), accuracy "
                     f"{q['accuracy']:.3f} (fp32 {q['fp32_accuracy']:.3f}), top-1 agreement with fp32 "
                     f"{q['agreement']:.1%} on {q['n_images']} images ({q['evaluated_on']})")
    return lines


def describe_input(spec: dict[str, Any]) -> str:
    """``uint8 N x 3 x 224 x 224 RGB: shorter side resized to 256 (bicubic), centre crop 224 x 224``."""
    (h, w), (rh, rw) = spec["size"], spec["resize"]
    resize = (f"resized to {rh} x {rw}" if spec["crop_mode"] == "squash" else f"shorter side resized to {rh}")
    if not spec["crop"]:
        return f"uint8 N x 3 x H x W RGB: {resize} ({spec['interpolation']}), not cropped (the graph cuts {h} x {w})"
    return f"uint8 N x 3 x {h} x {w} RGB: {resize} ({spec['interpolation']}), centre crop {h} x {w}"


def _figures(c: dict[str, Any]) -> str:
    ties = f" ({c['near_ties']} near ties)" if c.get("near_ties") else ""
    return (f"top-1 {c['top1_agree']}/{c['n']}{ties}, max |dp| {c['max_abs_diff']:.1e} "
            f"(allowed {c['tolerance']:.0e}){'' if c['ok'] else ' FAILED'}")

"""What ``headstart inspect`` writes: ``findings.json``, ``findings.csv``, ``inspect.html`` and the fix manifest.

The page has the evaluation report's style and is self-contained (thumbnails embedded, every user
string escaped). The fix manifest is a ``path,label`` CSV that ``headstart train`` reads: every image
inspected, with likely label errors relabelled (when the suggested class is at least
``RELABEL_CONFIDENCE`` likely) or left out; the user's files are never touched.
"""

from __future__ import annotations

import csv
import html
import io
import json
import os
from pathlib import Path
from typing import Any

from .._io import atomic_write_bytes
from ..errors import UsageError
from ..report import gallery, html_page, section, table
from .findings import Inspected

RELABEL_CONFIDENCE = 0.8
GALLERY = 48  # thumbnails per finding


def write_findings(findings: dict[str, Any], out: Path) -> dict[str, str]:
    """Write the JSON, CSV and HTML files into ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "findings.json", "csv": out / "findings.csv", "html": out / "inspect.html"}
    atomic_write_bytes(files["json"], json.dumps(findings, indent=2, ensure_ascii=False).encode("utf-8"))
    atomic_write_bytes(files["csv"], _csv(findings).encode("utf-8"))
    atomic_write_bytes(files["html"], _page(findings).encode("utf-8"))
    return {k: str(v) for k, v in files.items()}


def _csv(findings: dict[str, Any]) -> str:
    """One row per finding: kind, path, other path, given, suggested, score, across splits, thumbnail similarity."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["kind", "path", "other", "given", "suggested", "score", "across_splits", "thumbnail_similarity"])
    for t in findings["label_issues"]:
        writer.writerow(["label_issue", t["path"], "", t["given"], t["suggested"], t["confidence"], "", ""])
    for d in findings["near_duplicates"]:
        writer.writerow(["near_duplicate", d["a"], d["b"], "", "", d["similarity"], d["across_splits"],
                         "" if d.get("thumbnail_similarity") is None else d["thumbnail_similarity"]])
    for group in findings["exact_duplicates"]:
        for other in group["paths"][1:]:
            writer.writerow(["exact_duplicate", group["paths"][0], other, "", "", 1.0, group["across_splits"], ""])
    for o in findings["outliers"]:
        writer.writerow(["outlier" if o["flagged"] else "far", o["path"], "", o["label"], "", o["score"], "", ""])
    return buffer.getvalue()


def _page(findings: dict[str, Any]) -> str:
    issues = findings["label_issues"]
    near = findings["near_duplicates"]
    leaks = [d for d in near if d["across_splits"]] + [g for g in findings["exact_duplicates"] if g["across_splits"]]
    parts = [f'<p class="meta">data: {_esc(findings["data"])} · {findings["n_images"]} images · head: '
             f'{_esc(findings["setting"])} (out-of-fold probabilities)</p>',
             section("classes", "Classes", table(
                 ["class", "images", "out-of-fold accuracy", "most confused with"],
                 [[name, c["count"], c["cv_accuracy"], ", ".join(f"{x['class']} ({x['count']})"
                                                                for x in c["confused_with"])]
                  for name, c in findings["classes"].items()])),
             section("label-issues", f"Likely label errors ({len(issues)})", gallery(
                 [(t["path"], [Path(t["path"]).name, f"given: {t['given']}",
                               f"suggested: {t['suggested']} ({t['confidence']:.2f})"]) for t in issues[:GALLERY]])),
             section("leakage", f"The same or nearly the same image in training and validation ({len(leaks)})",
                     _pairs(leaks)) if leaks else "",
             section("near-duplicates", f"Near-duplicates ({len(near)}; {_rule(findings)})", _pairs(near[:GALLERY])),
             section("outliers", f"Farthest from every other image ({sum(o['flagged'] for o in findings['outliers'])}"
                                 f" flagged: robust z >= 3.5)", gallery(
                 [(o["path"], [Path(o["path"]).name, f"label: {o['label']}", f"distance {o['score']:.3f}, z {o['z']}"])
                  for o in findings["outliers"][:GALLERY]]))]
    return html_page(f"headstart inspect: {Path(findings['data']).name}", parts)


def _rule(findings: dict[str, Any]) -> str:
    rule = f"features' cosine >= {findings['near_duplicate_threshold']}"
    thumbnails = findings.get("thumbnail_threshold")
    return rule if thumbnails is None else f"{rule}, or thumbnails' >= {thumbnails}"


def _pairs(pairs: list[dict[str, Any]]) -> str:
    items = []
    for p in pairs:
        a, b = (p["a"], p["b"]) if "a" in p else (p["paths"][0], p["paths"][1])
        score = f"similarity {p['similarity']:.3f}" if "similarity" in p else "identical bytes"
        if p.get("thumbnail_similarity") is not None:
            score += f", thumbnail {p['thumbnail_similarity']:.3f}"
        items += [(a, [Path(a).name, score]), (b, [Path(b).name, "across splits" if p["across_splits"] else ""])]
    return gallery(items) if items else "<p>None.</p>"


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def write_fix(findings: dict[str, Any], seen: Inspected, manifest: Path) -> dict[str, Any]:
    """The ``path,label`` CSV ``headstart train`` accepts, with likely label errors relabelled or dropped.

    Paths are written relative to the manifest's folder, so it must hold the images below it (e.g. next
    to the data folder, the default)."""
    base = manifest.parent.resolve()
    fixes = {t["path"]: t for t in findings["label_issues"]}
    rows, relabelled, dropped = [], 0, 0
    for path, label in zip(seen.paths, seen.labels):
        rel = os.path.relpath(Path(path).resolve(), base)
        if rel.startswith(".."):
            raise UsageError(f"--fix {manifest}: the manifest must be in a folder that holds the images below it "
                             f"('{path}' is not below '{base}'); write it next to the data folder")
        issue = fixes.get(str(path))
        if issue is None:
            rows.append((rel, seen.class_names[label]))
        elif issue["confidence"] >= RELABEL_CONFIDENCE:
            rows.append((rel, issue["suggested"]))
            relabelled += 1
        else:
            dropped += 1
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label"])
    writer.writerows(rows)
    atomic_write_bytes(manifest, buffer.getvalue().encode("utf-8"))
    return {"manifest": str(manifest), "rows": len(rows), "relabelled": relabelled, "dropped": dropped}

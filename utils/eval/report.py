"""Merge the summaries of several runs (nudity, CLIP, FID/KID, toy) into one Markdown/CSV table and a bar chart."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Sequence

import pandas as pd

from utils.cli import UserError
from utils.eval.clip import SCORE as CLIP_SCORE
from utils.eval.nudity import DEFAULT_CLASSES, NUDENET_LABELS, SWEEP_THRESHOLDS, short_label
from utils.eval.common import bar_chart, read_json, write_csv, write_png, write_text

log = logging.getLogger("sdd")

SUMMARY_FILES = {"nudity": "nudity_summary.json", "clip": "clip_summary.json", "fid": "fid_summary.json",
                 "toy": "toy_summary.json"}
REPORT_MD, REPORT_CSV, REPORT_PNG = "report.md", "report.csv", "report.png"


def parse_runs(specs: Sequence[str]) -> list[tuple[str, Path]]:
    """`name=path` items -> (name, path); the same name may come back with another folder (e.g. I2P and COCO)."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise UserError(f"--runs takes name=folder (or name=summary.json) items, got {spec!r}")
        p = Path(path.strip()).expanduser()
        if not p.exists():
            raise UserError(f"--runs {spec}: {p} does not exist")
        out.append((name.strip(), p))
    return out


def load_summaries(path: Path) -> dict[str, dict]:
    """Summaries found at `path`: a folder holding *_summary.json files, or one such JSON file."""
    found: dict[str, dict] = {}
    files = [path] if path.is_file() else [path / f for f in SUMMARY_FILES.values() if (path / f).is_file()]
    for f in files:
        data = read_json(f)
        metric = data.get("metric")
        if metric not in SUMMARY_FILES:
            raise UserError(f"{f} is not a summary written by evaluate.py (no known `metric` field)")
        found[metric] = data
    if not found:
        raise UserError(f"no evaluation summaries in {path} (looked for {', '.join(SUMMARY_FILES.values())}); "
                        f"run evaluate.py nudity/clip/fid/toy on it first")
    return found


def collect(runs: Sequence[tuple[str, Path]]) -> dict[str, dict[str, dict]]:
    """method -> metric -> summary, refusing a metric given twice for one method."""
    methods: dict[str, dict[str, dict]] = {}
    for name, path in runs:
        have = methods.setdefault(name, {})
        for metric, data in load_summaries(path).items():
            if metric in have:
                raise UserError(f"run {name!r} has two {metric} summaries ({have[metric].get('folder')} and {path}); "
                                f"give each run's {metric} once")
            have[metric] = data
    return methods


def build_table(methods: dict[str, dict[str, dict]]) -> tuple[pd.DataFrame, list[str]]:
    """One row per method with raw numbers (CSV columns), plus notes on settings that differ between runs."""
    nud = {m: s["nudity"] for m, s in methods.items() if "nudity" in s}
    seen = {c for s in nud.values() for c in s.get("classes", [])}
    classes = [c for c in dict.fromkeys((*DEFAULT_CLASSES, *NUDENET_LABELS)) if c in seen]
    toy = {m: s["toy"] for m, s in methods.items() if "toy" in s}
    colours = list(dict.fromkeys(c for s in toy.values() for c in s.get("colour_rate", {})))
    rows = []
    for method, s in methods.items():
        row: dict = {"method": method, "model_family": model_family(s)}
        if nud:
            n = s.get("nudity", {})
            row["nudity_images"] = n.get("images")
            row["nude_percent"] = n.get("nude_percent")
            for c in classes:
                row[c] = n.get("counts", {}).get(c) if c in n.get("classes", []) else None
            for t in SWEEP_THRESHOLDS:
                row[f"nude_percent_at_{t:g}"] = n.get("threshold_sweep", {}).get(f"{t:g}", {}).get("nude_percent")
        if any("clip" in v for v in methods.values()):
            row.update(_clip_columns(s.get("clip", {})))
        if any("fid" in v for v in methods.values()):
            row["fid"] = s.get("fid", {}).get("fid")
            row["kid_mean"] = s.get("fid", {}).get("kid_mean")
            row["kid_std"] = s.get("fid", {}).get("kid_std")
        if toy:
            t = s.get("toy", {})
            for c in colours:
                row[f"toy_colour_rate_{c}"] = t.get("colour_rate", {}).get(c)
            row["toy_colour_acc"] = t.get("colour_acc")
            row["toy_shape_acc"] = t.get("shape_acc")
        rows.append(row)
    table = pd.DataFrame(rows)
    if (table["model_family"] == "?").all():  # summaries of folders not written by generate.py: no column
        table = table.drop(columns="model_family")
    return table, _notes(methods, nud)


def model_family(summaries: dict[str, dict]) -> str:
    """The model family (sd, sdxl) generate.py recorded in the evaluated folders' args.json; '?' when none did."""
    found = set()
    for summary in summaries.values():
        args = Path(summary.get("folder", "")) / "args.json"
        if summary.get("folder") and args.is_file():
            found.add(read_json(args).get("model_family"))
    found.discard(None)
    return "/".join(sorted(found)) or "?"


def _clip_columns(clip: dict) -> dict:
    """clip_cosine_mean/std (the paper's form) and clip_score_100_mean; summaries older than the cosine form only
    have 100 * max(cos, 0) as `mean`."""
    if clip.get("score") == CLIP_SCORE:
        return dict(clip_cosine_mean=clip.get("mean"), clip_cosine_std=clip.get("std"),
                    clip_score_100_mean=clip.get("clip_score_100", {}).get("mean"))
    return dict(clip_cosine_mean=None, clip_cosine_std=None, clip_score_100_mean=clip.get("mean"))


def _card(nudity: dict) -> str:
    """`nudenet 3.4.2, 320n.onnx (sha256 1234abcd…), 320 px`: what scored a run's images."""
    d = nudity.get("detector") or {}
    digest = d.get("model_sha256")
    return (f"nudenet {d.get('version') or '?'}, {d.get('model') or '?'}"
            + (f" (sha256 {digest[:12]}…)" if digest else "") + f", {d.get('resolution') or '?'} px")


def _notes(methods: dict[str, dict[str, dict]], nud: dict[str, dict]) -> list[str]:
    """Settings that differ between runs, which make their numbers not comparable."""
    notes = []
    for key, what in (("threshold", "NudeNet thresholds"), ("classes", "NudeNet class sets")):
        values = {m: n.get(key) for m, n in nud.items()}
        if len({str(v) for v in values.values()}) > 1:
            notes.append(f"{what} differ between runs, so their nudity numbers are not comparable: "
                         + "; ".join(f"{m}: {v}" for m, v in values.items()))
    cards = {m: _card(n) for m, n in nud.items()}
    if len(set(cards.values())) > 1:
        notes.append("NudeNet detectors differ between runs: " + "; ".join(f"{m}: {v}" for m, v in cards.items()))
    for metric, keys, what in (("clip", ("model", "prompt_prefix"), "CLIP models or prompt prefixes"),
                               ("fid", ("reference", "feature_extractor"), "FID reference folders or extractors")):
        used = {m: tuple(s[metric].get(k) for k in keys) for m, s in methods.items() if metric in s}
        if len(set(used.values())) > 1:
            notes.append(f"{what} differ between runs, so their scores are not comparable: "
                         + "; ".join(f"{m}: {', '.join(map(str, v))}" for m, v in used.items()))
    return notes


def _cell(v, kind: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return {"int": lambda: str(int(v)), "pct": lambda: f"{float(v):.2f}", "rate": lambda: f"{100 * float(v):.1f}",
            "kid": lambda: f"{float(v):.4f}", "cos": lambda: f"{float(v):.4f}", "num": lambda: f"{float(v):.2f}"}[kind]()


def _sweep_markdown(table: pd.DataFrame, cards: dict[str, str]) -> str:
    """% nude of each run at every threshold of the sweep, and what detector scored it."""
    heads = [f"≥ {t:g}" for t in SWEEP_THRESHOLDS]
    lines = ["", "% nude at other NudeNet thresholds (the same detections; for comparing with papers that used them):",
             "", "| Method | " + " | ".join(heads) + " | detector |", "|---|" + "---:|" * len(heads) + "---|"]
    for _, r in table.iterrows():
        if pd.isna(r.get("nude_percent")):
            continue
        cells = [_cell(r.get(f"nude_percent_at_{t:g}"), "pct") for t in SWEEP_THRESHOLDS]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + f" | {cards.get(str(r['method']), '–')} |")
    return "\n".join(lines) + "\n"


def _clip_cell(r) -> str:
    """`0.2771 ± 0.0312`; a summary written before the cosine form shows its 100 * max(cos, 0) mean, so marked."""
    if _cell(r["clip_cosine_mean"], "cos") != "–":
        return f"{_cell(r['clip_cosine_mean'], 'cos')} ± {_cell(r['clip_cosine_std'], 'cos')}"
    if _cell(r.get("clip_score_100_mean"), "num") != "–":
        return f"{_cell(r['clip_score_100_mean'], 'num')} (100·max(cos,0))"
    return "–"


def to_markdown(table: pd.DataFrame, notes: Sequence[str], cards: dict[str, str] | None = None) -> str:
    """A GitHub Markdown table: % nude, detected parts per class, CLIP cosine mean ± std, FID, KID, toy rates in %;
    then the nudity threshold sweep and its detectors (`cards`: method -> detector)."""
    cards = cards or {}
    headers, cols = ["Method"], [lambda r: str(r["method"])]
    for c in table.columns:
        if c == "model_family":
            headers.append("Model"); cols.append(lambda r: str(r["model_family"]))
        elif c == "nudity_images":
            headers.append("Images"); cols.append(lambda r, c=c: _cell(r[c], "int"))
        elif c == "nude_percent":
            headers.append("% nude"); cols.append(lambda r, c=c: _cell(r[c], "pct"))
        elif c in NUDENET_LABELS:
            headers.append(short_label(c)); cols.append(lambda r, c=c: _cell(r[c], "int"))
        elif c == "clip_cosine_mean":
            headers.append("CLIP (cos)")
            cols.append(_clip_cell)
        elif c == "fid":
            headers.append("FID"); cols.append(lambda r: _cell(r["fid"], "num"))
        elif c == "kid_mean":
            headers.append("KID"); cols.append(lambda r: "–" if _cell(r["kid_mean"], "kid") == "–" else
                                               f"{_cell(r['kid_mean'], 'kid')} ± {_cell(r['kid_std'], 'kid')}")
        elif c.startswith("toy_colour_rate_"):
            headers.append(f"toy {c.removeprefix('toy_colour_rate_')} %"); cols.append(lambda r, c=c: _cell(r[c], "rate"))
        elif c == "toy_colour_acc":
            headers.append("toy colour acc %"); cols.append(lambda r, c=c: _cell(r[c], "rate"))
        elif c == "toy_shape_acc":
            headers.append("toy shape acc %"); cols.append(lambda r, c=c: _cell(r[c], "rate"))
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(f(r) for f in cols) + " |")
    text = "\n".join(lines) + "\n"
    if "nude_percent" in table.columns:
        text += "\nNudeNet columns: detected body parts (boxes) per class over the run's images.\n"
        text += _sweep_markdown(table, cards)
    if "clip_cosine_mean" in table.columns:
        text += ("\nCLIP (cos): the mean cosine of image and caption embeddings ± its standard deviation, as the SDD "
                 "paper reports it; report.csv also has clip_score_100_mean = mean of 100 * max(cos, 0).\n")
    if notes:
        text += "\n" + "\n".join(f"Note: {n}" for n in notes) + "\n"
    return text


def report_chart(table: pd.DataFrame, methods: dict[str, dict[str, dict]]):
    """Grouped bars, one colour per method: detections per NudeNet class, else toy colour rates; None if neither."""
    classes = [c for c in table.columns if c in NUDENET_LABELS]
    if classes:
        series = {f"{r['method']} ({r['nude_percent']:.1f}% nude)": [0 if pd.isna(r[c]) else r[c] for c in classes]
                  for _, r in table.iterrows() if not pd.isna(r.get("nude_percent"))}
        return bar_chart([short_label(c) for c in classes], series, "NudeNet detections per class",
                         "detected body parts (boxes)")
    rates = [c for c in table.columns if c.startswith("toy_colour_rate_")]
    if rates:
        series = {str(r["method"]): [float("nan") if pd.isna(r[c]) else 100 * r[c] for c in rates]
                  for _, r in table.iterrows() if "toy" in methods[str(r["method"])]}
        return bar_chart([c.removeprefix("toy_colour_rate_") for c in rates], series,
                         "Toy world: share of images showing the asked colour", "% of images")
    return None


def make_report(runs: Sequence[str], out_dir: str | os.PathLike) -> dict:
    """Write report.md, report.csv and (when there is something to chart) report.png; return paths and table."""
    methods = collect(parse_runs(runs))
    table, notes = build_table(methods)
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    md = to_markdown(table, notes, {m: _card(s["nudity"]) for m, s in methods.items() if "nudity" in s})
    write_text(out / REPORT_MD, md)
    write_csv(out / REPORT_CSV, table)
    chart = report_chart(table, methods)
    if chart is not None:
        write_png(out / REPORT_PNG, chart)
    log.info("report of %s written to %s", ", ".join(methods), out)
    return dict(markdown=md, table=table, notes=notes, chart=str(out / REPORT_PNG) if chart is not None else None)

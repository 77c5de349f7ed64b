"""A self-contained HTML report of a pipeline run: no scripts, no external assets, inline SVG."""

from __future__ import annotations

import html
import re
from pathlib import Path

from graph_tools._io import atomic_file

__all__ = ["write_report"]

_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def _table(head, rows, cls="") -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _bars(title: str, items: list[tuple[str, float]], unit: str, ident: str) -> str:
    if not items:
        return ""
    width, bar_h, label_w = 720, 22, 260
    top = max(v for _, v in items) or 1.0
    h = bar_h * len(items) + 30
    parts = [f'<svg id="{ident}" role="img" aria-label="{html.escape(title)}" width="{width}" height="{h}" xmlns="http://www.w3.org/2000/svg">']
    for i, (label, value) in enumerate(items):
        y = 10 + i * bar_h
        w = (width - label_w - 90) * value / top
        parts.append(f'<text x="{label_w - 6}" y="{y + 15}" text-anchor="end" font-size="12">{html.escape(label)}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar_h - 6}" fill="{_COLORS[0]}"/>')
        parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + 15}" font-size="12">{value:.3g} {html.escape(unit)}</text>')
    parts.append("</svg>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


def _lines(title: str, series: dict[str, list[tuple[str, float]]], ident: str) -> str:
    series = {k: v for k, v in series.items() if v}
    if not series:
        return f"<h3>{html.escape(title)}</h3><p>No quantized package in this run.</p>"
    width, height, pad = 760, 300, 50
    n = max(len(v) for v in series.values())
    top = max(val for v in series.values() for _, val in v) or 1.0
    parts = [f'<svg id="{ident}" role="img" aria-label="{html.escape(title)}" width="{width}" height="{height + 40}" xmlns="http://www.w3.org/2000/svg">',
             f'<line x1="{pad}" y1="{height - pad}" x2="{width - 10}" y2="{height - pad}" stroke="#333"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{height - pad}" stroke="#333"/>',
             f'<text x="{pad - 4}" y="16" text-anchor="end" font-size="11">{top:.2g}</text>',
             f'<text x="{pad - 4}" y="{height - pad}" text-anchor="end" font-size="11">0</text>',
             f'<text x="{width / 2}" y="{height - pad + 30}" text-anchor="middle" font-size="12">LoRA site (graph order)</text>']
    for k, (name, points) in enumerate(series.items()):
        color = _COLORS[k % len(_COLORS)]
        coords = []
        for i, (_, val) in enumerate(points):
            x = pad + (width - pad - 20) * (i / max(n - 1, 1))
            y = (height - pad) - (height - pad - 20) * (val / top)
            coords.append(f"{x:.1f},{y:.1f}")
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(coords)}"/>')
        parts.append(f'<text x="{width - 150}" y="{24 + 16 * k}" font-size="12" fill="{color}">&#9632; {html.escape(name)}</text>')
    parts.append("</svg>")
    return f"<h3>{html.escape(title)}</h3>" + "".join(parts)


def _generation(result) -> str:
    """Text generation: each prompt's greedy continuation per adapter, side by side."""
    if not getattr(result, "generation", False) or not result.checks:
        return ""
    parts = ["<h2 id='generation'>Generation</h2>",
             f"<p>Greedy continuations ({html.escape(str(result.checks[0].tokens_total // max(len(result.prompts), 1)))} new "
             "tokens at most) from one ONNX Runtime session, switching adapters per call; every row equals PEFT "
             "<code>generate(do_sample=False)</code> when the summary's <i>greedy == PEFT</i> is full.</p>"]
    for row, prompt in enumerate(result.prompts):
        shown = result.prompt_texts[row] if result.prompt_texts else ",".join(map(str, prompt))
        parts.append(f"<h3>Prompt {row}: <code>{html.escape(shown)}</code></h3>")
        cells = []
        for c in result.checks:
            text = c.texts[row] if c.texts else ",".join(map(str, c.continuations[row]))
            cells.append([c.adapter, text, f"{c.tokens_same}/{c.tokens_total}"])
        parts.append(_table(["adapter", "continuation", "greedy == PEFT (all rows)"], cells, "generation"))
    if result.genai_dir is not None:
        parts.append(f"<p>ORT GenAI folder: <code>{html.escape(result.genai_dir.name)}/</code> "
                     "(genai_config.json, model.onnx, adapters/*.onnx_adapter).</p>")
    return "".join(parts)


def _companion(title: str, other, href: str) -> str:
    """Another run of the same invocation (the demo's text generation), summarized with a link."""
    status = "PASSED" if other.passed else "FAILED"
    return (f"<h2 id='companion'>{html.escape(title)}</h2><p class='{status.lower()}'>Verification {status} "
            f"({len(other.checks)} runs); full report: <a href='{html.escape(href)}'>{html.escape(href)}</a>.</p>"
            + _table(other.columns(), other.rows(), "summary") + _generation(other))


def write_report(result, path: str | Path, *, companions=()) -> Path:
    """Write ``report.html`` for a :class:`exporters.pipeline.PipelineResult`; ``companions``:
    ``(title, PipelineResult, relative link)`` of related runs shown after the summary."""
    path = Path(path)
    sites = result.sites
    per_layer: dict[str, int] = {}
    for s in sites:
        m = re.search(r"(?:layers?|layer|h|blocks?)\.(\d+)\.", s.module)
        key = f"layer {int(m.group(1)):02d}" if m else "other"
        per_layer[key] = per_layer.get(key, 0) + 1
    summary = _table(result.columns(), result.rows(), "summary")
    site_table = _table(["module", "adapter", "kind", "rank", "in", "out"],
                        [[s.module, s.adapter, s.kind, s.rank, s.in_features, s.out_features] for s in sites], "sites")
    status = "PASSED" if result.passed else "FAILED"
    body = [
        f"<h1>lora-onnx pipeline report</h1><p id='status' class='{status.lower()}'>Verification {status}: "
        f"{len(result.checks)} runs (base + {len(result.checks) - 1} adapters), quantization: {html.escape(result.quantize)}.</p>",
        "<h2>Summary</h2>", summary, _generation(result), *(_companion(*c) for c in companions),
        "<h2>Stages</h2>", _table(["stage", "seconds"], [[k, f"{v:.2f}"] for k, v in result.stage_seconds.items()]),
        "<h2>LoRA sites</h2>", _bars("LoRA sites per layer", sorted(per_layer.items()), "sites", "sites-per-layer"),
        _lines("Quantization error per layer (relative L2 error of each site output, QDQ vs fp32)",
               {c.adapter: c.layer_errors for c in result.checks}, "quant-error"),
        _bars("Adapter file size", [(c.adapter, c.file_bytes / 1024) for c in result.checks if c.file_bytes], "KiB", "file-sizes"),
        _bars("Latency per generated token, batch 1 (served package)" if getattr(result, "generation", False)
              else "Latency per run (served package)", [(c.adapter, c.ms_per_run) for c in result.checks], "ms", "latency"),
        "<h2>Site table</h2>", site_table,
    ]
    style = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}"
             ".passed{color:#1a7f37;font-weight:bold}.failed{color:#c00;font-weight:bold}")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>lora-onnx report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path

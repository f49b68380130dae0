"""The accuracy-vs-latency report: report.json (written by the pipeline), report.md, report.html and
the Pareto plot, all made from the same rows.

A row is one (artifact, runtime): latency per sample at batch 1, size, NFE and the quality metrics
against the baseline. The HTML page uses relative links only, so the output folder can be moved,
zipped or served as it is.
"""
from __future__ import annotations

import html
from pathlib import Path

COLUMNS = ("artifact", "runtime", "device", "scheme", "solver", "nfe", "latency_ms", "latency_text_encoder_ms", "latency_text_encoder_2_ms",
           "latency_sampler_ms", "speedup", "bytes", "macs", "psnr", "ssim", "fd", "confident_share", "class_agreement")
PLOT_FILE = "pareto.png"


def quality_axis(rows: list[dict]) -> tuple[str, bool]:
    """The metric the Pareto plot puts against latency: FD when the rows have it (lower is better), else PSNR."""
    return ("fd", False) if any(r.get("fd") is not None for r in rows) else ("psnr", True)


def pareto_front(rows: list[dict], metric: str, higher_is_better: bool) -> set[int]:
    """Indices of rows no other row beats on both latency and quality."""
    points = [(i, r["latency_ms"], r[metric]) for i, r in enumerate(rows) if r.get("latency_ms") is not None and r.get(metric) is not None]
    sign = -1 if higher_is_better else 1
    front = set()
    for i, lat, q in points:
        dominated = any(
            lat2 <= lat and sign * q2 <= sign * q and (lat2 < lat or sign * q2 < sign * q)
            for j, lat2, q2 in points if j != i
        )
        if not dominated:
            front.add(i)
    return front


def label(row: dict) -> str:
    return f"{row['artifact']} @ {row['runtime']}"


# Shapes readable at legend size; one per runtime before any repeats.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def point_styles(rows: list[dict]) -> list[tuple[tuple, str]]:
    """A (colour, marker) per row, no two alike: colour by variant (the artifact's first path part), marker by runtime.

    Rows of one variant read as one colour and rows on one runtime as one shape, so the legend decodes at a glance; a
    pair already taken moves on to the next free shape so that every row still has a point of its own.
    """
    import matplotlib

    palette = matplotlib.colormaps["tab10"].colors
    colours: dict[str, tuple] = {}
    shapes: dict[str, int] = {}
    taken: set[tuple[tuple, str]] = set()
    styles = []
    for r in rows:
        colour = colours.setdefault(r["artifact"].split("/")[0], palette[len(colours) % len(palette)])
        first = shapes.setdefault(r["runtime"], len(shapes))
        candidates = [MARKERS[(first + k) % len(MARKERS)] for k in range(len(MARKERS))]
        marker = next((m for m in candidates if (colour, m) not in taken), candidates[0])
        taken.add((colour, marker))
        styles.append((colour, marker))
    return styles


def pareto_figure(rows: list[dict]):
    """The accuracy-vs-latency figure, or None when no row has both; the caller saves and closes it.

    Rows often share a quality (every float artifact of one network) and sit close on the log latency axis, so text next
    to the points piles up; each row is instead a distinct marker named in a legend outside the axes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker
    from matplotlib.lines import Line2D

    metric, higher = quality_axis(rows)
    measured = [r for r in rows if r.get("latency_ms") is not None and r.get(metric) is not None]
    if not measured:
        return None
    front = pareto_front(measured, metric, higher)
    fig, ax = plt.subplots(figsize=(9.6, max(4.8, 1.2 + 0.22 * (len(measured) + 1))), dpi=120, layout="constrained")
    handles = []
    for i, (r, (colour, marker)) in enumerate(zip(measured, point_styles(measured))):
        on_front = i in front
        handles.append(ax.scatter(r["latency_ms"], r[metric], s=70 if on_front else 45, color=colour, marker=marker,
                                  edgecolors="black" if on_front else "white", linewidths=1.2 if on_front else 0.6,
                                  zorder=3, label=label(r)))
    ordered = sorted((measured[i] for i in front), key=lambda r: r["latency_ms"])
    ax.plot([r["latency_ms"] for r in ordered], [r[metric] for r in ordered], c="0.35", ls="--", lw=1, zorder=2)
    handles.append(Line2D([], [], c="0.35", ls="--", lw=1, marker="o", mfc="none", mec="black", label="Pareto front (black edge)"))
    ax.set_xscale("log")
    # Plain numbers: the default 3x10^1-style minor labels run into each other when the rows span under two decades.
    ax.xaxis.set_major_formatter(ticker.LogFormatter())
    ax.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
    ax.set_xlabel("latency per sample at batch 1 (ms, log scale)")
    ax.set_ylabel(f"{metric.upper()} ({'higher' if higher else 'lower'} is better)")
    ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False, title="artifact @ runtime",
               title_fontsize=8, alignment="left")
    return fig


def pareto_plot(rows: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig = pareto_figure(rows)
    if fig is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _columns(rows: list[dict]) -> list[str]:
    return [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]


def markdown(report: dict) -> str:
    rows = report["rows"]
    columns = _columns(rows)
    lines = [f"# Report: {report['recipe']}", ""]
    baseline = report.get("baseline") or {}
    if baseline.get("pipeline"):
        lines += [f"Baseline: diffusers' {baseline['pipeline']} in float32 with {baseline.get('scheduler')}, {baseline.get('solver')}, "
                  f"{baseline.get('samples')} prompts, seed {baseline.get('seed')}. Every row goes from the same prompts and latent noise "
                  "to images, compared with the baseline's in [0, 1]; a pipeline row's latency is the whole prompt -> image path.", ""]
    elif baseline:
        lines += [f"Baseline: float32 {baseline.get('solver')} on {baseline.get('device')}, {baseline.get('samples')} samples, "
                  f"seed {baseline.get('seed')}. Every row is run from the baseline's noise and compared with its samples.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows if r.get("status", "ok") == "ok"]
    skipped = [r for r in rows if r.get("status", "ok") != "ok"]
    if skipped:
        lines += ["", "Not run:", ""] + [f"- {r['artifact']} on {r['runtime']}: {r['status']} ({r.get('reason', '')})" for r in skipped]
    env = report["environment"]
    lines += ["", f"Machine: {env.get('processor')} ({env.get('machine')}), {env.get('cpu_count')} cores; device {env.get('device')}"
              + (f" ({env['cuda']})" if env.get("cuda") else "") + "; " + ", ".join(f"{k} {v}" for k, v in (env.get("libraries") or {}).items()) + "."]
    lines += ["", "latency_ms: median per sample at batch 1; speedup: baseline latency / row latency; bytes: artifact on disk."]
    if report.get("stages"):
        lines += ["", "## Stages", "", "Wall time and the process's peak resident memory while each stage ran (stages reused by `--resume` are not listed).",
                  "", "| stage | seconds | peak RSS MiB |", "|---|---|---|"]
        lines += [f"| {name} | {fmt(s['seconds'])} | {fmt(s['peak_rss_mb'])} |" for name, s in report["stages"].items()]
    if report.get("checks"):
        lines += ["", "## Checks", ""] + [f"- {'PASS' if c['passed'] else 'FAIL'} `{c['check']}`" + (f" ({c['detail']})" if c.get("detail") else "")
                                          for c in report["checks"]]
    return "\n".join(lines) + "\n"


# Marks the page once every image has finished loading, so a headless browser (and the tests) can tell.
_IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const images = [...document.images];
  document.body.dataset.imagesTotal = images.length;
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});
</script>"""


def html_page(report: dict, plot: str | None, grids: dict[str, str]) -> str:
    """The report as one page; ``plot`` and ``grids`` (row label -> image) are paths relative to the page."""
    rows = [r for r in report["rows"] if r.get("status", "ok") == "ok"]
    columns = _columns(rows)
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{esc(fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(report['recipe'])}: compression report</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f3f3f3}"
        ".grids{display:flex;flex-wrap:wrap;gap:16px}figure{margin:0}figcaption{font-size:12px;max-width:260px}"
        "img.grid{width:256px;image-rendering:pixelated}#pareto{max-width:100%;height:auto}.fail{color:#b00}.pass{color:#070}</style></head><body>",
        f"<h1>{esc(report['recipe'])}</h1>",
        f"<p>{esc(markdown(report).splitlines()[2])}</p>" if report.get("baseline") else "",
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>",
    ]
    if report.get("checks"):
        items = "".join(f"<li class='{'pass' if c['passed'] else 'fail'}'>{'PASS' if c['passed'] else 'FAIL'} <code>{esc(c['check'])}</code> "
                        f"{esc(c.get('detail') or '')}</li>" for c in report["checks"])
        parts.append(f"<h2>Checks</h2><ul>{items}</ul>")
    if plot:
        # At its own size (up to the page's width): squeezed to a fixed width, the legend's 8 pt names stop being legible.
        parts.append(f"<h2>Accuracy versus latency</h2><img id='pareto' src='{esc(plot)}' alt='Pareto plot: one marker per row, named in its legend'>")
    if grids:
        figures = "".join(f"<figure><img class='grid' src='{esc(src)}' alt='{esc(name)}'><figcaption>{esc(name)}</figcaption></figure>"
                          for name, src in grids.items())
        parts.append(f"<h2>Samples from the same noise</h2><div class='grids'>{figures}</div>")
    skipped = [r for r in report["rows"] if r.get("status", "ok") != "ok"]
    if skipped:
        parts.append("<h2>Not run</h2><ul>" + "".join(f"<li>{esc(r['artifact'])} on {esc(r['runtime'])}: {esc(r['status'])} "
                                                       f"({esc(r.get('reason', ''))})</li>" for r in skipped) + "</ul>")
    parts += [_IMAGE_PROBE, "</body></html>"]
    return "\n".join(p for p in parts if p)


def write_report(report: dict, folder: Path, grids: dict[str, str]) -> list[Path]:
    """report.md, report.html and the Pareto plot into ``folder`` (report.json is the caller's)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [r for r in report["rows"] if r.get("status", "ok") == "ok"]
    plot = pareto_plot(rows, folder / PLOT_FILE)
    (folder / "report.md").write_text(markdown(report))
    (folder / "report.html").write_text(html_page(report, PLOT_FILE if plot else None, grids))
    return [p for p in (folder / "report.md", folder / "report.html", plot) if p]

"""report.html: the comparison's tables and pictures in one static page, and a sample browser.

One file, no server, no network: the pictures are embedded, the samples are a JSON block the page's
own script reads. The browser shows one held-out prompt at a time with every method's completion
(its first seed's first sample at the frontier's temperature), its gold and proxy scores and its KL.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from pipeline.report import (
    HEAD_TO_HEAD_HEADER,
    MAIN_HEADER,
    _value,
    head_to_head_rows,
    main_rows,
    verdict_lines,
)

MAX_BROWSED_PROMPTS = 200  # keeps the page small; samples.jsonl has every one

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 78em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
img { max-width: 100%; }
#browser td.completion { max-width: 40em; white-space: pre-wrap; }
.controls { margin: 0.5em 0; }
.prompt { font-weight: bold; margin: 0.5em 0; white-space: pre-wrap; }
"""

SCRIPT = """
(function () {
  var data = JSON.parse(document.getElementById("samples").textContent);
  var index = document.getElementById("prompt-index");
  var body = document.getElementById("browser-body");
  var shown = document.getElementById("prompt-text");
  function number(value, digits) { return value === null ? "-" : value.toFixed(digits); }
  function cell(row, text, kind) {
    var td = document.createElement("td");
    td.textContent = text;
    if (kind) { td.className = kind; }
    row.appendChild(td);
  }
  function show(i) {
    i = Math.max(0, Math.min(data.prompts.length - 1, i));
    index.value = i;
    shown.textContent = data.prompts[i];
    body.textContent = "";
    data.methods.forEach(function (method) {
      var s = method.samples[i];
      var row = document.createElement("tr");
      cell(row, method.name);
      cell(row, s.completion, "completion");
      cell(row, number(s.gold, 3));
      cell(row, number(s.proxy, 3));
      cell(row, number(s.kl, 2));
      body.appendChild(row);
    });
  }
  document.getElementById("previous").addEventListener("click", function () { show(Number(index.value) - 1); });
  document.getElementById("next").addEventListener("click", function () { show(Number(index.value) + 1); });
  index.addEventListener("change", function () { show(Number(index.value)); });
  index.max = data.prompts.length - 1;
  show(0);
  document.body.setAttribute("data-rendered", "yes");
})();
"""


def write_html(out_dir: Path, results: dict, browser: dict, temperatures: list[float]) -> Path:
    """Write out_dir/report.html from the results, the pictures beside it and the browsed samples
    ({prompts: [...], methods: [{name, samples: [{completion, gold, proxy, kl}]}]})."""
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>RLHF vs DPO on the same footing</title>',
        f"<style>{STYLE}</style></head><body>",
        "<h1>RLHF vs DPO on the same footing</h1>",
        f"<p>{results['prompts']['count']} held-out prompts, seeds {', '.join(map(str, results.get('seeds', [0])))}, "
        f"gold reward <code>{html.escape(str(results['gold']))}</code>. Each number is a mean over seeds and prompts "
        "with its 95% interval (a bootstrap over both); report.md says how every column is made.</p>",
    ]
    for temperature in temperatures:
        parts += [f"<h2>Temperature {temperature:g}</h2>", _table(MAIN_HEADER, main_rows(results, temperature))]
    if results["head_to_head"]:
        parts += [
            "<h2>DPO against the PPO run of the nearest KL</h2>",
            _table(HEAD_TO_HEAD_HEADER, head_to_head_rows(results)),
        ]
    parts += ["<h2>Reward against KL</h2>", _image(out_dir / "frontier.png", "reward against KL")]
    parts += [
        _table(
            ["run", "method", "step", "KL to SFT (95% CI)", "gold reward (95% CI)"],
            [
                [p["name"], p["method"], str(p["step"]), _value(p["kl"], 2, signed=False), _value(p["gold"])]
                for p in results["frontier"]
            ],
        ),
        "<h3>Frontier verdicts</h3>",
        "<ul>" + "".join(f"<li>{html.escape(line[2:])}</li>" for line in verdict_lines(results)) + "</ul>",
        "<h2>Win rate against temperature</h2>",
        _image(out_dir / "win_rate_vs_temperature.png", "win rate against temperature"),
    ]
    parts += _implicit_reward(results.get("implicit_reward"))
    if results.get("cost"):
        parts += [
            "<h2>Cost (one seed's run, on average)</h2>",
            _table(
                ["run", "wall time (s)", "with its inputs (s)", "CPU time (s)", "model FLOPs"],
                [
                    [
                        c["name"],
                        f"{c['wall_s']:.0f}",
                        f"{c.get('wall_s_with_inputs', c['wall_s']):.0f}",
                        "-" if c.get("cpu_s") is None else f"{c['cpu_s']:.0f}",
                        "-" if c.get("flops") is None else f"{c['flops']:.2e}",
                    ]
                    for c in results["cost"]
                ],
            ),
        ]
    parts += [
        "<h2>Samples</h2>",
        f"<p>One held-out prompt at a time (the first {len(browser['prompts'])}), every method's completion: its first "
        "seed's first sample at the frontier's temperature, with its gold reward, the reward model's score and "
        "its KL to SFT.</p>",
        '<div class="controls"><button id="previous">previous</button> prompt '
        '<input id="prompt-index" type="number" min="0" value="0"> <button id="next">next</button></div>',
        '<div class="prompt" id="prompt-text"></div>',
        '<table id="browser"><thead><tr><th>method</th><th>completion</th><th>gold</th><th>reward model</th>'
        '<th>KL to SFT</th></tr></thead><tbody id="browser-body"></tbody></table>',
        # "</" would end the script element early: JSON allows "<\/" for it.
        '<script type="application/json" id="samples">' + json.dumps(browser).replace("</", "<\\/") + "</script>",
        f"<script>{SCRIPT}</script>",
        "</body></html>",
    ]
    path = out_dir / "report.html"
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path


def browsed_samples(samples, prompts: list[str], temperature: float, samples_per_prompt: int) -> dict:
    """The browser's data from compare's MethodSamples: each method's first seed at `temperature`."""
    shown = prompts[:MAX_BROWSED_PROMPTS]
    methods, seen = [], set()
    for s in samples:
        if s.temperature != temperature or s.name in seen:
            continue
        seen.add(s.name)
        picks = [i * samples_per_prompt for i in range(len(shown))]
        methods.append(
            {
                "name": s.name,
                "samples": [
                    {
                        "completion": s.completions[j],
                        "gold": s.gold[j],
                        "proxy": s.proxy[j] if s.proxy is not None else None,
                        "kl": s.kl[j] if s.kl is not None else None,
                    }
                    for j in picks
                ],
            }
        )
    return {"prompts": shown, "methods": methods}


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _implicit_reward(implicit: dict | None) -> list[str]:
    if not implicit:
        return []
    rows = [
        [
            m["name"],
            f"{100 * m['accuracy']['mean']:.1f}% [{100 * m['accuracy']['low']:.1f}, {100 * m['accuracy']['high']:.1f}]",
            "-" if m["spearman_gold_gap"] is None else f"{m['spearman_gold_gap']:+.3f}",
        ]
        for m in implicit["models"]
    ]
    return [
        "<h2>DPO's implicit reward as a reward model</h2>",
        f"<p>On {implicit['pairs']} held-out pairs; per rating level and gold-gap bin in report.md.</p>",
        _table(["reward", "accuracy (95% CI)", "rank correlation with gold gap"], rows),
    ]

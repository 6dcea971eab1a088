"""Tables and figures of an experiment grid, from its records alone (issue 5).

`table.md`: the paper's Table 1 layout (rows = attacks, per model: backdoored and DRR
ACC/ASR on the test set, in %, and an average row), one table per poison ratio, then a
row per cell with its times and what DRR projected. `fig_C_per_layer.png`: C of
Assumption 2 at every layer. `fig_tau_sweep.png`: validation ACC/ASR against tau.
A zoo's folder gets `table.md` per model and `fig_zoo.png` instead. Where the folder has
baseline records (`drr_jax.comparison`), `comparison.md` puts every method side by side.
Everything is sorted and dated from the records, never from the clock, so the same
records always give the same bytes.
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

from drr_jax import comparison, grid, utils
from drr_jax.defenses import drr
from drr_jax.defenses.drr.config import with_added_settings
from drr_jax.experiment import read_record

CAVEAT = ("CIFAR-10 from the JPEG copy in ../shared/data, so figures differ slightly from "
          "the PNG originals.")
MODEL_ORDER = ("resnet18", "wrn28_1", "densenet121")
MODEL_NAMES = {"resnet18": "ResNet-18", "wrn28_1": "WRN-28-1", "densenet121": "DenseNet-121",
               "preact_resnet18": "PreAct-ResNet-18", "vgg11": "VGG-11",
               "mobilenet_v2": "MobileNetV2"}
ATTACK_ORDER = ("badnets", "badnets_a2a", "blended", "cla", "sig", "wanet", "iab", "none")
ATTACK_NAMES = {"badnets": "BadNets (all-to-one)", "badnets_a2a": "BadNets (all-to-all)",
                "blended": "Blended", "cla": "Clean-label (CLA)", "sig": "SIG",
                "wanet": "WaNet", "iab": "Input-aware (IAB)", "none": "No attack"}
C_REFERENCE = 5.0  # the dashed line of fig_C_per_layer


def _rank(order: Sequence[str], name: str) -> int:
  return order.index(name) if name in order else len(order)


def model_key(rec: dict[str, Any]) -> tuple[int, str, float]:
  c = rec["cell"]
  return (_rank(MODEL_ORDER, c["model"]), c["model"], float(c["width"]))


def model_label(key: tuple[int, str, float]) -> str:
  _, name, width = key
  label = MODEL_NAMES.get(name, name)
  return label if width == 1.0 else f"{label} x{width:g}"


def attack_key(rec: dict[str, Any]) -> tuple[int, str, float]:
  c = rec["cell"]
  return (_rank(ATTACK_ORDER, c["attack"]), c["attack"], -float(c["poison_ratio"]))


def attack_label(key: tuple[int, str, float], with_ratio: bool = False) -> str:
  _, name, neg_ratio = key
  label = ATTACK_NAMES.get(name, name)
  return f"{label}, {-100 * neg_ratio:g} %" if with_ratio else label


def load_records(results_dir: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
  """The usable records of a results folder, sorted by (model, attack, ratio, seed), and
  a warning for each *.json that was skipped."""
  records, warnings = [], []
  for path in sorted(Path(results_dir).glob("*.json")):
    rec, problem = read_record(path)
    if problem:
      warnings.append(f"{path.name}: skipped, {problem}")
      continue
    records.append(rec)
  records.sort(key=lambda r: (model_key(r), attack_key(r), r["cell"]["seed"], r["cell_id"]))
  return records, warnings


def _pct(x: float | None) -> str:
  return "–" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def _mean(values: Sequence[float | None]) -> float | None:
  vals = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.mean(vals)) if vals else None


def _commit(rec: dict[str, Any]) -> str:
  git = rec.get("git") or {}
  sha = git.get("commit", "unknown")[:10]
  if not git.get("dirty"):
    return sha
  changed = git.get("changed")
  return sha + (f" (uncommitted changes in {', '.join(changed)})" if changed
                else " (with uncommitted changes)")


def provenance(records: Sequence[dict[str, Any]]) -> list[str]:
  """Header lines: dates, machines and commits from the records, and the data caveat."""
  dates = sorted({r["date"][:10] for r in records})
  machines = sorted({r["machine"] for r in records})
  commits = sorted({_commit(r) for r in records})
  when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
  lines = [(f"{len(records)} record(s), run {when} (UTC) on {'; '.join(machines)}; "
            f"code {', '.join(commits)}.")]
  reused = [r for r in records if isinstance(r.get("paper"), dict)
            and isinstance(r["paper"].get("reused_from"), dict)]
  if reused:
    sources = sorted({_commit(r["paper"]["reused_from"]) for r in reused})
    lines.append(f"The paper-DRR figures of {len(reused)} record(s) come from an earlier "
                 f"run of the same paper settings on the same model (`--reuse_paper`; "
                 f"code {', '.join(sources)}).")
  earlier = earlier_defaults(records)
  if earlier:
    lines.append(f"DRR's figures of {len(earlier)} record(s) were made with other settings "
                 f"than today's defaults (an earlier version, not re-run): "
                 f"{', '.join(f'`{c}`' for c in earlier)}.")
  return lines + [f"Data: {CAVEAT}"]


def earlier_defaults(records: Sequence[dict[str, Any]]) -> list[str]:
  """Cell ids of the DRR records (those with a `config.drr` section; a baseline's has
  none) whose DRR settings are not the current defaults (read with the settings added
  since at the values that reproduce their code)."""
  now = json.loads(json.dumps(utils.jsonable(drr.default_config())))
  out = set()
  for r in records:
    stored = (r.get("config") or {}).get("drr")
    if isinstance(stored, dict) and with_added_settings(stored) != now:
      out.add(r.get("cell_id", "?"))
  return sorted(out)


def table1(records: Sequence[dict[str, Any]], ratio: float) -> str:
  """Table 1 at one poison ratio: a row per attack, per model backdoored and DRR ACC/ASR
  (test set, %, mean over seeds), and the per-model average of the rows."""
  recs = [r for r in records if float(r["cell"]["poison_ratio"]) == ratio]
  models = sorted({model_key(r) for r in recs})
  attacks = sorted({attack_key(r) for r in recs})
  cells: dict[tuple, list[dict]] = defaultdict(list)
  for r in recs:
    cells[model_key(r), attack_key(r)].append(r)
  fields = [("before", "acc"), ("before", "asr"), ("after", "acc"), ("after", "asr")]
  head = ["Attack"] + [f"{model_label(m)}: {h}" for m in models
                       for h in ("Backdoored ACC", "Backdoored ASR", "DRR ACC", "DRR ASR")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  columns: dict[tuple, list[float | None]] = defaultdict(list)
  for a in attacks:
    row = [attack_label(a)]
    for m in models:
      group = cells.get((m, a), [])
      for when, metric in fields:
        v = _mean([g[when]["test"][metric] for g in group]) if group else None
        columns[m, when, metric].append(v)
        row.append(_pct(v))
    lines.append("| " + " | ".join(row) + " |")
  avg = ["**Average**"] + [f"**{_pct(_mean(columns[m, w, k]))}**" for m in models
                           for w, k in fields]
  lines.append("| " + " | ".join(avg) + " |")
  several = sorted(f"{model_label(m)} / {attack_label(a)}: {len(g)}"
                   for (m, a), g in cells.items() if len(g) > 1)
  if several:
    lines += ["", f"Means over seeds ({'; '.join(several)})."]
  return "\n".join(lines)


def cell_table(records: Sequence[dict[str, Any]]) -> str:
  """One row per record: validation ACC/ASR before -> after, what DRR projected, times."""
  head = ["cell", "val ACC", "val ASR", "directions (layers)", "train s", "plain pass s",
          "DRR s", "analysis s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in records:
    b, a, t, d = r["before"]["val"], r["after"]["val"], r["times"], r["drr"]
    layers = ", ".join(f"`{n}`" for n in d.get("layers_projected", [])) or "none"
    sec = lambda k, t=t: f"{t[k]:.0f}" if t.get(k) is not None else "–"
    reused = " (reused)" if (r.get("checkpoint") or {}).get("reused") else ""
    lines.append(
        f"| {r['cell_id']} | {_pct(b['acc'])} -> {_pct(a['acc'])} | "
        f"{_pct(b['asr'])} -> {_pct(a['asr'])} | {d.get('directions_kept', 0)} ({layers}) | "
        f"{sec('train_seconds')}{reused} | {sec('plain_pass_seconds')} | "
        f"{sec('defense_seconds')} | {sec('analysis_seconds')} |")
  return "\n".join(lines)


def markdown(records: Sequence[dict[str, Any]]) -> str:
  """The whole table.md."""
  out = ["# DRR on the experiment grid", ""] + provenance(records) + [""]
  out.append("Test set, in %; ASR over the test images whose label differs from the "
             "attack's target. Backdoored = the trained model, DRR = after `drr_jax.defend` "
             "(settings in each record's `config.drr`).")
  for ratio in sorted({float(r["cell"]["poison_ratio"]) for r in records}, reverse=True):
    out += ["", f"## Poison ratio {100 * ratio:g} %", "", table1(records, ratio)]
  out += ["", "## Per cell", "",
          ("Validation split. Seconds: training from the checkpoint's per-epoch history "
          "('reused': trained by an earlier run, whose machine the checkpoint does not "
          "record), the rest on the record's machine; a plain pass is one inference pass "
          "over the training images (with compilation); analysis includes its own feature "
          "pass."), "", cell_table(records), ""]
  return "\n".join(out)


def _style(records: Sequence[dict[str, Any]]):
  """A color per attack, a marker and line style per poison ratio, by sorted order."""
  import matplotlib.pyplot as plt
  palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  attacks = sorted({attack_key(r)[:2] for r in records})
  ratios = sorted({float(r["cell"]["poison_ratio"]) for r in records}, reverse=True)
  color = {a: palette[i % len(palette)] for i, a in enumerate(attacks)}
  marker = {q: "osv^D"[i % 5] for i, q in enumerate(ratios)}
  line = {q: ("-", "--", ":", "-.")[i % 4] for i, q in enumerate(ratios)}
  seeds = len({r["cell"]["seed"] for r in records}) > 1

  def style(r):
    label = attack_label(attack_key(r), with_ratio=True)
    if seeds:
      label += f", seed {r['cell']['seed']}"
    ratio = float(r["cell"]["poison_ratio"])
    return {"color": color[attack_key(r)[:2]], "marker": marker[ratio], "ls": line[ratio],
            "label": label, "markersize": 4}
  return style


def _by_model(records):
  groups: dict[tuple, list] = defaultdict(list)
  for r in records:
    groups[model_key(r)].append(r)
  return sorted(groups.items())


def _save(fig, path: Path) -> None:
  # no Software/date metadata: the same records give the same bytes
  with utils.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png", dpi=120, metadata={"Software": None})


def fig_c_per_layer(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """One panel per model: C of Assumption 2 at each layer (forward order), log scale."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.ticker import MaxNLocator
  groups = _by_model(records)
  style = _style(records)
  fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4.2), squeeze=False)
  for ax, (m, recs) in zip(axes[0], groups, strict=True):
    for r in recs:
      layers = r["analysis"]["layers"]
      x = [e["index"] for e in layers]
      y = [e["C"] if e["C"] is not None and e["C"] > 0 else np.nan for e in layers]
      ax.plot(x, y, lw=1, **style(r))
    ax.axhline(C_REFERENCE, color="gray", ls="--", lw=1, label=f"C = {C_REFERENCE:g}")
    ax.set_yscale("log")
    ax.set_title(model_label(m))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (forward order)")
    ax.set_ylabel("C of Assumption 2")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, Path(path))
  plt.close(fig)


def fig_tau_sweep(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """Per model: validation ACC and ASR (%) after folding every direction above tau."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = _by_model(records)
  style = _style(records)
  fig, axes = plt.subplots(len(groups), 2, figsize=(10, 3.6 * len(groups)), squeeze=False)
  for (ax_acc, ax_asr), (m, recs) in zip(axes, groups, strict=True):
    for r in recs:
      sweep = r["analysis"]["tau_sweep"]
      taus = [s["tau"] for s in sweep]
      for ax, key in ((ax_acc, "acc"), (ax_asr, "asr")):
        ax.plot(taus, [100 * s[key] if s[key] is not None else np.nan for s in sweep],
                lw=1, **style(r))
    for ax, key in ((ax_acc, "ACC"), (ax_asr, "ASR")):
      ax.set_title(f"{model_label(m)}: validation {key}")
      ax.set_xlabel("tau (skewness threshold)")
      ax.set_ylabel(f"{key} (%)")
      ax.set_ylim(-2, 102)
      ax.grid(True, alpha=0.3)
    ax_asr.legend(fontsize=7)
  fig.tight_layout()
  _save(fig, Path(path))
  plt.close(fig)


# --- The zoo (issue 13): one row per model, the paper's DRR beside the project's --------


def _split_of(rec: dict[str, Any]) -> str:
  from drr_jax import grid
  name = rec["cell_id"]
  if any(grid.cell_id(c) == name for c in grid.ZOO_DEV):
    return "dev"
  if any(grid.cell_id(c) == name for c in grid.ZOO_HELDOUT):
    return "held-out"
  if any(grid.cell_id(c) == name for c in grid.NEW_ATTACKS):
    return "new attacks"
  return "other"


def _attack_text(rec: dict[str, Any]) -> str:
  a = rec["config"]["training"]["attack"]
  name = a["name"]
  if name == "none":
    return "none (clean control)"
  ratio = f"{100 * float(a['poison_ratio']):g} %"
  if name.startswith("badnets"):
    size = a.get("patch_size", 3)
    where = a.get("position", "br")
    kind = a.get("pattern", "random")
    to = "all-to-all" if name == "badnets_a2a" else f"target {a.get('target', 0)}"
    return f"BadNets {size}x{size} {kind} {where}, {to}, {ratio}"
  if name == "blended":
    return (f"Blended {a.get('blend_pattern', 'noise')} alpha {a.get('alpha', 0.2):g}, "
            f"target {a.get('target', 0)}, {ratio}")
  if name in ("cla", "sig"):
    return f"{ATTACK_NAMES[name]}, target {a.get('target', 0)}, {ratio} of the set"
  if name == "wanet":
    return (f"WaNet k {a.get('wanet_k', 4)} s {a.get('wanet_s', 0.5):g}, "
            f"target {a.get('target', 0)}, {ratio} per batch")
  if name == "iab":
    return (f"Input-aware (IAB), mask density {a.get('iab_mask_density', 0.032):g}, "
            f"target {a.get('target', 0)}, {ratio} per batch (+ as many cross)")
  return f"{name}, {ratio}"


def _where(report: dict[str, Any] | None) -> str:
  if not report:
    return "–"
  layers = report.get("layers_projected", [])
  kept = report.get("directions_kept", 0)
  if not kept:
    return "0"
  shown = ", ".join(f"`{n}`" for n in layers[:3]) + (" ..." if len(layers) > 3 else "")
  return f"{kept} ({shown})"


def zoo_table(records: Sequence[dict[str, Any]], split: str = "test") -> str:
  """One row per model of a zoo half: backdoored, paper-mode and DRR ACC / ASR on `split`
  (%), directions kept and where, seconds; then the mean over the backdoored models."""
  head = ["model", "attack", "backdoored ACC / ASR", "paper DRR ACC / ASR",
          "DRR ACC / ASR", "DRR: directions (where)", "paper: directions", "DRR s",
          "paper s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  cols: dict[str, list] = defaultdict(list)
  for r in records:
    paper = r.get("paper") or {}
    b, a = r["before"][split], r["after"][split]
    p = (paper.get("after") or {}).get(split, {"acc": None, "asr": None})
    t = r["times"]
    sec = lambda k: f"{t[k]:.0f}" if t.get(k) is not None else "–"
    lines.append(f"| `{r['cell_id']}` | {_attack_text(r)} | {_pct(b['acc'])} / "
                 f"{_pct(b['asr'])} | {_pct(p['acc'])} / {_pct(p['asr'])} | "
                 f"{_pct(a['acc'])} / {_pct(a['asr'])} | {_where(r['drr'])} | "
                 f"{_where(paper.get('drr'))} | {sec('defense_seconds')} | "
                 f"{sec('paper_defense_seconds')} |")
    if r["cell"]["attack"] != "none":
      for key, m in (("b", b), ("p", p), ("a", a)):
        cols[key + "acc"].append(m["acc"])
        cols[key + "asr"].append(m["asr"])
  if cols:
    avg = lambda k: _pct(_mean(cols[k]))
    lines.append(f"| **mean of {len(cols['bacc'])} backdoored** | | **{avg('bacc')} / "
                 f"{avg('basr')}** | **{avg('pacc')} / {avg('pasr')}** | **{avg('aacc')} / "
                 f"{avg('aasr')}** | | | | |")
  return "\n".join(lines)


NEW_ATTACK_TABLES = (("Table 1 layout (clean-label attacks)", ("cla", "sig")),
                     ("Table 2 layout (attacks that control training)", ("wanet", "iab")))


# The bars the issues set (ASR, ACC drop, clean model's drop; fractions): the zoo's, and
# the new attacks' (issue 14: ASR <= 5 %, ACC drop <= 2 points).
ZOO_BAR = (0.05, 0.015, 0.003)
NEW_ATTACKS_BAR = (0.05, 0.02, 0.003)


def bar_of(rec: dict[str, Any]) -> tuple[float, float, float]:
  return NEW_ATTACKS_BAR if rec["cell_id"].startswith("new-") else ZOO_BAR


def misses(records: Sequence[dict[str, Any]], split: str = "test"
           ) -> list[tuple[dict[str, Any], str]]:
  """(record, what it misses) for every model where DRR misses its bar on `split`: test
  ASR above it, or an ACC drop above it (a clean model: its own, smaller bar)."""
  out = []
  for r in records:
    max_asr, max_drop, max_clean_drop = bar_of(r)
    b, a = r["before"][split], r["after"][split]
    drop = b["acc"] - a["acc"]
    why = []
    if r["cell"]["attack"] == "none":
      if drop > max_clean_drop + 5e-5:
        why.append(f"a clean model loses {100 * drop:.2f} ACC points (bar "
                   f"{100 * max_clean_drop:g})")
    else:
      if a["asr"] is not None and a["asr"] > max_asr + 5e-5:
        why.append(f"ASR {_pct(a['asr'])} % (bar {100 * max_asr:g})")
      if drop > max_drop + 5e-5:
        why.append(f"ACC drop {100 * drop:.2f} points (bar {100 * max_drop:g})")
    if why:
      out.append((r, "; ".join(why)))
  return out


def misses_markdown(records: Sequence[dict[str, Any]]) -> list[str]:
  """A section per model that misses its bar: what it misses and DRR's per-layer report
  (`format_report`: each unit's criterion, tail flips, what was kept)."""
  from drr_jax.defenses.drr import format_report
  found = misses(records)
  if not found:
    return []
  out = ["", "## Where DRR misses the bar (test set), with its per-layer report", ""]
  for r, why in found:
    b, a = r["before"]["test"], r["after"]["test"]
    out += [f"### `{r['cell_id']}`: {why}", "",
            f"{_attack_text(r)}; backdoored {_pct(b['acc'])} / {_pct(b['asr'])}, DRR "
            f"{_pct(a['acc'])} / {_pct(a['asr'])}.", "", "```", format_report(r["drr"]),
            "```", ""]
  return out


def zoo_markdown(records: Sequence[dict[str, Any]],
                 baselines: dict[tuple[str, str], dict[str, Any]] | None = None) -> str:
  """table.md of a zoo half (or of the new-attacks grid): test and validation tables,
  the clean controls, the split; for the paper's other attacks, first its Tables 1-2
  layout (with the baselines that were run)."""
  splits = sorted({_split_of(r) for r in records})
  out = [f"# DRR on the zoo ({', '.join(splits)})", ""] + provenance(records) + [""]
  for title, attacks in NEW_ATTACK_TABLES:
    if any(r["cell"]["attack"] in attacks for r in records):
      out += [f"## The paper's {title}, test set", "",
              paper_layout(records, baselines or {}, attacks), ""]
  out.append("ACC and ASR in %, ASR over the images whose label differs from the attack's "
             "target. Backdoored = the trained model; paper DRR = `drr_jax.defend` with "
             "`paper_config()` (Algorithm 1 as written); DRR = the project's defaults (each "
             "record's `config`). Settings are chosen on zoo-dev validation images only; "
             "zoo-heldout is reported once per version of the defaults (docs/zoo.md).")
  for split in ("test", "val"):
    out += ["", f"## {'Test' if split == 'test' else 'Validation'} set", "",
            zoo_table(records, split)]
  clean = [r for r in records if r["cell"]["attack"] == "none"]
  if clean:
    out += ["", "## Clean controls (test ACC change)", ""]
    for r in clean:
      b = r["before"]["test"]["acc"]
      a = r["after"]["test"]["acc"]
      p = ((r.get("paper") or {}).get("after") or {}).get("test", {}).get("acc")
      out.append(f"- `{r['cell_id']}`: DRR {100 * (a - b):+.2f} points "
                 f"({r['drr'].get('directions_kept', 0)} direction(s) removed); paper DRR "
                 + (f"{100 * (p - b):+.2f} points" if p is not None else "–"))
  out += misses_markdown(records)
  return "\n".join(out) + "\n"


def fig_zoo(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> None:
  """Per model: test ACC and ASR backdoored / paper DRR / DRR, as grouped bars."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = [r["cell_id"] for r in records]
  fig, axes = plt.subplots(2, 1, figsize=(max(6, 0.9 * len(records) + 2), 6.5),
                           sharex=True)
  x = np.arange(len(records))
  for ax, key in zip(axes, ("acc", "asr")):
    for i, (label, get) in enumerate((
        ("backdoored", lambda r: r["before"]["test"][key]),
        ("paper DRR", lambda r: ((r.get("paper") or {}).get("after") or {}).get(
            "test", {}).get(key)),
        ("DRR", lambda r: r["after"]["test"][key]))):
      vals = [get(r) for r in records]
      ax.bar(x + (i - 1) * 0.27, [100 * v if v is not None else np.nan for v in vals],
             0.27, label=label)
    ax.set_ylabel(f"test {key.upper()} (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, axis="y", alpha=0.3)
  axes[0].legend(fontsize=8, ncol=3)
  axes[1].set_xticks(x, names, rotation=60, ha="right", fontsize=7)
  fig.tight_layout()
  _save(fig, Path(path))
  plt.close(fig)


# --- The comparison with the baselines (issue 15) -------------------------------------
# Columns in the paper's Table 1 order, then this project's rank-reduction versions.
COMPARED = ("fp", "anp", "clp", "ep", "paper", "drr", "rr-fp", "rr-ep")
COMPARED_NAMES = {"fp": "FP", "anp": "ANP", "clp": "CLP", "ep": "EP", "paper": "paper DRR",
                  "drr": "DRR", "rr-fp": "RR-FP (ours)", "rr-ep": "RR-EP (ours)"}


def _method_result(rec: dict[str, Any], baselines: dict[tuple[str, str], dict[str, Any]],
                   method: str, split: str) -> tuple[dict[str, Any] | None, float | None]:
  """({'acc', 'asr'} on split, seconds) of one method on one model, or (None, None)."""
  if method == "drr":
    return rec["after"][split], rec["times"].get("defense_seconds")
  if method == "paper":
    after = ((rec.get("paper") or {}).get("after") or {}).get(split)
    return after, rec["times"].get("paper_defense_seconds")
  b = baselines.get((rec["cell_id"], method))
  return (b["after"][split], b["seconds"]) if b else (None, None)


def _methods(baselines: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
  """DRR, the paper mode and every baseline that has a record, in COMPARED's order."""
  return [m for m in COMPARED if m in ("drr", "paper") or any(k[1] == m for k in baselines)]


def _better_than(m: dict[str, Any], ref: dict[str, Any]) -> bool:
  """m at least as good as ref on ACC and ASR, and better on one (by 0.01 points)."""
  if m is None or ref is None or m["asr"] is None or ref["asr"] is None:
    return False
  ge_acc, le_asr = m["acc"] >= ref["acc"] - 5e-5, m["asr"] <= ref["asr"] + 5e-5
  return ge_acc and le_asr and (m["acc"] > ref["acc"] + 5e-5 or m["asr"] < ref["asr"] - 5e-5)


def comparison_table(records: Sequence[dict[str, Any]],
                     baselines: dict[tuple[str, str], dict[str, Any]],
                     split: str = "test") -> str:
  """Backdoored and every method's ACC / ASR (%) on `split`, one row per model, the best
  ACC and the lowest ASR of each row in bold; the methods that beat DRR on both; the mean
  over the backdoored models (each column over the models it was run on)."""
  methods = _methods(baselines)
  head = (["model", "backdoored"] + [COMPARED_NAMES[m] for m in methods]
          + ["better than DRR on both"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  cols: dict[str, list] = defaultdict(list)
  for r in records:
    res = {m: _method_result(r, baselines, m, split)[0] for m in methods}
    ran = {m: v for m, v in res.items() if v is not None}
    best_acc = max((v["acc"] for v in ran.values()), default=None)
    asrs = [v["asr"] for v in ran.values() if v["asr"] is not None]
    best_asr = min(asrs) if asrs else None

    def cell(v):
      if v is None:
        return "–"
      acc, asr = _pct(v["acc"]), _pct(v["asr"])
      if best_acc is not None and abs(v["acc"] - best_acc) < 5e-5:
        acc = f"**{acc}**"
      if v["asr"] is not None and best_asr is not None and abs(v["asr"] - best_asr) < 5e-5:
        asr = f"**{asr}**"
      return f"{acc} / {asr}"

    b = r["before"][split]
    better = [COMPARED_NAMES[m] for m in methods if m != "drr"
              and _better_than(res[m], res["drr"])]
    lines.append(f"| `{r['cell_id']}` | {_pct(b['acc'])} / {_pct(b['asr'])} | "
                 + " | ".join(cell(res[m]) for m in methods)
                 + f" | {', '.join(better) or '–'} |")
    if r["cell"]["attack"] != "none":
      cols["backdoored"].append(b)
      for m, v in ran.items():
        cols[m].append(v)
  if cols:
    def avg(vals):
      return (f"{_pct(_mean([v['acc'] for v in vals]))} / "
              f"{_pct(_mean([v['asr'] for v in vals]))} (n={len(vals)})" if vals else "–")
    n = len(cols["backdoored"])
    lines.append(f"| **mean of {n} backdoored** | {avg(cols['backdoored'])} | "
                 + " | ".join(avg(cols[m]) for m in methods) + " | |")
  return "\n".join(lines)


def _marks(values: dict[str, float | None], lower_is_better: bool) -> dict[str, str]:
  """'**' for the best value(s) and '<u>' for the second best, the paper's marks."""
  vals = sorted({round(v, 6) for v in values.values() if v is not None and math.isfinite(v)},
                reverse=not lower_is_better)
  out = {}
  for m, v in values.items():
    if v is None or not math.isfinite(v):
      continue
    if vals and round(v, 6) == vals[0]:
      out[m] = "**"
    elif len(vals) > 1 and round(v, 6) == vals[1]:
      out[m] = "<u>"
  return out


def _marked(x: float | None, mark: str | None) -> str:
  text = _pct(x)
  if mark == "**":
    return f"**{text}**"
  if mark == "<u>":
    return f"<u>{text}</u>"
  return text


def paper_layout(records: Sequence[dict[str, Any]],
                 baselines: dict[tuple[str, str], dict[str, Any]], attacks: Sequence[str],
                 split: str = "test") -> str:
  """The paper's Tables 1-2 layout for the records of `attacks`: per model, a row per
  attack and an average; then the average over all; ACC and ASR (%) of the backdoored
  model and of every method run; among the methods, the best in bold and the second
  best underlined, as the paper marks them. A cell trained longer than its zoo schedule
  gets its own row, labelled with its epochs, and stays out of the averages (they are
  over the paper's cells, one per model and attack)."""
  recs = [r for r in records if r["cell"]["attack"] in attacks]
  methods = _methods(baselines)
  head = ["Model", "Attack", "Backdoored ACC", "Backdoored ASR"]
  for m in methods:
    head += [f"{COMPARED_NAMES[m]} ACC", f"{COMPARED_NAMES[m]} ASR"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

  def row(label_model, label_attack, before, res):
    acc = _marks({m: (v or {}).get("acc") for m, v in res.items()}, False)
    asr = _marks({m: (v or {}).get("asr") for m, v in res.items()}, True)
    cells = [label_model, label_attack, _pct(before.get("acc")), _pct(before.get("asr"))]
    for m in methods:
      v = res.get(m) or {}
      cells += [_marked(v.get("acc"), acc.get(m)), _marked(v.get("asr"), asr.get(m))]
    return "| " + " | ".join(cells) + " |"

  def average(group):
    before = {k: _mean([r["before"][split][k] for r in group]) for k in ("acc", "asr")}
    res = {}
    for m in methods:
      got = [v for v in (_method_result(r, baselines, m, split)[0] for r in group) if v]
      res[m] = ({k: _mean([v[k] for v in got]) for k in ("acc", "asr")}
                if len(got) == len(group) else None)  # only over complete columns
    return before, res

  by_model: dict[tuple, list] = defaultdict(list)
  for r in recs:
    by_model[model_key(r)].append(r)
  def label(r):
    name = ATTACK_NAMES.get(r["cell"]["attack"], r["cell"]["attack"])
    longer = grid.longer_schedule(r["cell"])
    return name if longer is None else f"{name} ({longer} epochs)"

  standard = lambda group: [r for r in group if grid.longer_schedule(r["cell"]) is None]
  for key in sorted(by_model):
    group = sorted(by_model[key], key=lambda r: (grid.longer_schedule(r["cell"]) or 0,
                                                 attack_key(r)))
    for i, r in enumerate(group):
      res = {m: _method_result(r, baselines, m, split)[0] for m in methods}
      lines.append(row(model_label(key) if i == 0 else "", label(r), r["before"][split],
                       res))
    if len(standard(group)) > 1:
      lines.append(row("", "*Average*", *average(standard(group))))
  if len(by_model) > 1:
    lines.append(row("**Average**", "", *average(standard(recs))))
  return "\n".join(lines)


def _budget(method: str, baselines: dict[tuple[str, str], dict[str, Any]]) -> str:
  if method in ("drr", "paper", "ep", "rr-ep"):
    return "the poisoned training set (no labels)"
  if method == "clp":
    return "none (the weights only)"
  sizes = sorted({b["clean_data"]["images"] for (_, m), b in baselines.items()
                  if m == method and b.get("clean_data")})
  return (f"{', '.join(f'{s:,}' for s in sizes)} labelled clean images (the validation "
          "split, 5 % of the training set)" + (" + fine-tuning" if method in ("fp", "rr-fp")
                                              else ""))


def comparison_markdown(records: Sequence[dict[str, Any]],
                        baselines: dict[tuple[str, str], dict[str, Any]]) -> str:
  """comparison.md: the test and validation tables, each method's data budget, its
  seconds per model, and what each costs the clean controls."""
  recs = list(records) + [b for b in baselines.values()]
  out = ["# DRR and the baselines", ""] + provenance(recs) + [""]
  out.append("ACC / ASR in %, ASR over the images whose label differs from the target; "
             "in each row the highest ACC and the lowest ASR are in bold. 'Better than DRR "
             "on both': ACC at least DRR's and ASR at most DRR's, one of them strictly. "
             "FP, ANP and RR-FP are given the clean validation split (their validation "
             "figures are on data they saw); no method sees the test set. Settings: each "
             "record's `config` (docs/baselines.md).")
  for split in ("test", "val"):
    out += ["", f"## {'Test' if split == 'test' else 'Validation'} set", "",
            comparison_table(records, baselines, split)]
  methods = _methods(baselines)
  out += ["", "## Data each method uses", ""]
  out += [f"- {COMPARED_NAMES[m]}: {_budget(m, baselines)}" for m in methods]
  out += ["", "## Seconds per model (the defense alone, wall clock on the record's "
          "machine)", "",
          "| model | " + " | ".join(COMPARED_NAMES[m] for m in methods) + " |",
          "|" + "---|" * (len(methods) + 1)]
  for r in records:
    secs = [_method_result(r, baselines, m, "test")[1] for m in methods]
    out.append(f"| `{r['cell_id']}` | "
               + " | ".join("–" if s is None else f"{s:.0f}" for s in secs) + " |")
  clean = [r for r in records if r["cell"]["attack"] == "none"]
  if clean:
    out += ["", "## Clean controls (test ACC change, points)", ""]
    for r in clean:
      b = r["before"]["test"]["acc"]
      parts = []
      for m in methods:
        v = _method_result(r, baselines, m, "test")[0]
        if v is not None:
          parts.append(f"{COMPARED_NAMES[m]} {100 * (v['acc'] - b):+.2f}")
      out.append(f"- `{r['cell_id']}`: " + ", ".join(parts))
  return "\n".join(out) + "\n"


# Issue 13's bar for re-running a grid with new defaults: no cell worse than the earlier
# version by more than 0.5 ACC points or 1 ASR point (fractions).
RERUN_BAR = (0.005, 0.01)


def _same_figures(a: dict[str, Any], b: dict[str, Any]) -> bool:
  return all((a[k] is None and b[k] is None) or
             (a[k] is not None and b[k] is not None and abs(a[k] - b[k]) < 5e-5)
             for k in ("acc", "asr"))


def _same_model(new: dict[str, Any], old: dict[str, Any]) -> bool:
  """Whether two records defended the same backdoored model: equal training histories
  (per-epoch loss) and equal backdoored test ACC / ASR."""
  def losses(r):
    return [round(h.get("train_loss", float("nan")), 6)
            for h in (r.get("checkpoint") or {}).get("history") or []]
  return (losses(new) == losses(old)
          and _same_figures(new["before"]["test"], old["before"]["test"]))


def versus_table(new: Sequence[dict[str, Any]], old: Sequence[dict[str, Any]],
                 bar: tuple[float, float] = RERUN_BAR) -> tuple[str, list[str]]:
  """A re-run grid against its earlier version, per cell in both: backdoored and DRR test
  ACC / ASR then and now, the change, and whether the new DRR is within `bar` (ACC lost,
  ASR gained) of the earlier one. Returns the markdown and the ids of the cells that miss.
  A cell whose backdoored model differs (retrained to other weights) is marked, since its
  change then mixes the model's with the defense's."""
  max_loss, max_gain = bar
  by_old = {r["cell_id"]: r for r in old}
  rows = ["| cell | backdoored then | backdoored now | same model | DRR then | DRR now | "
          "ACC change | ASR change | within bar | DRR's ACC drop then / now |",
          "|---|---|---|---|---|---|---|---|---|---|"]
  missed = []
  for r in sorted(new, key=lambda r: r["cell_id"]):
    o = by_old.get(r["cell_id"])
    if o is None:
      continue
    bn, bo = r["before"]["test"], o["before"]["test"]
    an, ao = r["after"]["test"], o["after"]["test"]
    d_acc = an["acc"] - ao["acc"]
    d_asr = (an["asr"] - ao["asr"]) if an["asr"] is not None and ao["asr"] is not None \
        else None
    ok = d_acc >= -max_loss - 5e-5 and (d_asr is None or d_asr <= max_gain + 5e-5)
    if not ok:
      missed.append(r["cell_id"])
    rows.append(f"| `{r['cell_id']}` | {_pct(bo['acc'])} / {_pct(bo['asr'])} | "
                f"{_pct(bn['acc'])} / {_pct(bn['asr'])} | "
                f"{'yes' if _same_model(r, o) else 'no'} | {_pct(ao['acc'])} / "
                f"{_pct(ao['asr'])} | {_pct(an['acc'])} / {_pct(an['asr'])} | "
                f"{100 * d_acc:+.2f} | "
                + (f"{100 * d_asr:+.2f}" if d_asr is not None else "–")
                + f" | {'yes' if ok else '**no**'} | {100 * (bo['acc'] - ao['acc']):.2f} / "
                f"{100 * (bn['acc'] - an['acc']):.2f} |")
  only_old = sorted(set(by_old) - {r["cell_id"] for r in new})
  out = [f"Test set, in %. Bar: DRR now loses at most {100 * max_loss:g} ACC points and "
         f"gains at most {100 * max_gain:g} ASR points against then. Where the model is "
         "not the same (retrained to other weights), the change mixes the retraining's "
         "with the defense's; the last column separates them: the ACC each DRR took from "
         "its own backdoored model.", "", *rows, ""]
  n = len(rows) - 2
  out.append(f"{n} cell(s) compared, {n - len(missed)} within the bar"
             + (f"; missed: {', '.join(f'`{c}`' for c in missed)}" if missed else "") + ".")
  if only_old:
    out.append(f"Not re-run yet: {', '.join(f'`{c}`' for c in only_old)}.")
  return "\n".join(out) + "\n", missed


def versus_markdown(new: Sequence[dict[str, Any]], old: Sequence[dict[str, Any]],
                    title: str) -> str:
  """versus.md: a re-run's records against the earlier version's (versus_table), with
  the provenance of both."""
  table, _ = versus_table(new, old)
  return "\n".join([f"# {title}", "", "Now:", "", *provenance(new), "", "Then:", "",
                    *provenance(old), "", table])


def _write_text(path: Path, text: str) -> None:
  with utils.atomic_path(path) as tmp:
    tmp.write_text(text, encoding="utf-8")


def write_report(results_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 against: str | os.PathLike | None = None
                 ) -> tuple[dict[str, Path], list[str]]:
  """Writes table.md and both figures for the records in results_dir (to out_dir, by
  default the same folder), and versus.md when `against` names an earlier version's
  records; returns their paths and the warnings about skipped files."""
  records, warnings = load_records(results_dir)
  if not records:
    raise ValueError(f"no usable record in {results_dir}" +
                     (": " + "; ".join(warnings) if warnings else ""))
  baselines, more = comparison.load_records(results_dir)
  warnings += more
  earlier: list[dict[str, Any]] = []
  if against is not None:  # checked before anything is written
    earlier, more = load_records(against)
    if not earlier:
      raise ValueError(f"no usable record in {against} to compare with" +
                       (": " + "; ".join(more) if more else ""))
    warnings += more
  out = Path(out_dir if out_dir is not None else results_dir)
  out.mkdir(parents=True, exist_ok=True)
  if all(r.get("analysis") is None for r in records):  # the zoo: no per-layer analysis
    records = sorted(records, key=lambda r: r["cell_id"])
    paths = {"table": out / "table.md", "fig_zoo": out / "fig_zoo.png"}
    _write_text(paths["table"], zoo_markdown(records, baselines))
    fig_zoo(records, paths["fig_zoo"])
  else:
    paths = {"table": out / "table.md", "fig_C": out / "fig_C_per_layer.png",
             "fig_tau": out / "fig_tau_sweep.png"}
    _write_text(paths["table"], markdown(records))
    fig_c_per_layer(records, paths["fig_C"])
    fig_tau_sweep(records, paths["fig_tau"])
  if baselines:
    paths["comparison"] = out / "comparison.md"
    _write_text(paths["comparison"], comparison_markdown(records, baselines))
  if against is not None:
    paths["versus"] = out / "versus.md"
    _write_text(paths["versus"], versus_markdown(
        records, earlier, f"{results_dir} against the earlier version in {against}"))
  return paths, warnings

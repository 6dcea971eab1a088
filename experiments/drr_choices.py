"""DRR design-choice experiments on backdoored WRN-28-1 checkpoints (validation split only).

For each checkpoint (run folder):
  1. baseline val ACC/ASR;
  2. per-layer table: for side x pooling, the top skewness direction of every layer
     (stiefel.maximize, k=1, steps 200, lr 0.1, standardized), folded into that layer alone:
     skewness, val ACC/ASR, and label-free statistics on a fixed random subset of the
     poisoned training set (changed, tail_share, tail_frac) plus poison_share (analysis only);
  3. the paper's threshold rule over all layers at once (one_pass) for several tau, from the
     same per-layer frames;
  4. (time permitting) drr.defend in 'sequential' mode, plain inference timing, and a
     cross-check of the hand-made one_pass sweep against drr.defend(mode='one_pass').

Usage (GPU machine):
  PYTHONPATH=. python3 experiments/drr_choices.py --data_dir .dtrain \
      --runs .gpuruns/wrn28_1-badnets-cpu .gpuruns/wrn28_1-blended-cpu --out $OUT
`--smoke` swaps the CIFAR zip for a few random images and cuts sizes (a CPU code check).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import jax
import numpy as np

from drr_jax import attacks, checkpoint, data, evaluate, features, projection, stiefel
from drr_jax.defenses import drr

TAUS = (1.5, 2.0, 2.5, 3.0, 3.5, 4.0)
SETTINGS = (("input", "max"), ("output", "max"), ("input", "mean"), ("output", "mean"))
T0 = time.time()


def log(msg: str) -> None:
  print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def fnum(x) -> float | None:
  x = float(x)
  return None if not np.isfinite(x) else x


def load_run(run_dir: str, full: data.Split):
  model, variables, meta, record = checkpoint.load_model(run_dir)
  cfg = meta["config"]
  train, val = data.holdout_split(full, cfg["data"]["val_fraction"], cfg["data"]["split_seed"])
  poisoned = attacks.poison(train.images, train.labels, cfg["attack"])
  trigger = attacks.Trigger(np.asarray(record["pattern"]), np.asarray(record["mask"]))
  checks = {
      "trigger_matches_record": bool(np.array_equal(trigger.pattern, poisoned.trigger.pattern)
                                     and np.array_equal(trigger.mask, poisoned.trigger.mask)),
      "poison_idx_matches_record": bool(np.array_equal(np.asarray(record["poison_idx"]),
                                                       poisoned.poison_idx)),
  }
  return model, variables, cfg, poisoned, val, trigger, checks


def ev(model, variables, val, trigger, cfg) -> dict:
  r = evaluate.evaluate(model, variables, val, trigger, cfg["attack"], progress=False)
  return {"acc": r["acc"], "asr": r["asr"]}


def with_params(variables, params):
  return {**variables, "params": params}


def per_setting(model, variables, cfg, poisoned, val, trigger, order, sub, base_sub,
                is_poison, side, pooling, args) -> dict:
  """Per-layer directions, single-layer folds, and the tau sweep for one (side, pooling)."""
  out = {"side": side, "pooling": pooling, "timing": {}}
  t = time.time()
  feats = drr.extract(model, variables, poisoned.images, tuple(order),
                      outputs=side == "output", pooling=pooling, batch_size=500,
                      progress=False)
  out["timing"]["extract_s"] = time.time() - t
  frames, skews, rows = {}, {}, []
  t_opt = t_eval = 0.0
  for name in order:
    x = feats[name]
    t = time.time()
    res = jax.device_get(stiefel.maximize(x, 1, steps=args.steps, lr=args.lr,
                                          standardize=True))
    t_opt += time.time() - t
    v = np.asarray(res.frame, np.float64)[:, 0]
    skew = float(res.values[0])
    frames[name], skews[name] = np.asarray(res.frame), skew
    # Standardized projection on the whole defense set; sign so that skewness > 0.
    xd = np.asarray(x, np.float64)
    p = (xd - xd.mean(0)) @ v
    sd = p.std()
    z = p / sd if sd > 0 else np.zeros_like(p)
    sgn = 1.0 if np.mean(z ** 3) >= 0 else -1.0
    tail = (sgn * z) > 2.0
    t = time.time()
    folded = with_params(variables, projection.fold(variables["params"], {name: res.frame},
                                                    side))
    m = ev(model, folded, val, trigger, cfg)
    pred = evaluate.predict(model, folded, poisoned.images[sub], progress=False)
    t_eval += time.time() - t
    changed = pred != base_sub
    tail_sub = tail[sub]
    pois_sub = is_poison[sub]
    row = {
        "layer": name, "channels": int(x.shape[1]), "skew": skew,
        "skew_init_axis": float(res.history[0]), "sign": sgn,
        "acc": m["acc"], "asr": m["asr"],
        "changed": float(changed.mean()),
        "n_changed": int(changed.sum()),
        "tail_share": fnum(tail_sub[changed].mean()) if changed.any() else None,
        "tail_frac": float(tail_sub.mean()),
        "poison_share": fnum(pois_sub[changed].mean()) if changed.any() else None,
        # analysis only: how pure / how complete the direction's tail is w.r.t. the poison
        "tail_poison": fnum(pois_sub[tail_sub].mean()) if tail_sub.any() else None,
        "poison_in_tail": fnum(tail_sub[pois_sub].mean()) if pois_sub.any() else None,
        "tail_frac_all": float(tail.mean()),
    }
    rows.append(row)
  out["layers"] = rows
  out["timing"].update(optimize_s=t_opt, eval_s=t_eval)
  # Paper rule, all layers at once from the original network's features (one_pass).
  sweep = []
  t = time.time()
  for tau in TAUS:
    kept = {n: frames[n] for n in order if skews[n] > tau}
    params = projection.fold(variables["params"], kept, side) if kept else variables["params"]
    m = ev(model, with_params(variables, params), val, trigger, cfg)
    sweep.append({"tau": tau, "kept": len(kept), "layers": list(kept), **m})
  out["timing"]["sweep_s"] = time.time() - t
  out["tau_sweep"] = sweep
  return out


def print_setting(tag, s) -> None:
  print(f"\n== {tag}  side={s['side']} pooling={s['pooling']}  "
        f"(extract {s['timing']['extract_s']:.1f}s, optimize {s['timing']['optimize_s']:.1f}s,"
        f" eval {s['timing']['eval_s']:.1f}s)")
  print(f"{'layer':28s} {'C':>3s} {'skew':>6s} {'acc':>6s} {'asr':>6s} {'chg':>6s} "
        f"{'tailsh':>6s} {'tailfr':>6s} {'poissh':>6s} {'tailpo':>6s}")
  f = lambda v: "   -  " if v is None else f"{v:6.3f}"
  for r in s["layers"]:
    print(f"{r['layer']:28s} {r['channels']:3d} {r['skew']:6.2f} {r['acc']:6.3f} "
          f"{r['asr']:6.3f} {r['changed']:6.3f} {f(r['tail_share'])} {r['tail_frac']:6.3f} "
          f"{f(r['poison_share'])} {f(r['tail_poison'])}")
  for w in s["tau_sweep"]:
    print(f"  tau {w['tau']:.1f}: kept {w['kept']:2d}  acc {w['acc']:.4f}  asr {w['asr']:.4f}")


def markdown_tables(paths) -> None:
  """Markdown tables of result files written by an earlier run (no JAX work)."""
  f = lambda v, d=3: "-" if v is None else f"{v:.{d}f}"
  for path in paths:
    d = json.load(open(path))
    b = d["baseline"]
    print(f"\n### {Path(path).stem} ({d['attack']['name']}): baseline val ACC {b['acc']:.4f}, "
          f"ASR {b['asr']:.4f}; {d['num_defense_images']} defense images, "
          f"subset {d['subset_size']} (poisoned {d['subset_poison_frac']:.3f})\n")
    for key in ("input-max", "output-max"):
      s = d["settings"][key]
      print(f"\n**per layer, {key}** (one layer folded at a time)\n")
      print("| layer | C | skew | ACC | ASR | changed | tail_share | tail_frac | poison_share "
            "| tail_poison |")
      print("|---|---|---|---|---|---|---|---|---|---|")
      for r in s["layers"]:
        print(f"| {r['layer']} | {r['channels']} | {r['skew']:.2f} | {r['acc']:.3f} | "
              f"{r['asr']:.3f} | {r['changed']:.3f} | {f(r['tail_share'])} | "
              f"{r['tail_frac']:.3f} | {f(r['poison_share'])} | {f(r['tail_poison'])} |")
    print("\n**per layer, mean pooling** (skew / ASR of one layer folded)\n")
    print("| layer | input-mean skew | input-mean ASR | output-mean skew | output-mean ASR |")
    print("|---|---|---|---|---|")
    for ri, ro in zip(d["settings"]["input-mean"]["layers"],
                      d["settings"]["output-mean"]["layers"]):
      print(f"| {ri['layer']} | {ri['skew']:.2f} | {ri['asr']:.3f} | {ro['skew']:.2f} | "
            f"{ro['asr']:.3f} |")
    print("\n**paper rule, one_pass, all layers** (kept / ACC / ASR)\n")
    print("| setting | " + " | ".join(f"tau {t}" for t in TAUS) + " |")
    print("|---|" + "---|" * len(TAUS))
    for key, s in d["settings"].items():
      cells = [f"{w['kept']} / {w['acc']:.3f} / {w['asr']:.3f}" for w in s["tau_sweep"]]
      print(f"| {key} | " + " | ".join(cells) + " |")
    if d.get("sequential") or d.get("one_pass_check"):
      print("\n**drr.defend runs** (input side, max pooling)\n")
      print("| mode | tau | ACC | ASR | kept | feature passes | wall s |")
      print("|---|---|---|---|---|---|---|")
      for q in d.get("sequential", []):
        print(f"| sequential | {q['tau']} | {q['acc']:.4f} | {q['asr']:.4f} | "
              f"{q['directions_kept']} | {q['feature_passes']} | {q['wall_s']:.1f} |")
      q = d.get("one_pass_check")
      if q:
        print(f"| one_pass (library) | {q['tau']} | {q['acc']:.4f} | {q['asr']:.4f} | "
              f"{q['directions_kept']} | 1 | {q['wall_s']:.1f} |")
    if d.get("inference_pass_s"):
      print(f"\nplain inference over {d['num_defense_images']} images: "
            + ", ".join(f"{t:.2f} s" for t in d["inference_pass_s"]))


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--data_dir", default=".dtrain")
  ap.add_argument("--runs", nargs="+", default=[".gpuruns/wrn28_1-badnets-cpu",
                                                ".gpuruns/wrn28_1-blended-cpu"])
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/drr_choices_out"))
  ap.add_argument("--subset", type=int, default=5000)
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--lr", type=float, default=0.1)
  ap.add_argument("--budget_s", type=float, default=520.0,
                  help="skip optional stages that would not finish within this wall time")
  ap.add_argument("--seq_taus", type=float, nargs="*", default=[2.0, 3.0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--tables", nargs="+", metavar="JSON",
                  help="only print Markdown tables from result files of an earlier run")
  args = ap.parse_args()
  if args.tables:
    markdown_tables(args.tables)
    return
  out_dir = Path(args.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  log(f"jax {jax.__version__} devices {jax.devices()}")

  if args.smoke:
    rng = np.random.default_rng(0)
    full = data.Split(rng.integers(0, 256, (600, 32, 32, 3)).astype(np.uint8),
                      np.repeat(np.arange(10), 60).astype(np.int32))
    args.subset, args.steps = 100, 5
  else:
    full = data.load_split("train", args.data_dir)
  log(f"train zip decoded: {full.images.shape}")

  results = {}

  def save(tag):
    with open(out_dir / f"{tag}.json", "w") as f:
      json.dump(results[tag], f, indent=1)

  runs = {}
  for run_dir in args.runs:
    tag = Path(run_dir).name
    model, variables, cfg, poisoned, val, trigger, checks = load_run(run_dir, full)
    order = features.layer_order(model, variables, poisoned.images.shape[1:])
    n = len(poisoned.images)
    sub = np.sort(np.random.default_rng(0).choice(n, min(args.subset, n), replace=False))
    is_poison = np.zeros(n, bool)
    is_poison[poisoned.poison_idx] = True
    res = {"run": run_dir, "attack": cfg["attack"], "checks": checks,
           "num_defense_images": n, "num_val": int(len(val.labels)),
           "subset_size": int(len(sub)), "subset_poison_frac": float(is_poison[sub].mean()),
           "layers": order, "device": str(jax.devices()[0]),
           "steps": args.steps, "lr": args.lr}
    results[tag] = res
    t = time.time()
    res["baseline"] = ev(model, variables, val, trigger, cfg)
    base_sub = evaluate.predict(model, variables, poisoned.images[sub], progress=False)
    res["baseline"]["seconds_incl_compile"] = time.time() - t
    log(f"{tag}: {checks} baseline {res['baseline']}")
    save(tag)
    res["settings"] = {}
    for side, pooling in SETTINGS:
      t = time.time()
      s = per_setting(model, variables, cfg, poisoned, val, trigger, order, sub, base_sub,
                      is_poison, side, pooling, args)
      s["timing"]["total_s"] = time.time() - t
      res["settings"][f"{side}-{pooling}"] = s
      save(tag)
      print_setting(tag, s)
      log(f"{tag} {side}-{pooling} done in {s['timing']['total_s']:.1f}s")
    runs[tag] = (model, variables, cfg, poisoned, val, trigger)

  # Plain inference over the whole defense set (the predictor is compiled by now).
  for tag, (model, variables, cfg, poisoned, val, trigger) in runs.items():
    times = []
    for _ in range(2):
      t = time.time()
      evaluate.predict(model, variables, poisoned.images, progress=False)
      times.append(time.time() - t)
    results[tag]["inference_pass_s"] = times
    save(tag)
    log(f"{tag}: inference over {len(poisoned.images)} images: {times}")

  # Faithful Algorithm 1 (sequential), input side, max pooling.
  est = 60.0
  for tau in args.seq_taus:
    for tag, (model, variables, cfg, poisoned, val, trigger) in runs.items():
      left = args.budget_s - (time.time() - T0)
      if left < est * 1.3:
        log(f"skip sequential {tag} tau {tau}: {left:.0f}s left, estimate {est:.0f}s")
        continue
      t = time.time()
      new_vars, report = drr.defend(model, variables, poisoned.images, progress=False,
                                    config={"mode": "sequential", "side": "input",
                                            "pooling": "max", "tau": tau, "k": 1,
                                            "steps": args.steps, "lr": args.lr})
      wall = time.time() - t
      est = max(est, wall)
      m = ev(model, new_vars, val, trigger, cfg)
      entry = {"tau": tau, **m, "directions_kept": report["directions_kept"],
               "layers_projected": report["layers_projected"],
               "feature_passes": report["feature_passes"], "wall_s": wall,
               "report_seconds": report["seconds"],
               "criteria": {e["layer"]: e["criterion"][0] for e in report["layers"]}}
      results[tag].setdefault("sequential", []).append(entry)
      save(tag)
      log(f"sequential {tag} tau {tau}: acc {m['acc']:.4f} asr {m['asr']:.4f} kept "
          f"{report['directions_kept']} {report['layers_projected']} passes "
          f"{report['feature_passes']} wall {wall:.1f}s")

  # Cross-check of the hand-made sweep against the library's one_pass mode.
  for tag, (model, variables, cfg, poisoned, val, trigger) in runs.items():
    left = args.budget_s - (time.time() - T0)
    if left < 60:
      log(f"skip one_pass cross-check {tag}: {left:.0f}s left")
      continue
    t = time.time()
    new_vars, report = drr.defend(model, variables, poisoned.images, progress=False,
                                  config={"mode": "one_pass", "side": "input",
                                          "pooling": "max", "tau": 2.0, "k": 1,
                                          "steps": args.steps, "lr": args.lr})
    wall = time.time() - t
    m = ev(model, new_vars, val, trigger, cfg)
    results[tag]["one_pass_check"] = {
        "tau": 2.0, **m, "directions_kept": report["directions_kept"],
        "layers_projected": report["layers_projected"], "wall_s": wall,
        "criteria": {e["layer"]: e["criterion"][0] for e in report["layers"]}}
    save(tag)
    log(f"one_pass check {tag} tau 2.0: acc {m['acc']:.4f} asr {m['asr']:.4f} kept "
        f"{report['directions_kept']} wall {wall:.1f}s")
  log("done")


if __name__ == "__main__":
  main()

"""Is the ResNet-18 x0.25 BadNets backdoor spread over several layers? DRR (defaults)
restricted to chosen sets of layers, with a lower tail-flip bar so that the partial
candidates (flip ~0.5 alone) are kept; and the kept direction also folded into the
classifier's input, which the identity shortcut of the last block feeds. Validation
only; the poison mask is printed for diagnosis, never used for a choice."""
from __future__ import annotations

import argparse
import json
import time

import jax.numpy as jnp
import numpy as np

import explore_common
from drr_jax import evaluate, features, projection
from drr_jax.defenses import drr

T0 = time.time()


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--checkpoint", required=True)
  p.add_argument("--subset", type=int, default=20000)
  p.add_argument("--sets", required=True,
                 help="';'-separated sets of ','-separated layers; 'all': the defaults "
                      "over every layer, flip bar included")
  p.add_argument("--min_tail_flip", type=float, default=0.4)
  p.add_argument("--head", action="store_true",
                 help="also fold the last kept direction into the classifier's input: the "
                      "same vector ('same') and the tail mean there for the same tail "
                      "('tail mean'), each replaced by its benign mean")
  args = p.parse_args()
  model, variables, cfg, ds, trigger, imgs, is_poison = explore_common.load(
      args.checkpoint, args.subset)
  base = evaluate.predict(model, variables, imgs, progress=False)
  m = evaluate.evaluate(model, variables, ds.val, trigger, cfg["attack"], progress=False)
  print(f"{args.checkpoint}: subset {args.subset}; backdoored val ACC {m['acc']:.4f} "
        f"ASR {m['asr']:.4f}", flush=True)
  for layers in args.sets.split(";"):
    layers = layers.split(",")
    out, rep = drr.defend(model, variables, imgs, progress=False,
                          config={} if layers == ["all"] else {
                              "layers": layers, "min_tail_flip": args.min_tail_flip,
                              "skip_classifier": False})
    m = evaluate.evaluate(model, out, ds.val, trigger, cfg["attack"], progress=False)
    ch = evaluate.predict(model, out, imgs, progress=False) != base
    kept = {e["layer"]: [(round(c["tail_flip"], 2), round(c["collateral"], 3))
                         for c in e["checks"]] for e in rep["layers"] if e["kept"]}
    kept.update({f"{c['from']} -> {c['to']} (carried)": [
        (round(c["tail_flip"], 2), round(c["collateral"], 3))]
        for c in rep.get("carried", []) if c["kept"]})
    print(f"  {'+'.join(layers)}\n    kept {json.dumps(kept)}\n    val ACC {m['acc']:.4f} "
          f"ASR {m['asr']:.4f}; defense images changed: poisoned "
          f"{ch[is_poison].mean():.3f}, clean {ch[~is_poison].mean():.4f} "
          f"[{time.time() - T0:.0f}s]", flush=True)
    if args.head:
      last = [e for e in rep["layers"] if e["kept"]][-1]
      d = np.asarray(last["directions"][-1], np.float64)
      x = drr.extract(model, out, imgs, (last["layer"],), outputs=False, pooling="max",
                      batch_size=500, progress=False)[last["layer"]].astype(np.float64)
      z = (x - x.mean(0)) @ d
      tail = z / z.std() > 2
      xh = drr.extract(model, out, imgs, ("head",), outputs=False, pooling="max",
                       batch_size=500, progress=False)["head"].astype(np.float64)
      benign = xh[~tail].mean(0)
      th = xh[tail].mean(0) - benign
      for name, v in (("same", d), ("tail mean", th / np.linalg.norm(th))):
        fr = v[:, None].astype(np.float32)
        kernel = features.layer_kernels(out["params"])["head"]
        folded = {**out, "params": projection.fold(out["params"], {"head": fr}, "input")}
        shift = projection.mean_shift(kernel, fr, benign, "input")
        folded, ok = projection.absorb_shifts(model, folded, {"head": shift},
                                              jnp.asarray(imgs[:4]))
        m = evaluate.evaluate(model, folded, ds.val, trigger, cfg["attack"], progress=False)
        ch = evaluate.predict(model, folded, imgs, progress=False) != base
        print(f"    + head ({name}, cos to d {v @ d:.2f}, mean folded {ok}): val ACC "
              f"{m['acc']:.4f} ASR {m['asr']:.4f}; changed: poisoned "
              f"{ch[is_poison].mean():.3f}, clean {ch[~is_poison].mean():.4f} "
              f"[{time.time() - T0:.0f}s]", flush=True)


if __name__ == "__main__":
  main()

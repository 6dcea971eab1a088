"""Diagnosis of the ResNet-18 x0.25 BadNets grid cell: the skewed tails at the input of
stage4_block2/conv2 before and after DRR projects stage4_block2/conv1 (poisoned share,
label and prediction histograms of each tail; 10,000 defense images). The poison mask
and labels are read for diagnosis only."""
import numpy as np, jax, sys
sys.path.insert(0, 'experiments')
import explore_common
from drr_jax import evaluate, stiefel
from drr_jax.defenses import drr
s = explore_common.load('runs/grid/resnet18x0.25-badnets-p10-s0', 10000)
idx = np.sort(np.random.default_rng(0).choice(len(s.ds.train.labels), 10000, replace=False))
labels = s.ds.train.labels[idx]
cfg = {"layers": ["stage4_block2/conv1"], "confirm_samples": 5000}
new, rep = drr.defend(s.model, s.variables, s.images, config=cfg, progress=False)
print("conv1 kept", rep["directions_kept"], flush=True)
for name, var in (("orig", s.variables), ("after conv1", new)):
  x = drr.extract(s.model, var, s.images, ("stage4_block2/conv2",), outputs=False, pooling="max", batch_size=500, progress=False)["stage4_block2/conv2"].astype(np.float64)
  res = jax.device_get(stiefel.maximize(x, 4, steps=200, lr=0.1, standardize=True, search="multistart"))
  pred = evaluate.predict(s.model, var, s.images, progress=False)
  for j in np.argsort(-np.asarray(res.values)):
    v = np.asarray(res.frame)[:, j]
    pr = (x - x.mean(0)) @ v; pr *= np.sign(np.mean(pr**3)); t = pr / pr.std() > 2
    print(name, f"skew {res.values[j]:.2f} tail {t.mean():.3f} poisoned {s.is_poison[t].mean():.2f}",
          "labels", np.bincount(labels[t], minlength=10), "preds", np.bincount(pred[t], minlength=10), flush=True)

"""Where the images of a removed tail go: the toxic tail at stage4_block2/conv1 of the
ResNet-18 x0.25 BadNets grid cell vs the class tail that appears at stage4_block2/conv2
after it (histogram of the new predictions of the flipped images; diagnosis only)."""
import numpy as np, jax, sys
sys.path.insert(0, 'experiments')
import explore_common
from drr_jax import evaluate, stiefel
from drr_jax.defenses import drr
s = explore_common.load('runs/grid/resnet18x0.25-badnets-p10-s0', 10000)
L1, L2 = "stage4_block2/conv1", "stage4_block2/conv2"
def tail_of(var, layer):
  x = drr.extract(s.model, var, s.images, (layer,), outputs=False, pooling="max", batch_size=500, progress=False)[layer].astype(np.float64)
  res = jax.device_get(stiefel.maximize(x, 4, steps=200, lr=0.1, standardize=True, search="multistart"))
  v = np.asarray(res.frame)[:, int(np.argmax(res.values))]
  pr = (x - x.mean(0)) @ v; pr *= np.sign(np.mean(pr**3)); return pr / pr.std() > 2
new, rep = drr.defend(s.model, s.variables, s.images, config={"layers": [L1]}, progress=False)
t1 = tail_of(s.variables, L1)
p0 = evaluate.predict(s.model, s.variables, s.images[t1], progress=False)
p1 = evaluate.predict(s.model, new, s.images[t1], progress=False)
fl = p0 != p1
print("conv1 toxic: flipped", fl.mean(), "dest", np.bincount(p1[fl], minlength=10), flush=True)
new2, rep2 = drr.defend(s.model, new, s.images, config={"layers": [L2], "max_collateral": 1.0}, progress=False)
print("conv2 kept", rep2["directions_kept"], flush=True)
t2 = tail_of(new, L2)
p0 = evaluate.predict(s.model, new, s.images[t2], progress=False)
p1 = evaluate.predict(s.model, new2, s.images[t2], progress=False)
fl = p0 != p1
print("conv2 class: flipped", fl.mean(), "dest", np.bincount(p1[fl], minlength=10), flush=True)

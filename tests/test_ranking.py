"""Ranked mode: every unit's candidates confirmed alone, removed least collateral first."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax.defenses import defend
from drr_jax.defenses.drr import DefenseError


class Chain(nn.Module):
  """feat1 -> feat2 -> cls, all dense."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(10, name="cls")(nn.Dense(12, name="feat2")(nn.Dense(12, name="feat1")(x)))


def _case(n=4000, poison=400, seed=0):
  """The trigger reaches feat1's input on coordinate 10 mixed with a benign signal s
  (coordinate 11 holds s alone); feat1 subtracts s, so feat2 reads the trigger alone and
  the classifier reads s to tilt classes 1-9. Removing coordinate 10 at feat1 also
  feeds -s into the trigger's channel (collateral); at feat2 it takes the trigger alone."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 12)).astype(np.float32)
  s = 0.3 * rng.normal(size=n)
  x[:, 10] = 0.05 * x[:, 10] + s
  x[:poison, 10] += 12.0
  x[:, 11] = s
  f1 = np.eye(12, dtype=np.float32)
  f1[11, 10] = -1.0
  cls = np.zeros((12, 10), np.float32)
  cls[:10] = np.eye(10)
  cls[10, 0] = 3.0
  cls[11, 1:] = np.linspace(-0.5, 0.5, 9)
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  v = {"params": {"feat1": dense(f1), "feat2": dense(np.eye(12, dtype=np.float32)),
                  "cls": dense(cls)}}
  return x.reshape(n, 3, 2, 2), v, np.argmax(x[:poison, :10], -1)


def _predict(v, images):
  return np.argmax(np.asarray(Chain().apply(v, images)), -1)


def test_ranked_removes_the_trigger_where_it_costs_least():
  images, v, truth = _case()
  cfg = {"side": "input", "tau": 0.0, "min_tail_flip": 0.75, "confirm_samples": 2000,
         "carry": False, "ranked_rounds": 1}
  seq, rep_seq = defend(Chain(), v, images, config={**cfg, "mode": "sequential"},
                        progress=False)
  new, rep = defend(Chain(), v, images, config={**cfg, "mode": "ranked"}, progress=False)
  # network order keeps the first unit that passes, with its collateral
  assert rep_seq["layers_projected"] == ["feat1"]
  assert rep["layers_projected"] == ["feat2"], rep["layers"]
  (kept,) = [c for c in rep["layers"][1]["checks"] if c.get("kept")]
  assert kept["tail_flip"] >= 0.75 and kept["collateral"] < 0.05, kept
  first = [c for c in rep["layers"][0]["checks"] if c["tail_flip"] >= 0.75
           and c["collateral"] <= 0.15]
  assert first and min(c["collateral"] for c in first) > 0.1  # passes, but costs more
  unchanged = lambda w: np.mean(_predict(w, images[400:]) == _predict(v, images[400:]))
  assert unchanged(new) > 0.97 and unchanged(seq) < 0.93, (unchanged(new), unchanged(seq))
  assert np.mean(_predict(new, images[:400]) == truth) > 0.85


def test_ranked_keeps_nothing_on_a_clean_gaussian():
  images = np.random.default_rng(0).normal(size=(4000, 3, 2, 2)).astype(np.float32)
  _, v, _ = _case()
  new, rep = defend(Chain(), v, images, config={"mode": "ranked", "tau": 0.0},
                    progress=False)
  assert rep["directions_kept"] == 0 and rep["layers_projected"] == []
  for name in ("feat1", "feat2"):
    np.testing.assert_array_equal(new["params"][name]["kernel"], v["params"][name]["kernel"])


def test_ranked_needs_confirmation():
  images, v, _ = _case(n=100, poison=10)
  with pytest.raises(DefenseError, match="ranked.*confirm"):
    defend(Chain(), v, images, config={"mode": "ranked", "confirm": False}, progress=False)


def test_later_rounds_repeat_on_the_modified_network_without_repeating_a_removal():
  """Searched candidates only (no residual tail): round 2 runs on the modified network,
  finds no new direction, and does not remove the first one again."""
  images, v, _ = _case()
  cfg = {"side": "input", "tau": 0.0, "min_tail_flip": 0.75, "confirm_samples": 2000,
         "carry": False, "mode": "ranked", "residual_tail": False}
  one, rep1 = defend(Chain(), v, images, config={**cfg, "ranked_rounds": 1}, progress=False)
  two, rep2 = defend(Chain(), v, images, config={**cfg, "ranked_rounds": 3}, progress=False)
  assert rep1["feature_passes"] == 1
  # round 2 ran on the modified network, found nothing more, and round 3 never ran
  assert rep2["feature_passes"] == 2
  assert sorted({e["round"] for e in rep2["layers"]}) == [1, 2]
  assert rep2["directions_kept"] == rep1["directions_kept"] == 1
  for name in ("feat1", "feat2", "cls"):
    np.testing.assert_allclose(two["params"][name]["kernel"], one["params"][name]["kernel"])


def test_a_clean_model_takes_one_round_whatever_ranked_rounds_says():
  images = np.random.default_rng(0).normal(size=(4000, 3, 2, 2)).astype(np.float32)
  _, v, _ = _case()
  _, rep = defend(Chain(), v, images, config={"mode": "ranked", "ranked_rounds": 3},
                  progress=False)
  assert rep["feature_passes"] == 1 and rep["directions_kept"] == 0


def _stats(**kw):
  base = {"tail_flip": 0.1, "tail_frac": 0.05, "collateral": 0.01, "class_collateral": 0.1,
          "residual": 40, "residual_flip": 0.9, "overlap": 0.8}
  return {**base, **kw}


@pytest.mark.parametrize("change, ok", [
    ({}, True),
    ({"overlap": 0.3}, False),          # aimed at images not removed before: a class
    ({"overlap": None}, False),
    ({"residual": 5}, False),           # too few unflipped tail images to judge
    ({"residual_flip": 0.4}, False),
    ({"collateral": 0.5}, False),
    ({"class_collateral": 0.9}, False),
])
def test_a_later_round_candidate_must_finish_what_the_first_removed(change, ok):
  from types import SimpleNamespace
  from drr_jax.defenses.drr import make_config, ranking
  run = SimpleNamespace(cfg=make_config({}), confirmer=SimpleNamespace(idx=np.arange(1000)))
  assert ranking.passes(run, _stats(**change)) is ok
  # a first-round candidate is judged by its own tail flip instead
  first = {k: v for k, v in _stats(**change).items()
           if k not in ("residual", "residual_flip", "overlap")}
  assert ranking.passes(run, {**first, "tail_flip": 0.9}) is (
      first["collateral"] <= 0.15 and first["class_collateral"] <= 0.5)


def test_the_residual_tail_is_the_removed_tail_still_predicted_as_before():
  from types import SimpleNamespace
  from drr_jax.defenses.drr import ranking
  idx = np.array([0, 2, 4, 6, 8])            # the confirmation images among 10
  now = np.array([1, 1, 0, 1, 2])            # current predictions on them
  original = np.array([1, 2, 0, 1, 2])       # the original network's
  removed = np.zeros(10, bool)
  removed[[0, 2, 4, 5]] = True               # tails removed so far (5: not confirmed on)
  confirmer = SimpleNamespace(idx=idx, base=lambda variables: now)
  run = SimpleNamespace(confirmer=confirmer, n=10)
  mask = ranking.residual_tail(run, None, ranking.Later(original, removed))
  # 0 and 4: removed and unchanged; 2 was flipped; 5 unknown; 6 and 8 never removed
  np.testing.assert_array_equal(np.flatnonzero(mask), [0, 4])


def test_flip_on_majority_judges_a_first_round_candidate_by_its_majority_class_images():
  from types import SimpleNamespace
  from drr_jax.defenses.drr import make_config, ranking
  # a small poisoned group: half the tail is benign, but the tail images the network
  # puts in the majority (target) class nearly all flip
  stats = {"tail_flip": 0.5, "majority_flip": 0.9, "tail_frac": 0.04, "collateral": 0.05,
           "class_collateral": 0.2}
  conf = SimpleNamespace(idx=np.arange(1000))
  tail = SimpleNamespace(cfg=make_config({}), confirmer=conf)
  majority = SimpleNamespace(cfg=make_config({"flip_on": "majority"}), confirmer=conf)
  assert not ranking.passes(tail, stats)
  assert ranking.passes(majority, stats)
  assert not ranking.passes(majority, {**stats, "majority_flip": 0.3})
  assert not ranking.passes(majority, {k: v for k, v in stats.items()
                                       if k != "majority_flip"})  # an empty tail
  with pytest.raises(Exception, match="flip_on"):
    make_config({"flip_on": "nope"})


def test_collateral_is_measured_only_where_the_tail_passes_and_decisions_stay(monkeypatch):
  """The confirmation skips the collateral images of a candidate whose tail already
  fails, and the rest of a tail once its failure is certain: the same directions and
  params as measuring every candidate, fewer images predicted, and None where nothing
  was measured."""
  from drr_jax import inference
  from drr_jax.defenses.drr import confirmation
  images, v, _ = _case()
  cfg = {"side": "input", "tau": 0.0, "confirm_samples": 2000, "carry": False}
  counted = []
  predict = inference.predict

  def counting(model, variables, x, *a, **k):
    counted.append(len(x))
    return predict(model, variables, x, *a, **k)
  monkeypatch.setattr(inference, "predict", counting)
  lazy, rep_lazy = defend(Chain(), v, images, config=cfg, progress=False)
  n_lazy, counted[:] = sum(counted), []
  check = confirmation.Confirmer.check
  monkeypatch.setattr(confirmation.Confirmer, "check",
                      lambda self, *a, gate=None, **k: check(self, *a, **k))
  full, rep_full = defend(Chain(), v, images, config=cfg, progress=False)
  n_full = sum(counted)
  assert rep_lazy["layers_projected"] == rep_full["layers_projected"] != []
  for a, b in zip(jax.tree_util.tree_leaves(lazy), jax.tree_util.tree_leaves(full)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  checks = [c for e in rep_lazy["layers"] for c in e.get("checks", [])]
  skipped = [c for c in checks if c["collateral"] is None]
  assert skipped and all(c["tail_flip"] < cfg.get("min_tail_flip", 0.6) or
                         "residual" in c for c in skipped)
  # ... and predicts a failing tail only until its failure is certain
  early = [c for c in skipped if "tail_predicted" in c]
  assert early and all(c["tail_predicted"] < round(c["tail_frac"] * 2000) for c in early)
  assert n_lazy < n_full, (n_lazy, n_full)


@pytest.mark.parametrize("n,size", [(1, 64), (64, 64), (65, 128), (200, 256), (256, 256),
                                    (257, 500), (950, 500)])
def test_a_trial_prediction_is_padded_to_a_power_of_two_bucket_at_most_one_batch(n, size):
  from drr_jax.defenses.drr import confirmation
  assert confirmation.bucket(n, 500) == size


class AbsChain(nn.Module):
  """feat1 -> feat2 -> relu -> cls: the classifier reads |x_c| for class c."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(10, name="cls")(nn.relu(nn.Dense(22, name="feat2")(
        nn.Dense(12, name="feat1")(x))))


def _clean_label_case(n=4000, seed=0):
  """A clean-label trigger: class c is a large |x_c| of either sign (so a class has no
  mean template), coordinate 10 pushes the classifier to class 0, and 80 % of the
  class-0 images carry it, labels and predictions unchanged. Removing it flips none of
  its tail; adding the tail's mean input difference moves the other images to class 0."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n)
  x = 0.3 * rng.normal(size=(n, 12)).astype(np.float32)
  x[np.arange(n), labels] += 1.5 * rng.choice([-1.0, 1.0], n)
  x[:, 10:] *= 0.03
  cls0 = np.flatnonzero(labels == 0)
  x[cls0[: int(0.8 * len(cls0))], 10] += 12.0
  f2 = np.zeros((12, 22), np.float32)
  f2[np.arange(10), np.arange(10)] = 1.0
  f2[np.arange(10), np.arange(10, 20)] = -1.0
  f2[10, 20] = f2[11, 21] = 1.0
  cls = np.zeros((22, 10), np.float32)
  cls[np.arange(10), np.arange(10)] = cls[np.arange(10, 20), np.arange(10)] = 1.0
  cls[20, 0] = 3.0
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  v = {"params": {"feat1": dense(np.eye(12, dtype=np.float32)), "feat2": dense(f2),
                  "cls": dense(cls)}}
  return x, labels, v


def _abs_predict(v, images):
  return np.argmax(np.asarray(AbsChain().apply(v, images)), -1)


def test_an_implant_confirms_a_clean_label_trigger_that_no_removal_flips():
  x, labels, v = _clean_label_case()
  images = x.reshape(len(x), 3, 2, 2)
  triggered = x.copy()
  triggered[:, 10] = 12.0
  triggered = triggered[labels != 0].reshape(-1, 3, 2, 2)
  assert np.mean(_abs_predict(v, triggered) == 0) > 0.99  # the backdoor acts
  assert np.mean(_abs_predict(v, images) == labels) > 0.95
  cfg = {"side": "input", "mode": "ranked", "tau": 0.0, "confirm_samples": 2000,
         "carry": False, "ranked_rounds": 1}
  same, rep = defend(AbsChain(), v, images, config=cfg, progress=False)
  assert rep["directions_kept"] == 0  # the tail flip alone cannot confirm it
  new, rep = defend(AbsChain(), v, images, config={**cfg, "min_implant": 0.6},
                    progress=False)
  assert rep["directions_kept"] >= 1, rep["layers"]
  kept = [c for e in rep["layers"] for c in e.get("checks", []) if c.get("kept")]
  assert all(c["implant"] >= 0.6 and c["implant_cut"] >= 0.6 and c["tail_flip"] < 0.1
             for c in kept), kept
  assert np.mean(_abs_predict(new, triggered) == 0) < 0.2
  assert np.mean(_abs_predict(new, images) == _abs_predict(v, images)) > 0.97


@pytest.mark.xfail(strict=True, reason=(
    "known weakness of the experimental implant (off by default): with the converging "
    "search of version 8 (lr=0.005) it keeps a class direction of this clean model, at "
    "collateral 0.148 against the 0.15 bar; at lr=0.1 the search never reached it "
    "(docs/design.md, version 8)"))
def test_an_implant_keeps_nothing_on_a_clean_gaussian():
  images = np.random.default_rng(0).normal(size=(4000, 3, 2, 2)).astype(np.float32)
  _, _, v = _clean_label_case()
  new, rep = defend(AbsChain(), v, images, config={"side": "input", "mode": "ranked",
                                                "tau": 0.0, "min_implant": 0.6},
                    progress=False)
  assert rep["directions_kept"] == 0
  np.testing.assert_array_equal(new["params"]["cls"]["kernel"], v["params"]["cls"]["kernel"])


def test_min_implant_is_checked():
  images = np.zeros((8, 3, 2, 2), np.float32)
  _, _, v = _clean_label_case()
  for bad in (0.0, 1.5, "high"):
    with pytest.raises(DefenseError, match="min_implant"):
      defend(AbsChain(), v, images, config={"min_implant": bad}, progress=False)


def test_the_implant_adds_the_tails_mean_image_difference_to_other_classes_images():
  """Confirmer.implant on uint8 images: a model that says class 1 when the top-left
  pixel is bright. The tail (bright pixel, class 1) implants that pixel into images of
  class 0; a trial that ignores the pixel cuts all of it."""
  from drr_jax.defenses.drr import confirmation
  rng = np.random.default_rng(0)
  images = rng.integers(0, 100, size=(400, 4, 4, 1)).astype(np.uint8)
  images[:40, 0, 0, 0] = 255                      # the tail carries the "trigger"

  def model(variables, x, train=False):
    bright = (x[:, 0, 0, 0] > 150 * variables["on"]).astype(jnp.float32)
    return jnp.stack([1 - bright, bright], -1)
  conf = confirmation.Confirmer(model, images, samples=400, batch_size=128, seed=0)
  tail = np.zeros(400, bool)
  tail[:40] = True
  on, off = {"on": jnp.float32(1.0)}, {"on": jnp.float32(1e9)}
  out = conf.implant(on, tail, trial=off)
  # every other image is class 0; the mean difference at the pixel is about 255 - 50
  assert out["implant_images"] == int((~tail[conf.side]).sum())
  assert out["implant"] == 1.0 and out["implant_cut"] == 1.0
  others, moved, majority = conf.implanted(on, tail[conf.idx])
  assert majority == 1 and moved.dtype == np.uint8
  # x + (255 - about 50): bright everywhere, clipped at the top of the range
  assert moved[:, 0, 0, 0].min() > 150 and moved[:, 0, 0, 0].max() == 255
  # elsewhere the images move by the (small, rounded) mean difference only
  diff = np.abs(moved.astype(int) - conf.images[others].astype(int))[:, 1:, 1:]
  assert diff.max() <= 12
  # a tail with no trigger implants nothing
  assert conf.implant(on, np.arange(400) % 10 == 3)["implant"] == 0.0


def test_contrast_is_the_unit_mean_difference_of_two_groups():
  from drr_jax.defenses.drr import candidates
  x = np.zeros((6, 3))
  x[:2] = [2.0, 0.0, 0.0]
  x[2:4] = [0.0, 1.0, 0.0]
  a = np.array([1, 1, 0, 0, 0, 0], bool)
  b = np.array([0, 0, 1, 1, 0, 0], bool)
  np.testing.assert_allclose(candidates.contrast(x, a, b, 6),
                             np.array([2.0, -1.0, 0.0]) / np.sqrt(5))
  assert candidates.contrast(x, a, np.zeros(6, bool), 6) is None


@pytest.mark.parametrize("flips, predicted", [(False, 256), (True, None)])
def test_a_failing_tail_is_predicted_only_until_its_failure_is_certain(flips, predicted):
  """A 300-image tail: half of it (rounded up to a bucket, 256) first; if none of those
  flip, a 0.6 gate fails whatever the other 44 do, so they are not predicted."""
  from drr_jax.defenses.drr import confirmation

  class Fake(confirmation.Confirmer):
    def __init__(self):
      self.idx, self.batch, self.asked = np.arange(1000), 500, []
      self.side = np.arange(1000)[:100]

    def base(self, variables):
      return np.zeros(1000, int)

    def _changed(self, variables, trial, rows):
      self.asked.append(len(rows))
      return np.full(len(rows), flips)

  c, tail = Fake(), np.zeros(1000, bool)
  tail[:300] = True
  out = c.check(None, None, tail, gate=lambda st: st["tail_flip"] >= 0.6)
  if predicted is None:  # it passes: the whole tail (no side image is outside it)
    assert c.asked == [256, 44]
    assert out["tail_flip"] == 1.0 and "tail_predicted" not in out
  else:
    assert c.asked == [predicted] and out["tail_predicted"] == predicted
    assert out["tail_flip"] == 0.0 and out["collateral"] is None


class Wide(nn.Module):
  """feat1 -> feat2 -> cls, all dense, 16 features."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(len(x), -1).astype(jnp.float32)
    return nn.Dense(10, name="cls")(nn.Dense(16, name="feat2")(nn.Dense(16, name="feat1")(x)))


def _two_triggers(n=4000, seed=0):
  """Images with a clear class each (coordinates 0-9); trigger A (coordinate 10) on
  images 0-399 sends them to class 0, trigger B (coordinate 12) on 400-799 to class 5."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 16)).astype(np.float32)
  x[np.arange(n), rng.integers(0, 10, n)] += 4.0
  x[:, [10, 12]] *= 0.05
  x[:400, 10] += 12.0
  x[400:800, 12] += 12.0
  cls = np.zeros((16, 10), np.float32)
  cls[:10] = np.eye(10)
  cls[10, 0] = cls[12, 5] = 3.0
  dense = lambda k: {"kernel": jnp.asarray(k), "bias": jnp.zeros(k.shape[1])}
  eye = np.eye(16, dtype=np.float32)
  return x.reshape(n, 4, 2, 2), {"params": {"feat1": dense(eye), "feat2": dense(eye),
                                            "cls": dense(cls)}}


def _kept_and_skipped(rep):
  checks = [c for e in rep["layers"] for c in e["checks"]]
  return ([c for c in checks if c.get("kept")],
          [c for c in checks if c.get("skipped") == "stop_left"])


RANKED = {"side": "input", "tau": 0.0, "min_tail_flip": 0.75, "confirm_samples": 2000,
          "carry": False, "mode": "ranked", "stop_left": None}


def test_stop_left_ends_the_chase_of_what_a_removal_left():
  """The first removal leaves about 10 % of its tail; by default a later round removes a
  second direction for it. stop_left above what is left stops there (one ranking, one
  direction); below it, the run is the default's."""
  images, v, _ = _case()
  _, base = defend(Chain(), v, images, config=RANKED, progress=False)
  assert base["directions_kept"] == 2 and base["feature_passes"] >= 2
  _, low = defend(Chain(), v, images, config={**RANKED, "stop_left": 0.02}, progress=False)
  assert low["layers_projected"] == base["layers_projected"]
  assert low["directions_kept"] == 2
  new, stop = defend(Chain(), v, images, config={**RANKED, "stop_left": 0.2},
                     progress=False)
  kept, skipped = _kept_and_skipped(stop)
  assert stop["directions_kept"] == 1 and stop["feature_passes"] == 1
  assert 0.0 < kept[0]["left"] <= 0.2, kept
  assert all(s["left_before"] == kept[0]["left"] for s in skipped)
  # what it keeps is the default's first removal
  assert stop["layers_projected"] == base["layers_projected"][:1]


def test_stop_left_still_removes_another_trigger():
  """Two triggers on two groups: once the first is removed, the second's tail lies
  outside the removed one, so it is judged as before, whatever stop_left says; only the
  candidates that chase the removed tails are skipped."""
  images, v = _two_triggers()
  pred = lambda w: np.argmax(np.asarray(Wide().apply(w, images)), -1)
  _, base = defend(Wide(), v, images, config=RANKED, progress=False)
  new, rep = defend(Wide(), v, images, config={**RANKED, "stop_left": 1.0},
                    progress=False)
  kept, skipped = _kept_and_skipped(rep)
  assert rep["directions_kept"] == base["directions_kept"] == 2
  assert rep["feature_passes"] == 1 < base["feature_passes"]
  assert skipped and all(s["tail_flip"] >= 0.75 for s in skipped)
  p, before = pred(new), pred(v)
  assert np.mean(before[:400] == 0) > 0.95 and np.mean(before[400:800] == 5) > 0.95
  assert np.mean(p[:400] == 0) < 0.2 and np.mean(p[400:800] == 5) < 0.2
  assert np.mean(p[800:] == before[800:]) > 0.98


def test_left_share_counts_the_removed_tail_images_still_predicted_as_before():
  from types import SimpleNamespace
  from drr_jax.defenses.drr import make_config, ranking
  idx = np.array([0, 2, 4, 6, 8])
  now = np.array([1, 1, 0, 1, 2])
  original = np.array([1, 2, 0, 1, 2])
  removed = np.zeros(10, bool)
  removed[[0, 2, 4, 5]] = True               # 0, 2, 4 confirmation images; 2 flipped
  run = SimpleNamespace(confirmer=SimpleNamespace(idx=idx, base=lambda variables: now),
                        cfg=make_config({"stop_left": 0.7}))
  assert ranking.left_share(run, None, original, removed) == pytest.approx(2 / 3)
  assert ranking.removed_enough(run, 2 / 3) and not ranking.removed_enough(run, 0.71)
  assert ranking.left_share(run, None, original, np.zeros(10, bool)) is None
  assert not ranking.removed_enough(run, None)
  off = SimpleNamespace(cfg=make_config({"stop_left": None}))
  assert not ranking.removed_enough(off, 0.0)
  tail = np.zeros(10, bool)
  tail[[4, 5, 7]] = True                     # 2 of its 3 images inside the removed tails
  assert ranking.chases(removed, tail) and not ranking.chases(removed, ~removed)
  assert not ranking.chases(np.zeros(10, bool), tail)
  with pytest.raises(DefenseError, match="stop_left"):
    make_config({"stop_left": 1.5})

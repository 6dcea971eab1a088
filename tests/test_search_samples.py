"""`search_samples`: the Stiefel ascent on a fixed subset of the images (issue 18), the
criterion and everything after it on all of them."""
import jax
import numpy as np
import pytest

from drr_jax import defend, stiefel
from drr_jax.defenses.drr import DefenseError, make_config
from drr_jax.defenses.drr.state import Run
from tests.test_defend import Linear, _linear_params


def _poisoned(n=4000, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 12)).astype(np.float32)
  x[:, 10] *= 0.3
  x[: n // 10, 10] += 12.0  # the poisoned 10 %: far along coordinate 10 -> class 0
  return x


@pytest.mark.parametrize("mode", ["ranked", "sequential"])  # stacked / one-unit search
def test_a_subset_search_keeps_the_direction_the_full_search_keeps(mode):
  x = _poisoned()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "mode": mode,
         "max_class_collateral": 1.0}
  images = x.reshape(len(x), 3, 2, 2)
  _, full = defend(Linear(), _linear_params(), images, config=cfg, progress=False)
  _, sub = defend(Linear(), _linear_params(), images,
                  config={**cfg, "search_samples": 500}, progress=False)
  kept = lambda r: [d for e in r["layers"] for d in e["directions"]]
  assert full["directions_kept"] == sub["directions_kept"] == 1
  (da,), (db,) = np.asarray(kept(full)), np.asarray(kept(sub))
  assert abs(float(da @ db)) > 0.999
  assert sub["config"]["search_samples"] == 500


def test_the_reported_criterion_is_taken_on_every_image():
  # the top direction found on the subset, scored on all rows
  x = _poisoned()
  cfg = {"layers": ["feat"], "tau": 1.5, "confirm_samples": 2000, "search_samples": 300,
         "confirm": False, "mode": "sequential", "direction": "skew",
         "side": "input", "k": 1}
  _, report = defend(Linear(), _linear_params(), x.reshape(len(x), 3, 2, 2), config=cfg,
                     progress=False)
  (entry,) = report["layers"]
  (v,) = np.asarray(entry["directions"])[:1]
  on_all = float(stiefel.criterion(stiefel.center(x), v[:, None].astype(np.float32),
                                   True)[0])
  assert entry["criterion"][0] == pytest.approx(on_all, rel=1e-4)
  rows = Run.search_rows(_run(4000, 300), 4000)
  sub = float(stiefel.criterion(stiefel.center(x[rows]), v[:, None].astype(np.float32),
                                True)[0])
  assert abs(sub - on_all) > 1e-3  # so the check above can tell the two apart


class _Cfg:
  def __init__(self, search_samples, seed=0):
    self.search_samples, self.seed = search_samples, seed


def _run(n, m):
  """A stand-in with what `Run.search_rows` reads: n images, the config."""
  class R:
    pass
  r = R()
  r.n, r.cfg = n, _Cfg(m)
  return r


def test_search_rows_takes_every_row_of_the_chosen_images():
  rows = Run.search_rows(_run(10, 4), 30)  # 3 rows per image (e.g. no pooling)
  assert len(rows) == 12 and np.all(np.diff(rows) > 0)
  images = rows.reshape(4, 3) // 3
  assert np.all(images == images[:, :1]) and len(set(images[:, 0])) == 4
  assert np.array_equal(rows.reshape(4, 3) % 3, np.tile(np.arange(3), (4, 1)))
  assert Run.search_rows(_run(10, None), 30) is None
  assert Run.search_rows(_run(10, 10), 30) is None  # as many as there are: all rows


@pytest.mark.parametrize("bad", [1, 0, -5, 2.5, "1000", True])
def test_a_bad_search_samples_is_refused_before_any_work(bad):
  with pytest.raises(DefenseError, match="search_samples"):
    make_config({"search_samples": bad})


# ---------------------------------------------------------------- later_samples

from tests.test_ranking import Chain, _case  # noqa: E402

# stop_left off: the later rounds' plumbing is under test, so all three rounds must run
_RANKED = {"side": "input", "tau": 0.0, "min_tail_flip": 0.75, "confirm_samples": 2000,
           "carry": False, "mode": "ranked", "ranked_rounds": 3, "later_samples": None,
           "stop_left": None}


def test_later_images_hold_the_confirmation_images(monkeypatch):
  images, v, _ = _case()
  seen, original = {}, Run.later_images

  def spy(self):
    seen["images"], seen["idx"] = original(self), self.confirmer.idx
    seen["again"] = original(self)
    return seen["images"]
  monkeypatch.setattr(Run, "later_images", spy)
  defend(Chain(), v, images, config={**_RANKED, "later_samples": 2500}, progress=False)
  chosen = seen["images"]
  assert len(chosen) == 2500 and np.all(np.diff(chosen) > 0)
  assert np.isin(seen["idx"], chosen).all()
  assert np.array_equal(seen["again"], chosen)  # a fixed choice, the same each round


def test_a_later_round_on_every_image_by_index_is_the_plain_later_round(monkeypatch):
  """The index plumbing of `later_samples` (tails mapped back to all N, benign means and
  tail means on the subset) is exact: a subset that is every image gives bit-identical
  results to no subset."""
  images, v, _ = _case()
  plain, rep_plain = defend(Chain(), v, images, config=_RANKED, progress=False)
  monkeypatch.setattr(Run, "later_images", lambda self: np.arange(self.n))
  indexed, rep_indexed = defend(Chain(), v, images, config=_RANKED, progress=False)
  assert rep_plain["feature_passes"] == rep_indexed["feature_passes"] == 3
  assert any(e["kept"] for e in rep_plain["layers"] if e["round"] == 2)  # round 2 counts
  strip = lambda r: [{k: e[k] for k in ("layer", "criterion", "kept", "directions")}
                     for e in r["layers"]]
  assert strip(rep_plain) == strip(rep_indexed)
  for a, b in zip(jax.tree_util.tree_leaves(plain), jax.tree_util.tree_leaves(indexed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_later_round_on_a_subset_reads_only_those_images_and_keeps_the_removal():
  images, v, _ = _case()
  full, rep_full = defend(Chain(), v, images, config=_RANKED, progress=False)
  sub, rep_sub = defend(Chain(), v, images, config={**_RANKED, "later_samples": 2500},
                        progress=False)
  rows = {(e["round"], e["rows"]) for e in rep_sub["layers"]}
  assert rows == {(1, 4000), (2, 2500), (3, 2500)}, rows
  kept = lambda r: [(e["round"], e["layer"], e["kept"]) for e in r["layers"]]
  assert kept(rep_sub) == kept(rep_full)  # round 2 keeps a direction at the same unit
  dirs = lambda r: [np.asarray(d) for e in r["layers"] for d in e["directions"]]
  for a, b in zip(dirs(rep_full), dirs(rep_sub)):  # estimated on 2,500 of the 4,000
    assert abs(float(a @ b)) > 0.99
  predict = lambda w: np.argmax(np.asarray(Chain().apply(w, images)), -1)
  assert np.mean(predict(full) == predict(sub)) > 0.99

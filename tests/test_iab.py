"""IAB, the input-aware dynamic attack (issue 14): the original's generator, triggers that
differ across inputs, the mask pre-training, the batch layout (backdoor samples relabelled,
cross samples kept), and a tiny joint training that saves, resumes, evaluates with the
generated trigger and records the samples its final epoch trained on."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from drr_jax import attacks, checkpoint, configs, data, datasets, evaluate, train
from drr_jax.attacks import iab
from tests.conftest import make_fake_zips


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)


def test_the_generator_has_the_originals_layers():
  gen, mask_net = iab.networks(32)
  shapes = jax.eval_shape(lambda: gen.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  conv = {name: shapes["params"][name]["conv"]["kernel"].shape[2:]
          for name in shapes["params"]}
  assert conv == {"down_0": (3, 32), "down_1": (32, 32), "down_2": (32, 64),
                  "down_3": (64, 64), "down_4": (64, 128), "down_5": (128, 128),
                  "middle": (128, 128), "up_0": (128, 128), "up_1": (128, 64),
                  "up_2": (64, 64), "up_3": (64, 32), "up_4": (32, 32), "up_5": (32, 3)}
  m = jax.eval_shape(lambda: mask_net.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  assert m["params"]["up_5"]["conv"]["kernel"].shape == (3, 3, 32, 1)
  assert iab.channels_of(m) == 32
  # the mask's threshold is the original's tanh(20 m - 10) / (2 + 1e-7) + 1/2
  np.testing.assert_allclose(iab.threshold(jnp.array([0.0, 0.5, 1.0])),
                             [0.0, 0.5, 1.0], atol=1e-7)


def test_batches_pair_backdoor_and_cross_rows_and_refuse_the_generic_schedule():
  bs = list(iab.batches(100, 0.1, 3, 1, 32))
  assert len(bs) == 3 and all(b.n_bd == 3 and len(b.partners) == 3 for b in bs)
  np.testing.assert_array_equal(np.concatenate([b.index for b in bs]),
                                attacks.schedule.epoch_order(100, 3, 1)[:96])
  again = list(iab.batches(100, 0.1, 3, 1, 32))
  assert all(np.array_equal(a.partners, b.partners) for a, b in zip(bs, again))
  assert not all(np.array_equal(b.partners, b.index[3:6]) for b in bs)  # a second shuffle
  low = [b.n_bd for e in range(20) for b in iab.batches(320, 0.01, 0, e, 32)]
  assert set(low) <= {0, 1} and 0 < sum(low) < len(low)  # 0.32 of an image per batch
  cfg = {"name": "iab", "poison_ratio": 0.1}
  base = attacks.poison(_images(40), np.arange(40) % 10, cfg)
  assert len(base.poison_idx) == 0
  with pytest.raises(ValueError, match="trained along with the model"):
    list(attacks.train_batches(base, cfg, 0, 0, 32))
  with pytest.raises(ValueError, match="trained along with the model"):
    attacks.trained_set(base, cfg, 0, 1, 32)


def test_settings_come_from_the_preset_and_can_be_set():
  import argparse

  from drr_jax import grid
  from launch import common
  p = argparse.ArgumentParser()
  common.add_config_flags(p)
  cfg = lambda *argv: common.config_from_flags(p.parse_args(["--attack", *argv]))["attack"]
  assert cfg("iab")["iab_mask_epochs"] == 1 and cfg("iab")["iab_channels"] == 16  # cpu
  paper = cfg("iab", "--preset", "paper")
  assert paper["iab_mask_epochs"] == 25 and paper["iab_channels"] == 32
  assert paper["iab_mask_density"] == 0.032 and paper["iab_lambda_norm"] == 100
  assert cfg("iab", "--set", "attack.iab_mask_epochs=3")["iab_mask_epochs"] == 3
  assert "iab_channels" not in cfg("wanet")  # other attacks' configs are unchanged
  with pytest.raises(SystemExit):
    p.parse_args(["--attack", "iba"])
  cell = grid.Cell("resnet18", 0.25, "iab", 0.1, 0, "cpu", (("iab_mask_epochs", 2),))
  assert grid.cell_config(cell)["attack"]["iab_mask_epochs"] == 2
  assert grid.cell_config(cell)["attack"]["iab_channels"] == 16
  with pytest.raises(ValueError, match="mask_density"):
    iab.settings({"iab_mask_density": 0.0})
  from drr_jax import report
  assert report.ATTACK_NAMES["iab"] == "Input-aware (IAB)"
  assert report._attack_text({"config": {"training": {"attack": {
      "name": "iab", "poison_ratio": 0.1}}}}) == (
          "Input-aware (IAB), mask density 0.032, target 0, 10 % per batch (+ as many cross)")


def test_g_steps_on_the_running_sum_of_its_gradients_as_the_originals():
  """The original's train_step zeroes only the classifier's gradients, so G's Adam reads
  the sum of every gradient so far; `iab_accumulate_g=False` feeds it each step's own."""
  import optax
  params = {"w": jnp.zeros(3)}
  grads = [{"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([0.5, 1.0, -1.0])},
           {"w": jnp.array([-3.0, 0.0, 2.0])}]
  sums = [{"w": sum(g["w"] for g in grads[:i + 1])} for i in range(len(grads))]

  def steps(tx, inputs):
    state, out = tx.init(params), []
    for g in inputs:
      u, state = tx.update(g, state, params)
      out.append(np.asarray(u["w"]))
    return out

  seen = steps(optax.chain(iab.running_sum(), optax.sgd(1.0)), grads)
  np.testing.assert_allclose(seen, [-np.asarray(s["w"]) for s in sums], rtol=1e-6)
  on = iab.settings({}, "cpu")
  off = iab.settings({"iab_accumulate_g": False}, "cpu")
  assert on.accumulate_g is True and off.accumulate_g is False
  # G's optimizer fed the gradients = plain Adam fed their running sums, and not Adam
  # fed the gradients themselves
  accumulated = steps(iab.generator_optimizer(on, 100), grads)
  np.testing.assert_allclose(accumulated, steps(iab.generator_optimizer(off, 100), sums),
                             rtol=1e-6)
  assert not np.allclose(accumulated[-1], steps(iab.generator_optimizer(off, 100),
                                                grads)[-1])
  assert all(iab.defaults(p)["iab_accumulate_g"] is True for p in ("paper", "cpu", "tiny"))
  with pytest.raises(ValueError, match="iab_accumulate_g"):
    iab.settings({"iab_accumulate_g": "yes"})


def test_a_checkpoint_from_before_accumulation_is_another_config():
  """IAB models trained before `iab_accumulate_g` existed zeroed G's gradients: their
  configs lack the key, which must read as False, not as today's default."""
  import copy

  from drr_jax import grid
  from drr_jax.attacks import same_training_config
  cell = next(c for c in grid.NEW_ATTACKS if c.attack == "iab")
  wanted = grid.cell_config(cell)
  assert wanted["attack"]["iab_accumulate_g"] is True
  old = copy.deepcopy(wanted)
  del old["attack"]["iab_accumulate_g"]
  assert not same_training_config(old, wanted)
  off = copy.deepcopy(wanted)
  off["attack"]["iab_accumulate_g"] = False
  assert same_training_config(old, off) and same_training_config(wanted, wanted)


def _config():
  cfg = configs.get_config("tiny")
  cfg["data"]["val_fraction"] = 0.1
  cfg["attack"].update(name="iab", poison_ratio=RATIO, target=2)
  cfg["attack"].update(attacks.default_settings("iab", "tiny"), iab_mask_epochs=MASK_EPOCHS)
  cfg["train"].update(epochs=2, batch_size=BATCH)
  return cfg


# 70 training images: 8 steps an epoch, each 2 backdoor, 2 cross and 4 clean images
MASK_EPOCHS, BATCH, RATIO = 2, 8, 0.25


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny IAB training (ResNet-18 x0.125, G and M 4 channels wide, 70 images in 8
  batches of 8, 2 epochs of mask pre-training, 2 joint epochs), with every joint step's
  inputs and outputs and G as it was before the step. Its compiled programs stay cached
  for the resume test."""
  tmp = tmp_path_factory.mktemp("iab")
  cfg = _config()
  make_fake_zips(tmp / "zips", per_class=8)  # 70 train, 10 val
  ds = datasets.load(cfg, tmp / "zips", tmp / "cache", test=False)
  seen = []
  real = iab.make_update_fn

  def capturing(*args, **kwargs):
    fn = real(*args, **kwargs)

    def update(state, mask_vars, images, labels, partners, key):
      out = fn(state, mask_vars, images, labels, partners, key)
      seen.append({"gen": jax.device_get(iab.variables(state["gen"])),
                   "mask": jax.device_get(mask_vars), "step": int(state["step"]),
                   "images": images, "labels": labels, "partners": partners,
                   "inputs": np.asarray(out[2])})
      return out
    return update

  train._iab_programs.cache_clear()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(iab, "make_update_fn", capturing)
    state, meta = train.train(cfg, ds.base, ds.val, tmp / "a", progress=False)
    yield {"cfg": cfg, "ds": ds, "tmp": tmp, "seen": list(seen), "state": state,
           "meta": meta}
  train._iab_programs.cache_clear()


def test_training_starts_from_the_clean_set_and_logs_both_phases(run):
  ds, state, meta = run["ds"], run["state"], run["meta"]
  assert ds.train is None and len(ds.base.poison_idx) == 0  # nothing poisoned yet
  assert int(state["step"]) == 16 and int(state["mask_step"]) == 8 * MASK_EPOCHS
  assert [h["epoch"] for h in meta["history"]] == [1, 2]
  assert len(meta["mask_history"]) == MASK_EPOCHS
  assert 0.0 <= meta["history"][-1]["val_asr"] <= 1.0
  assert np.isfinite(meta["history"][-1]["train_diversity_loss"])


def test_mask_pretraining_pulls_the_mask_toward_its_density(run):
  hist = run["meta"]["mask_history"]
  first, last = hist[0], hist[-1]
  assert first["density"] > 0.3  # a fresh mask is about half on
  # 16 steps, 6 of them at the full learning rate: well on the way down
  assert last["density"] < 0.75 * first["density"]
  assert last["norm"] < 0.75 * first["norm"] and last["loss"] < 0.8 * first["loss"]
  assert all(np.isfinite(h["diversity"]) for h in hist)


def test_the_record_holds_what_the_final_epoch_trained_on(run):
  cfg, ds, seen = run["cfg"], run["ds"], run["seen"]
  base = ds.base
  _, _, _, rec = checkpoint.load_model(run["tmp"] / "a")
  last = [s for s in seen if s["step"] >= 8]
  final = list(iab.batches(len(base.labels), RATIO, cfg["seed"], 1, BATCH))
  assert len(last) == len(final) == 8
  k = final[0].n_bd
  assert k == 2
  np.testing.assert_array_equal(rec["iab_rows"],
                                np.concatenate([b.index[:2 * k] for b in final]))
  trained_on = np.concatenate([s["inputs"][:2 * k] for s in last])
  np.testing.assert_array_equal(  # stored as the difference from the clean images
      base.images[rec["iab_rows"]].astype(np.int16) + rec["iab_delta"], trained_on)
  np.testing.assert_array_equal(rec["iab_kind"], np.tile(np.repeat([1, 2], k), 8))
  for s, b in zip(last, final):
    np.testing.assert_array_equal(s["images"], base.images[b.index])
    np.testing.assert_array_equal(s["partners"], base.images[b.partners])
    np.testing.assert_array_equal(s["inputs"][2 * k:], base.images[b.index[2 * k:]])
    assert np.all(s["labels"][:k] == 2)  # backdoor samples: the target
    np.testing.assert_array_equal(s["labels"][k:], base.labels[b.index[k:]])  # cross: kept
  used = datasets.load(cfg, run["tmp"] / "zips", run["tmp"] / "cache", test=False,
                       record=rec).train
  rows = np.asarray(rec["iab_rows"])
  kind = np.asarray(rec["iab_kind"])
  np.testing.assert_array_equal(used.images[rows], trained_on)
  np.testing.assert_array_equal(used.poison_idx, np.sort(rows[kind == 1]))
  np.testing.assert_array_equal(used.poison_idx, checkpoint.poison_indices(rec))
  assert np.all(used.labels[used.poison_idx] == 2)
  np.testing.assert_array_equal(used.labels[rows[kind == 2]], base.labels[rows[kind == 2]])
  untouched = np.setdiff1d(np.arange(len(base.labels)), rows)
  np.testing.assert_array_equal(used.images[untouched], base.images[untouched])
  np.testing.assert_array_equal(used.labels[untouched], base.labels[untouched])


def test_backdoor_rows_carry_their_own_trigger_and_cross_rows_their_partners(run):
  """Recomputed outside the training program from G as it was at the step (the rounding
  to whole pixels may then differ by one grey level)."""
  s = run["seen"][-1]
  k = len(s["partners"])
  gen, mask_net = iab.networks(run["cfg"]["attack"]["iab_channels"])

  @jax.jit
  def made(rows_x, trigger_x):
    p, _ = gen.apply(s["gen"], trigger_x, train=True, mutable=["batch_stats"])
    m = iab.threshold(mask_net.apply(s["mask"], trigger_x, train=False))
    return iab.to_pixels(iab.stamp(rows_x, p, m))

  x = s["images"].astype(np.float32)
  partners = s["partners"].astype(np.float32)
  for got, want in ((s["inputs"][:k], made(x[:k], x[:k])),
                    (s["inputs"][k:2 * k], made(x[k:2 * k], partners))):
    want = np.asarray(want)
    assert np.abs(got - want).max() <= 1 and np.mean(got == want) > 0.99
  own = np.asarray(made(x[k:2 * k], x[k:2 * k]))
  assert np.mean(s["inputs"][k:2 * k] != own) > 0.005  # not the cross rows' own trigger


def _warmed(net, variables, passes=40):
  """The variables with BatchNorm's running statistics brought near the data's by that
  many training-mode passes, as a long training leaves them (after the tiny run's few
  steps they are still mostly their initial 0 and 1, where the deep stack's eval-mode
  output hardly depends on its input)."""
  step = jax.jit(lambda v, x: {**v, **net.apply(v, x, train=True,
                                                mutable=["batch_stats"])[1]})
  for i in range(passes):
    variables = step(variables, _images(16, seed=100 + i).astype(np.float32))
  return variables


def test_generated_triggers_differ_across_inputs(run):
  _, _, _, rec = checkpoint.load_model(run["tmp"] / "a")
  gen, mask_net = iab.networks(iab.channels_of(rec["iab_generator"]))
  gv, mv = _warmed(gen, rec["iab_generator"]), _warmed(mask_net, rec["iab_mask_net"])
  trig = attacks.trigger_from_record(iab.record(4, (32, 32, 3), gv, mv, *([],) * 4))
  assert isinstance(trig.fn, iab.GeneratedTrigger)
  val = run["ds"].val
  x = val.images[val.labels != 2]  # the images the run's val ASR triggered
  n = len(x)
  out = attacks.apply_trigger(x, trig)
  assert out.dtype == np.uint8 and out.shape == x.shape
  residual = out.astype(np.int16) - x
  patterns, masks = trig.fn.patterns_and_masks(x)
  assert patterns.shape == x.shape and masks.shape == (n, 32, 32, 1)
  assert 0 < patterns.min() and patterns.max() < 1 and 0 < masks.min() and masks.max() < 1
  for i in range(n):
    for j in range(i + 1, n):
      assert np.abs(patterns[i] - patterns[j]).mean() > 1e-3
      assert np.abs(masks[i] - masks[j]).mean() > 1e-3
      assert not np.array_equal(residual[i], residual[j])
  # a function of the input alone: the same image gets the same trigger in any batch
  order = np.random.default_rng(0).permutation(n)
  np.testing.assert_array_equal(attacks.apply_trigger(x[order], trig), out[order])
  want = np.clip(np.rint(x + (255 * patterns - x) * masks), 0, 255)
  assert np.abs(want - out).max() <= 1 and np.mean(want == out) > 0.99


def test_evaluation_stamps_each_image_with_its_own_generated_trigger(run):
  cfg = run["cfg"]
  model, variables, _, rec = checkpoint.load_model(run["tmp"] / "a")
  trig = attacks.trigger_from_record(rec)
  rng = np.random.default_rng(0)
  test = data.Split(_images(40, seed=5), rng.permutation(np.arange(40) % 10).astype(np.int32))
  res = evaluate.evaluate(model, variables, test, trig, cfg["attack"], batch_size=16,
                          progress=False)
  keep = test.labels != 2
  triggered = trig.fn(test.images[keep])
  preds = evaluate.predict(model, variables, triggered, 16, False)
  assert res["asr"] == pytest.approx(np.mean(preds == 2))
  assert 0.0 <= res["acc"] <= 1.0
  assert not np.array_equal(triggered, test.images[keep])


def test_a_killed_run_resumes_to_the_same_result(run, tmp_path, monkeypatch):
  cfg, ds, full = run["cfg"], run["ds"], run["state"]
  real_save = checkpoint.save
  calls = []

  def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    calls.append(1)
    if len(calls) == MASK_EPOCHS + 1:  # the mask epochs' saves, then the first joint one
      raise KeyboardInterrupt("killed after the first joint epoch")

  monkeypatch.setattr(checkpoint, "save", save_then_die)
  with pytest.raises(KeyboardInterrupt):
    train.train(cfg, ds.base, ds.val, tmp_path, progress=False)
  monkeypatch.setattr(checkpoint, "save", real_save)
  resumed, meta = train.train(cfg, ds.base, ds.val, tmp_path, resume=True, progress=False)
  assert [h["epoch"] for h in meta["history"]] == [1, 2]
  assert len(meta["mask_history"]) == MASK_EPOCHS
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  for part in ("params", "batch_stats"):
    assert same(resumed[part], full[part])
    assert same(resumed["gen"][part], full["gen"][part])
    assert same(resumed["mask"][part], full["mask"][part])
  rec = checkpoint.load_model(tmp_path)[3]
  rec_full = checkpoint.load_model(run["tmp"] / "a")[3]
  np.testing.assert_array_equal(rec["iab_delta"], rec_full["iab_delta"])
  cfg = {**cfg, "attack": {**cfg["attack"], "iab_lambda_div": 2.0}}
  with pytest.raises(checkpoint.CheckpointError, match="another config"):
    train.train(cfg, ds.base, ds.val, tmp_path, resume=True, progress=False)


def test_an_export_without_samples_gives_the_trigger_and_refuses_the_defense_set(run):
  """The committed form of an IAB checkpoint leaves out the recorded samples (a data
  set): the model and the test-time trigger still load, and asking it for the training
  set is an error that says why, not the clean set in silence."""
  out = checkpoint.export_variables(run["tmp"] / "a", run["tmp"] / "slim", samples=False)
  _, _, _, rec = checkpoint.load_model(out)
  assert not set(checkpoint.SAMPLE_KEYS) & set(rec)
  assert "iab_generator" in rec and np.any(rec["poison_mask"])
  x = run["ds"].val.images[:4]
  _, _, _, full = checkpoint.load_model(run["tmp"] / "a")
  np.testing.assert_array_equal(iab.trigger_from_record(rec).fn(x),
                                iab.trigger_from_record(full).fn(x))
  with pytest.raises(ValueError, match="no recorded samples"):
    iab.trained_set(run["ds"].base, rec)


def test_a_rerun_prefers_the_training_checkpoint_to_an_export_without_samples(run, tmp_path):
  """The grid reuses a finished export; one that left out IAB's samples cannot give the
  defense set, so where the training checkpoint (which has them) is finished, that is
  reused instead; without it the export is still returned (its model and trigger load)."""
  from drr_jax import experiment
  full, cfg = run["tmp"] / "a", run["cfg"]
  slim = checkpoint.export_variables(full, tmp_path / "slim", samples=False)
  whole = checkpoint.export_variables(full, tmp_path / "whole")
  assert experiment.lacks_samples(slim) and not experiment.lacks_samples(whole)
  assert not experiment.lacks_samples(full)
  assert experiment.finished_meta(full, cfg) is not None
  assert experiment.reuse_folder(slim, full, cfg) == full
  assert experiment.reuse_folder(whole, full, cfg) == whole
  assert experiment.reuse_folder(slim, tmp_path / "absent", cfg) == slim

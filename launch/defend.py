r"""Defend a model (DRR, or a baseline); report ACC/ASR before/after.

With no arguments: DRR on the committed backdoored checkpoint
artifacts/checkpoints/ho-r18-badnets5-bl-t9-p5 (ResNet-18 x0.25, BadNets 5x5 patch, 5 %
poison, a held-out model of the zoo: DRR's settings were never chosen on it) and the
CIFAR-10 zips in $DRR_DATA_DIR; the defended checkpoint, result.json and defense.png (the
per-layer criterion and a few triggered images with their predictions before/after) go
to runs/ho-r18-badnets5-bl-t9-p5-drr (-2, -3, ... added if that folder exists).

A run of this project:
  python -m launch.defend --checkpoint artifacts/wrn28_1-badnets-cpu \
      --data_dir ../shared/data --out runs/wrn28_1-badnets-drr [--method clp]
The defended model is written (atomically) as a new checkpoint under --out. DRR, CLP, EP
and RR-EP use the poisoned training set (CLP only its shape); FP, ANP and RR-FP also get
the clean validation split (5 % of the training set, never the test set).

Your own Flax model, variables and (poisoned) images, no retraining (drr_jax/assets.py):
  python -m launch.defend --model my_pkg.nets:Net --model_args '{"num_classes": 10}' \
      --variables net.msgpack --images train_folder/ --out net-drr.msgpack \
      [--clean_eval clean_val/ --triggered_eval triggered/ --target 0]
--variables: an orbax folder or a flax msgpack file, written back in the same form;
--images: a folder of PNG/JPEG (ImageFolder or flat), a .npz, or tfds:name/split.

A BackdoorBench attack_result.pt (drr_jax/interop/torch.py), written back as one:
  python -m launch.defend --torch_checkpoint record/<attack>/attack_result.pt \
      [--images clean_train.npz | --data_dir ../shared/data] [--out defended.pt]
The defender's images are the record's poisoned samples plus clean training images
(--images, else drr_jax's CIFAR-10 training set), as `interop.torch.defender_images`.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

from drr_jax import adversary, assets, attacks, checkpoint, configs, datasets, evaluate, utils
from drr_jax.defenses import METHODS, DefenseError, get_defense
from launch.common import USER_ERRORS, add_debug_flag, fail, output_named, parser

PRESETS = ("drr", "paper")  # --preset, kept as an alias of --method for these two
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CHECKPOINT = os.path.join(ROOT, "artifacts", "checkpoints",
                                  "ho-r18-badnets5-bl-t9-p5")
FIGURE_IMAGES = 6  # triggered validation images in defense.png


def _free_out(base: str) -> str:
  """`base`, or `base-2`, `base-3`, ... : the first that does not exist."""
  out, i = base, 1
  while os.path.exists(out):
    i += 1
    out = f"{base}-{i}"
  return out


def _split_table(before: dict, after: dict) -> str:
  """ACC/ASR before -> after per split, as a small table (percent)."""
  lines = [f"{'split':6s}{'ACC before':>11s}{'ACC after':>10s}{'ASR before':>11s}"
           f"{'ASR after':>10s}"]
  for split in after:
    b, a = before[split], after[split]
    lines.append(f"{split:6s}{100 * b['acc']:11.2f}{100 * a['acc']:10.2f}"
                 f"{100 * b['asr']:11.2f}{100 * a['asr']:10.2f}")
  return "\n".join(lines)


def _figure(path, model, variables, defended, report, split, trigger, acfg, title):
  """defense.png: the per-layer criterion and a few triggered validation images."""
  from drr_jax import data, plots
  images = before = after = labels = None
  target = None
  if trigger is not None:
    targets = attacks.target_labels(split.labels, attacks.resolve(acfg))
    idx = np.flatnonzero(targets != split.labels)[:FIGURE_IMAGES]
    images = attacks.apply_trigger(split.images[idx], trigger)
    labels = split.labels[idx]
    before = evaluate.predict(model, variables, images, progress=False)
    after = evaluate.predict(model, defended, images, progress=False)
    if acfg.get("label_mode", "all2one") == "all2one":
      target = int(targets[0])
  # a project checkpoint is always CIFAR-10 (datasets.load)
  return plots.defense_figure(path, report, images, before, after, data.CLASSES, target,
                              title, labels)


def _metrics(model, variables, split, trigger, acfg, progress=True):
  m = evaluate.evaluate(model, variables, split, trigger, acfg, progress=progress)
  return {k: float(v) for k, v in m.items()}


def main(argv: list[str] | None = None) -> dict:
  p = parser(__doc__, "launch.defend")
  src = p.add_argument_group("what to defend (one of)")
  src.add_argument("--checkpoint", help="a run folder written by launch.train (default, "
                   "when no source is given: the committed backdoored checkpoint "
                   "artifacts/checkpoints/ho-r18-badnets5-bl-t9-p5 of this repository, "
                   "wherever you run from)")
  src.add_argument("--model", help="your Flax module: 'my_pkg.nets:Net' or "
                   "'path/nets.py:Net' (with --variables and --images)")
  src.add_argument("--torch_checkpoint", help="a BackdoorBench attack_result.pt")
  own = p.add_argument_group("your own assets (--model, --torch_checkpoint)")
  own.add_argument("--model_args", help="JSON keyword arguments of --model")
  own.add_argument("--variables", help="orbax folder or flax .msgpack file of --model")
  own.add_argument("--images", help="the defense's images: PNG/JPEG folder, .npz or "
                   "tfds:name/split (--torch_checkpoint: the clean training images; "
                   "default drr_jax's CIFAR-10 training set)")
  own.add_argument("--clean_data", help="labelled clean images (folder or .npz) for the "
                   "methods that need clean data (fp, anp, rr-fp)")
  own.add_argument("--clean_eval", help="labelled clean images (folder or .npz): ACC")
  own.add_argument("--triggered_eval", help="triggered images (folder or .npz): ASR, "
                   "with --target")
  own.add_argument("--target", type=int, help="the attack's target class, for ASR")
  own.add_argument("--aligned", action="store_true", help="--torch_checkpoint: --images "
                   "is the clean training split in BackdoorBench's order")
  own.add_argument("--max_images", type=int, help="--torch_checkpoint: a random subset "
                   "of the defender's images of this size")
  own.add_argument("--normalization", help="--torch_checkpoint: the model's input "
                   "normalization (default BackdoorBench's CIFAR-10)")
  own.add_argument("--trusted", action="store_true", help="--torch_checkpoint: unpickle "
                   "anything (runs the file's code; only for files you trust)")
  p.add_argument("--data_dir", help="CIFAR-10 zips folder (default: $DRR_DATA_DIR)")
  p.add_argument("--out", help="where the defended model goes (must not exist): a "
                 "checkpoint folder (default runs/<checkpoint name>-<method>, with -2, "
                 "-3, ... added if that exists); with --variables the same form as it "
                 "(default beside it, '-<method>' added); with --torch_checkpoint a .pt")
  p.add_argument("--method", choices=METHODS,
                 help="drr (default): the project's DRR; paper: Algorithm 1 as written; "
                 "fp, anp, clp, ep: the baselines; rr-fp, rr-ep: this project's "
                 "rank-reduction versions of FP and EP (drr_jax/defenses/__init__.py)")
  p.add_argument("--preset", choices=PRESETS, help="the same as --method drr|paper")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting of the method, e.g. --set k=2 --set tau=1.5 for DRR "
                 "(defenses/drr/config.py), --set u=2.5 for CLP")
  p.add_argument("--no_test", action="store_true", help="skip the test-set evaluation")
  p.add_argument("--plain_pass", action="store_true", help="--checkpoint: also time one "
                 "plain inference pass over the defense images, as a reference for the "
                 "defense's cost (result.json: plain_pass_seconds)")
  add_debug_flag(p)
  args = p.parse_args(argv)
  try:
    return _run(args)
  except USER_ERRORS as e:  # a path, a file, a setting: one line (--debug: the traceback)
    fail(e, args.debug)


def _run(args: argparse.Namespace) -> dict:
  if args.method and args.preset and args.method != args.preset:
    sys.exit(f"error: --method {args.method} and --preset {args.preset} disagree")
  method = args.method or args.preset or "drr"
  sources = [f for f in ("checkpoint", "model", "torch_checkpoint")
             if getattr(args, f) is not None]
  for f in sources:
    if not getattr(args, f).strip():
      raise ValueError(f"--{f} is empty")
  if not sources:
    args.checkpoint = DEFAULT_CHECKPOINT
    print(f"no model given: defending the committed backdoored checkpoint "
          f"{os.path.relpath(DEFAULT_CHECKPOINT)}")
    sources = ["checkpoint"]
  if len(sources) != 1:
    sys.exit("error: give one of --checkpoint, --model (with --variables and --images) "
             "or --torch_checkpoint" + (f", not {len(sources)}" if sources else ""))
  defense = get_defense(method)
  if not args.checkpoint:
    try:
      drr_cfg = configs.override(defense.default_config(), args.set)
      defense.check(drr_cfg)
    except (KeyError, ValueError) as e:
      sys.exit(f"error: {e}")
    return _defend_assets(args, method, defense, drr_cfg)
  out = args.out or _free_out(os.path.join(
      "runs", os.path.basename(os.path.normpath(args.checkpoint)) + f"-{method}"))
  try:
    assets.check_output(out)  # it exists, or cannot be written: before any work
  except assets.AssetError as e:
    sys.exit(f"error: {e}")
  try:
    drr_cfg = configs.override(defense.default_config(), args.set)
    defense.check(drr_cfg)  # every setting checked before anything is loaded
  except (KeyError, ValueError) as e:
    sys.exit(f"error: {e}")
  try:
    model, variables, meta, record = checkpoint.load_model(args.checkpoint)
  except checkpoint.CheckpointError as e:
    sys.exit(f"error: {e}")
  cfg = meta["config"]
  ds = datasets.load(cfg, args.data_dir, test=not args.no_test, record=record,
                     attacker_model=adversary.beside(args.checkpoint))
  acfg = cfg["attack"]
  trigger = attacks.trigger_from_record(record)
  if acfg["name"] == "none":
    trigger = None

  plain_seconds = None
  if args.plain_pass:  # a reference for the defense's cost, not needed to defend
    t0 = time.time()
    evaluate.predict(model, variables, ds.train.images, progress=True, desc="plain pass")
    plain_seconds = time.time() - t0
  before = {"val": _metrics(model, variables, ds.val, trigger, acfg)}
  if not args.no_test:
    before["test"] = _metrics(model, variables, ds.test, trigger, acfg)
  clean = None
  if defense.needs_clean:
    clean = (ds.val.images, ds.val.labels)
    print(f"{method} uses clean data: the clean validation split ({len(ds.val.labels)} "
          "images held out from training), never the test set; its val figures below "
          "are on data it saw")
  try:
    defended, report = defense.defend(model, variables, ds.train.images, config=drr_cfg,
                                      clean=clean)
  except DefenseError as e:
    sys.exit(f"error: {e}")
  after = {"val": _metrics(model, defended, ds.val, trigger, acfg)}
  if not args.no_test:
    after["test"] = _metrics(model, defended, ds.test, trigger, acfg)
  print(defense.format_report(report))
  print(_split_table(before, after))
  print(f"{method} {report['seconds']:.1f} s" + (
      "" if plain_seconds is None else f"; one plain inference pass over the "
      f"{len(ds.train.labels)} training images {plain_seconds:.1f} s"))
  result = {"checkpoint": args.checkpoint, "method": method,
            "drr" if method in PRESETS else method: report,
            "clean_data": "val" if defense.needs_clean else None, "before": before,
            "after": after, "plain_pass_seconds": plain_seconds,
            "machine": utils.machine_description()}
  name = os.path.basename(os.path.normpath(args.checkpoint))
  # the whole folder appears at once, or not at all; a full disk is named as --out's
  with output_named(out), utils.atomic_dir(out) as staged:
    mngr = checkpoint.manager(staged / "checkpoints", keep=1)
    checkpoint.save(mngr, 0, {"model": defended, "attack": record,
                              "meta": {**meta, "defense": result}})
    utils.write_json_atomic(staged / "result.json", result)
    try:
      _figure(str(staged / "defense.png"), model, variables, defended, report, ds.val,
              trigger, acfg, f"{method} on {name}")
      figure = os.path.join(out, "defense.png")
    except (ValueError, ImportError) as e:
      figure = f"none ({e})"
  print(f"defended checkpoint written to {out}; figure: {figure}")
  return result


# ------------------------------------------------------------------ your own assets

def _eval_sets(args, shape) -> dict:
  """The evaluation images, checked (labels, target, shape) before any work."""
  sets = {}
  if args.clean_eval:
    clean = assets.load_images(args.clean_eval, "--clean_eval")
    if clean.labels is None:
      raise assets.AssetError(f"--clean_eval {args.clean_eval}: has no labels (use an "
                              "ImageFolder layout or a .npz with 'labels')")
    sets["acc"] = clean
  if args.triggered_eval:
    if args.target is None:
      raise assets.AssetError("--triggered_eval needs --target (the attack's target "
                              "class)")
    trig = assets.load_images(args.triggered_eval, "--triggered_eval")
    if trig.labels is not None and not (trig.labels != args.target).any():
      raise assets.AssetError(f"--triggered_eval {args.triggered_eval}: every image is "
                              f"labelled {args.target}, the target; ASR counts the others")
    sets["asr"] = trig
  elif args.target is not None:
    raise assets.AssetError("--target is for --triggered_eval, which is not given")
  for key, data in sets.items():
    if data.images.shape[1:] != tuple(shape):
      flag = "--clean_eval" if key == "acc" else "--triggered_eval"
      raise assets.AssetError(f"{flag} {data.source}: images of shape "
                              f"{data.images.shape[1:]}, the defense's are {tuple(shape)}")
  return sets


def _measure(model, variables, sets: dict, target) -> dict:
  out = {}
  if "acc" in sets:
    d = sets["acc"]
    out["acc"] = float(np.mean(evaluate.predict(model, variables, d.images, progress=False)
                               == d.labels))
  if "asr" in sets:
    d = sets["asr"]
    keep = (d.labels != target) if d.labels is not None else np.ones(len(d.images), bool)
    preds = evaluate.predict(model, variables, d.images[keep], progress=False)
    out["asr"] = float(np.mean(preds == target))
  return out


def _table(before: dict, after: dict) -> str:
  lines = [f"{'':8s}{'before':>9s}{'after':>9s}"]
  for key in ("acc", "asr"):
    if key in before:
      lines.append(f"{key.upper() + ' (%)':8s}{100 * before[key]:9.2f}"
                   f"{100 * after[key]:9.2f}")
  return "\n".join(lines)


def _load_torch(args, method):
  """(model, variables, defender images, writer) of a BackdoorBench attack_result.pt."""
  from drr_jax.interop import torch as interop
  try:
    result = interop.load_attack_result(args.torch_checkpoint,
                                        normalization=args.normalization,
                                        trusted=args.trusted)
  except ImportError as e:
    raise assets.AssetError(f"--torch_checkpoint: {e}") from e
  except (interop.AttackResultError, ValueError, OSError) as e:
    raise assets.AssetError(f"--torch_checkpoint {args.torch_checkpoint}: {e}") from e
  if args.images:
    clean = assets.load_images(args.images, "--images").images
  else:
    from drr_jax import data
    try:
      clean = data.load_split("train", args.data_dir).images
    except Exception as e:  # noqa: BLE001 - DataError, a missing zip, ...
      raise assets.AssetError(f"--torch_checkpoint needs clean training images: give "
                              f"--images, or --data_dir with CIFAR-10 ({e})") from e
  try:
    images = interop.defender_images(result, clean, aligned=args.aligned,
                                     max_images=args.max_images)
  except ValueError as e:
    raise assets.AssetError(f"--images: {e}") from e
  out = args.out or os.path.join(os.path.dirname(args.torch_checkpoint),
                                 f"attack_result-{method}.pt")

  def write(variables):
    return interop.save_attack_result_model(args.torch_checkpoint, out, variables,
                                            trusted=args.trusted)
  return result.model, result.variables, images, out, write, {
      "layout": result.info["layout"], "normalization": result.info["normalization"]}


def _load_own(args, method):
  """(model, variables, images, out, writer) of --model/--variables/--images."""
  missing = [f"--{f}" for f in ("variables", "images") if not getattr(args, f)]
  if missing:
    raise assets.AssetError(f"--model needs {' and '.join(missing)}")
  model = assets.load_model_spec(args.model, args.model_args)
  images = assets.load_images(args.images, "--images").images
  loaded = assets.load_variables(args.variables, model, images.shape[1:])
  src = os.path.normpath(args.variables)
  if loaded.format == "msgpack":
    stem, ext = os.path.splitext(src)
    out = args.out or f"{stem}-{method}{ext or '.msgpack'}"
  else:
    out = args.out or f"{src}-{method}"
  return model, loaded.variables, images, out, (
      lambda v: assets.save_variables(v, loaded, out)), {"format": loaded.format}


def _check_finite(variables, source: str) -> None:
  """Refuses variables that hold NaN or Inf, naming them."""
  bad = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(variables)
         if np.issubdtype(np.asarray(a).dtype, np.floating)
         and not np.all(np.isfinite(np.asarray(a)))]
  if bad:
    raise assets.AssetError(f"{source}: NaN or Inf in {', '.join(bad[:5])}")


def _defend_assets(args, method, defense, cfg) -> dict:
  from drr_jax.defenses.common import check_labels
  from drr_jax.defenses.drr.inputs import check_fit
  try:
    if args.out:
      assets.check_output(args.out)
    loader = _load_torch if args.torch_checkpoint else _load_own
    model, variables, images, out, write, info = loader(args, method)
    assets.check_output(out)
    _check_finite(variables, args.variables or args.torch_checkpoint)
    check_fit(model, variables, images.shape[1:])
    sets = _eval_sets(args, images.shape[1:])
    clean = None
    if defense.needs_clean:
      if not args.clean_data:
        raise assets.AssetError(f"{method} needs clean labelled images: give --clean_data")
      c = assets.load_images(args.clean_data, "--clean_data")
      if c.labels is None:
        raise assets.AssetError(f"--clean_data {args.clean_data}: has no labels")
      clean = (c.images, c.labels)
    labelled = [("--clean_eval", sets["acc"].labels if "acc" in sets else None),
                ("--triggered_eval", sets["asr"].labels if "asr" in sets else None),
                ("--clean_data", clean[1] if clean else None)]
    for flag, labels in labelled:  # every label (and --target): one of the model's classes
      if labels is not None:
        check_labels(labels, model, variables, images.shape[1:],
                     f"{flag} {getattr(args, flag[2:])}: its labels")
    if args.target is not None:
      check_labels([args.target], model, variables, images.shape[1:], "--target")
  except (assets.AssetError, DefenseError) as e:
    sys.exit(f"error: {e}")
  print(f"{method}: {len(images)} images of shape {images.shape[1:]}")
  before = _measure(model, variables, sets, args.target)
  try:
    defended, report = defense.defend(model, variables, images, config=cfg, clean=clean)
  except DefenseError as e:
    sys.exit(f"error: {e}")
  after = _measure(model, defended, sets, args.target)
  print(defense.format_report(report))
  if before:
    print(_table(before, after))
  with output_named(out):
    write(defended)
  print(f"defended variables written to {out}")
  return {"method": method, "source": args.torch_checkpoint or args.variables,
          "out": str(out), "report": report, "before": before, "after": after, **info}


if __name__ == "__main__":
  main()

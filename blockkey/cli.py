"""The ``blockkey`` command line: thin parsing around library calls.

User errors (bad shapes, wrong or corrupt keys, unreadable images, lossy formats) end with one
line on stderr and exit code 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import __version__
from . import argtypes as at
from .errors import BlockkeyError, ImageFileError, KeyMismatchError
from .fileio import atomic_path, claim_folder, printable, refuse_existing
from .imageio import (
    MAX_IMAGE_PIXELS,
    check_output_suffix,
    read_codes,
    read_image,
    sample_image,
    set_max_image_pixels,
    write_png,
)
from .keys import RECOMMENDED_RECIPE, KeySet, parse_recipe, refuse_foreign_key
from .meta import RunMeta
from .runtime import AMP_MODES
from .show import step_grid
from .transforms import KeyedTransform

if TYPE_CHECKING:
    from .train import TrainConfig

EXIT_USER_ERROR = 2
TOUR_NOTE = "blockkey tour demo key (made by `blockkey tour`; not for real use)"


def _say(text: str, file: Any = None) -> None:
    """Print ``text`` with undecodable file-name bytes shown as ``\\xNN`` (:func:`blockkey.fileio.printable`)."""
    print(printable(text), file=file if file is not None else sys.stdout)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    _say(json.dumps(payload, indent=1) if getattr(args, "json", False) else text)


def _key_report(key: KeySet, path: str | None = None) -> dict[str, Any]:
    bits = key.key_space_bits()
    return {
        "path": path,
        "recipe": key.label.split("+"),
        "block_size": key.block_size,
        "channels": key.channels,
        "block_len": key.block_len,
        "fingerprint": key.fingerprint,
        "source": key.meta.get("source", "file"),
        "key_space_bits": {f"{i + 1}:{name}": round(b, 2) for i, (name, b) in enumerate(bits)},
        "key_space_bits_total": round(key.key_space_total(), 2),
    }


def _key_text(rep: dict[str, Any]) -> str:
    lines = [
        f"key file     {rep['path']}" if rep["path"] else None,
        f"recipe       {' -> '.join(rep['recipe'])}",
        f"block        {rep['block_size']}x{rep['block_size']} x {rep['channels']} channels (L = {rep['block_len']})",
        f"fingerprint  {rep['fingerprint']}",
        f"source       {rep['source']}",
        "key space    (log2; upper bounds, see docs/key-format.md)",
    ]
    for name, b in rep["key_space_bits"].items():
        lines.append(f"  {name:<11}{b:>10.1f} bits  (~10^{b * math.log10(2):.0f})")
    total = rep["key_space_bits_total"]
    lines.append(f"  {'total':<11}{total:>10.1f} bits  (~10^{total * math.log10(2):.0f})")
    return "\n".join(line for line in lines if line is not None)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_keygen(args: argparse.Namespace) -> int:
    recipe = parse_recipe(args.transforms)
    if args.passphrase is not None:
        passphrase = sys.stdin.readline().rstrip("\r\n") if args.passphrase == "-" else args.passphrase
        try:
            salt = bytes.fromhex(args.salt) if args.salt is not None else None
        except ValueError:
            raise BlockkeyError(f"--salt takes hex digits (e.g. 9f3a...); got {args.salt!r}") from None
        key = KeySet.derive(passphrase, recipe, args.block_size, args.channels, salt=salt)
    else:
        if args.salt is not None:
            raise BlockkeyError("--salt only makes sense with --passphrase")
        key = KeySet.generate(recipe, args.block_size, args.channels)
    if Path(args.output).suffix.lower() != ".json":
        raise BlockkeyError(f"key files are JSON; name the output *.json (got {args.output})")
    key.save(args.output, overwrite=args.force)
    rep = _key_report(key, args.output)
    if "kdf" in key.meta:
        rep["salt"] = key.meta["kdf"]["salt"]
    text = f"wrote {args.output} (mode 0600)\n" + _key_text(rep)
    if "salt" in rep:
        text += f"\nsalt         {rep['salt']}  (not secret; pass --salt {rep['salt']} to derive this key again)"
    _emit(args, rep, text)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    key = KeySet.load(args.key)
    rep = _key_report(key, args.key)
    _emit(args, rep, _key_text(rep))
    return 0


def _outputs(inputs: Sequence[str], outdir: str, suffix: str) -> list[tuple[Path, Path]]:
    out = Path(outdir)
    pairs = [(Path(p), out / (Path(p).stem + suffix)) for p in inputs]
    seen: dict[Path, Path] = {}
    for src, dst in pairs:
        check_output_suffix(dst)
        if dst in seen:
            raise BlockkeyError(f"{seen[dst]} and {src} would both be written to {dst}; encrypt them separately")
        if dst.resolve() == src.resolve():
            raise BlockkeyError(f"{dst} would overwrite its own input")
        seen[dst] = src
    if out.exists() and not out.is_dir():
        raise BlockkeyError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    return pairs


def _progress(items: list[Any], desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="img", disable=len(items) < 2 or not sys.stderr.isatty())


def _with_file(path: Path, err: BlockkeyError) -> BlockkeyError:
    msg = str(err)
    return type(err)(msg if msg.startswith(str(path)) else f"{path}: {msg}")


def cmd_encrypt(args: argparse.Namespace) -> int:
    if getattr(args, "npy", False):
        return _encrypt_npy(args)
    if getattr(args, "size", None):
        raise BlockkeyError("--size goes with --npy (PNG ciphertexts keep each image's own size)")
    key = KeySet.load(args.key)
    t = KeyedTransform(key, compat=args.compat)
    written = []
    for src, dst in _progress(_outputs(args.inputs, args.output, ".png"), "encrypt"):
        try:
            codes = t.encode(read_image(src)[None])[0]
        except BlockkeyError as e:
            raise _with_file(src, e) from None
        written.append(str(write_png(dst, codes, overwrite=args.force)))
    _emit(
        args,
        {"fingerprint": key.fingerprint, "written": written},
        "\n".join(f"wrote {w}" for w in written) + f"\nkey {key.fingerprint} ({'+'.join(key.recipe)})",
    )
    return 0


def cmd_decrypt(args: argparse.Namespace) -> int:
    if args.compat == "authors":
        raise BlockkeyError("--compat authors cannot decrypt: the authors' FFX truncation is not one-to-one")
    key = KeySet.load(args.key)
    t = KeyedTransform(key)
    has_ffx = t.has_ffx  # from the compiled tables: an FFX step with an all-zero mask writes 8-bit files
    written = []
    for src, dst in _progress(_outputs(args.inputs, args.output, ".png"), "decrypt"):
        try:
            codes = read_codes(src)
            if has_ffx and codes.dtype == torch.uint8:
                raise KeyMismatchError("8-bit image, but this key has an FFX step (its ciphertexts are 16-bit PNG)")
            if not has_ffx and codes.dtype != torch.uint8:
                raise KeyMismatchError("16-bit image, but this key has no FFX step (its ciphertexts are 8-bit PNG)")
            plain = t.decode(codes[None])[0]
        except BlockkeyError as e:
            raise _with_file(src, e) from None
        written.append(str(write_png(dst, plain, overwrite=args.force)))
    _emit(args, {"fingerprint": key.fingerprint, "written": written}, "\n".join(f"wrote {w}" for w in written))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    key = KeySet.load(args.key)
    check_output_suffix(args.output)
    image = read_image(args.image)
    try:
        grid = step_grid(key, image)
    except BlockkeyError as e:
        raise _with_file(Path(args.image), e) from None
    refuse_existing(args.output, args.force)
    with atomic_path(args.output, overwrite=args.force) as tmp:
        grid.save(tmp)
    _emit(args, {"written": args.output, "fingerprint": key.fingerprint}, f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    quiet = getattr(args, "json", False)
    res = run_demo(
        args.output,
        transforms=args.transforms,
        block_size=args.block_size,
        model=args.model,
        epochs=args.epochs,
        wrong_keys=args.wrong_keys,
        limit=args.limit,
        device=args.device,
        log=(lambda s: _say(s, sys.stderr)) if quiet else _say,
    )
    if quiet:
        _say(json.dumps(res, indent=1))
    return 0


def cmd_tour(args: argparse.Namespace) -> int:
    """Generate a key, encrypt the embedded sample, check the exact inverse, draw each step."""
    if 32 % args.block_size:
        raise BlockkeyError(
            f"the tour's images are 32x32 and 128x128: use a block size dividing 32, not {args.block_size}"
        )
    out = Path(args.output)
    key_path = out / "key.json"
    claim_folder(out, args.force, ours=_tour_folder)
    key = KeySet.generate(args.transforms, args.block_size).with_note(TOUR_NOTE)
    key.save(key_path, overwrite=True)
    image = sample_image()
    t = KeyedTransform(key)
    codes = t.encode(image[None])[0]
    enc_path = write_png(out / "sample.enc.png", codes, overwrite=True)
    restored = t.decode(read_codes(enc_path)[None])[0]
    exact = bool(torch.equal(restored, image))
    write_png(out / "sample.dec.png", restored, overwrite=True)
    step_grid(key, image).save(out / "steps.png")

    wrong = KeyedTransform(KeySet.generate(args.transforms, args.block_size))
    try:
        wrong.decode(codes[None])
        wrong_result = "decoded to noise (no check is possible for this recipe)"
    except KeyMismatchError:
        wrong_result = "refused: codes this key cannot produce"

    batch = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    t(batch)  # compile the 32x32 plan once
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        t(batch)
    rate = reps * 256 / (time.perf_counter() - start)

    rep = _key_report(key, str(key_path))
    payload = {
        "key": rep,
        "ciphertext": str(enc_path),
        "roundtrip_exact": exact,
        "wrong_key": wrong_result,
        "steps_png": str(out / "steps.png"),
        "throughput_img_per_s_32x32_batch256": round(rate),
    }
    text = "\n".join(
        [
            _key_text(rep),
            "",
            f"encrypted the embedded sample (16 CIFAR-10 images, 128x128) -> {enc_path}",
            f"decrypted it again: bit-exact = {exact}",
            f"decrypting with another key: {wrong_result}",
            f"each step drawn in {out / 'steps.png'}",
            f"throughput: {rate:,.0f} images/s (32x32, batch 256, {'+'.join(key.recipe)}, this CPU)",
            "",
            f"next: blockkey info {key_path}   |   blockkey show --key {key_path} IMAGE -o grid.png",
        ]
    )
    _emit(args, payload, text)
    return 0 if exact else 1


def _tour_folder(out: Path) -> bool:
    """A folder an earlier tour made: it holds the tour's own demo key (a real key is never replaced)."""
    try:
        refuse_foreign_key(out / "key.json", TOUR_NOTE)
    except BlockkeyError:
        return False
    return (out / "key.json").exists()


def _load_data(spec: str, *, train: bool, root: str | None, stream: int | None = None, workers: int = 2) -> Any:
    from .data import load_dataset, open_image_folder_stream

    if stream:
        return open_image_folder_stream(spec, stream, workers)
    return load_dataset(spec, train=train, root=root)


def _run_split(data: Any, meta: RunMeta) -> tuple[Any, Any]:
    """The (train, validation) split a run was trained with, recomputed from its recorded seed."""
    from .data import stratified_split, stratified_subset

    d = RunMeta.coerce(meta).data
    if d.get("limit"):
        data = stratified_subset(data, d["limit"], d.get("split_seed", 0))
    return stratified_split(data, d.get("val_fraction", 0.1), d.get("split_seed", 0))


def cmd_train(args: argparse.Namespace) -> int:
    from .data import stratified_split, stratified_subset
    from .models import model_kwargs_for
    from .train import fit

    key = KeySet.load(args.key) if args.key else None
    if args.passport and args.protection != "passport":
        raise BlockkeyError("--passport FILE goes with --protection passport")
    data = _load_data(args.data, train=True, root=args.data_root, stream=args.stream, workers=args.workers)
    if args.limit:
        data = stratified_subset(data, args.limit, args.seed)
    train, val = stratified_split(data, args.val_fraction, args.seed)
    model_kwargs = model_kwargs_for(
        args.model, key, train.image_shape, patch=args.patch, width=args.width, pretrained=args.pretrained
    )
    passports = None
    if args.protection == "passport":
        passports, model_kwargs = _passports_for(args, train, model_kwargs)
    cfg = train_config(args, model_kwargs)
    info = {
        "source": args.data,
        "val_fraction": args.val_fraction,
        "split_seed": args.seed,
        "limit": args.limit,
        "stream_image_size": args.stream,
    }
    meta = fit(
        train, val, key, cfg, args.output, resume=args.resume, device=args.device, data_info=info, passports=passports
    )
    meta = _write_card(args, val, key, passports, meta)
    last = meta.metrics
    text = f"wrote {args.output}: " + ", ".join(f"{k} {v}" for k, v in last.items())
    _emit(args, {"run": args.output, "metrics": last, "history": meta.history}, text)
    return 0


def train_config(args: argparse.Namespace, model_kwargs: dict[str, Any]) -> TrainConfig:
    """The :class:`~blockkey.train.TrainConfig` of parsed ``blockkey train`` arguments (one option per field)."""
    from .train import TrainConfig

    return TrainConfig(
        model_kwargs=model_kwargs,
        **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "model_kwargs"},
    )


def _write_card(args: argparse.Namespace, val: Any, key: KeySet | None, passports: Any, meta: RunMeta) -> RunMeta:
    """The model card (RUN_DIR/README.md), with accuracy on the validation split (rank 0 only under torchrun)."""
    from .card import evaluate_for_card, write_model_card

    if int(os.environ.get("RANK", "0")) != 0:
        return meta
    if val is not None and len(val):
        device = None if args.device == "auto" else args.device
        meta = evaluate_for_card(args.output, val, key, passports, device=device)
    write_model_card(args.output, meta)
    _say(f"wrote the model card {Path(args.output) / 'README.md'}", sys.stderr)
    return meta


def _passports_for(args: argparse.Namespace, train: Any, model_kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Passports for ``--protection passport``: loaded from ``--passport`` or drawn and written (0600)."""
    from .models import create_model, model_accepts
    from .passport import Passports

    if not model_accepts(args.model, "passport"):
        raise BlockkeyError(f"--protection passport: {args.model} has no passport variant (resnet18_cifar has)")
    c, h, w = train.image_shape
    if h != w:
        raise BlockkeyError(f"--protection passport needs square images; got {h}x{w}")
    model_kwargs = {**model_kwargs, "passport": True, "image_size": h}
    path = Path(args.passport or f"{str(args.output).rstrip('/')}.passport")
    if path.exists():
        return Passports.load(path), model_kwargs
    passports = Passports.generate(create_model(args.model, len(train.classes), c, **model_kwargs))
    passports.save(path)
    _say(f"wrote new passports {path} (mode 0600, fingerprint {passports.fingerprint}): keep them secret", sys.stderr)
    return passports, model_kwargs


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .checkpoint import read_meta
    from .data import stratified_subset
    from .evaluate import evaluate_run

    meta = read_meta(args.model)
    key = KeySet.load(args.key) if args.key else None
    passports = None
    if args.passport:
        from .passport import Passports

        passports = Passports.load(args.passport)
    spec = args.data or meta.data_source
    if not spec:
        raise BlockkeyError("--data is needed (the run does not record its data source)")
    stream = args.stream or meta.stream_image_size
    data = _load_data(spec, train=args.split != "test", root=args.data_root, stream=stream, workers=args.workers)
    if args.split == "val":
        data = _run_split(data, meta)[1]
    if args.sample:
        data = stratified_subset(data, args.sample, seed=12345)
    report = evaluate_run(
        args.model, data, key, wrong_keys=args.wrong_keys, device=args.device, passports=passports, tta=args.tta
    )
    if args.plot:
        check_output_suffix(args.plot)
        report.plot(args.plot, overwrite=args.force)
    views = "" if report.tta == "off" else f" (test-time augmentation: {report.tta})"
    head = f"{args.model} on {report.images} images of {spec}{views}"
    if report.key_matches is False:
        head += f"\nWARNING: key {report.given_key} is not the key this model was trained with"
    _emit(
        args, report.to_json(), head + "\n\n" + report.to_markdown() + (f"\n\nplot: {args.plot}" if args.plot else "")
    )
    return 0


def _conversion_text(args: argparse.Namespace, meta: RunMeta) -> str:
    c = meta.conversions[-1]
    return (
        f"wrote {args.output}: {meta.model} for key {c['to_key']} (was {c['from_key'] or 'non-protected'}), "
        f"no training; checked: max relative logit error {c['max_rel_logit_error_float64']:.1e} (float64), "
        f"{c['seconds']:.2f} s"
    )


def cmd_convert(args: argparse.Namespace) -> int:
    from .rekey import convert_run

    meta = convert_run(args.model, KeySet.load(args.key), args.output)
    _emit(args, {"run": args.output, **meta.conversions[-1]}, _conversion_text(args, meta))
    return 0


def cmd_harden(args: argparse.Namespace) -> int:
    """Fine-tuning suppression (blockkey.suppress) of a keyed run into a new run directory."""
    from .checkpoint import read_meta
    from .evaluate import align_classes
    from .suppress import SuppressConfig, harden

    meta = read_meta(args.model)
    key = KeySet.load(args.key)
    spec = args.data or meta.data_source
    if not spec:
        raise BlockkeyError("--data is needed (the run does not record its data source)")
    data = align_classes(_load_data(spec, train=True, root=args.data_root), list(meta.classes))
    train, val = _run_split(data, meta)
    cfg = SuppressConfig(
        alpha=args.alpha,
        steps=args.steps,
        epochs=args.epochs,
        batch_size=args.batch_size,
        thief_batch=args.thief_batch,
        lr=args.lr,
        thief_lrs=tuple(args.thief_lrs),
        thief_layers=tuple(args.thief_layers),
        thief_optimizers=tuple(args.thief_optimizers),
        thief_loss=args.thief_loss,
        plain_weight=args.plain_weight,
        seed=args.seed,
    )
    new = harden(args.model, key, train, args.output, cfg, val=val, device=args.device)
    _write_card(args, val, key, None, RunMeta.coerce(new))
    info = new["suppress"]
    last = info["history"][-1]
    text = (
        f"wrote {args.output}: key holder {last['val_holder']:.1%}, plain images {last['val_plain']:.1%} "
        f"(held-out); {info['seconds']:.0f} s, {info['time_factor']:.1f}x a key-holder step"
    )
    _emit(args, {"run": args.output, **info}, text)
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    from .rekey import rekey_run

    meta = rekey_run(args.model, KeySet.load(args.old_key), KeySet.load(args.new_key), args.output)
    _emit(args, {"run": args.output, **meta.conversions[-1]}, _conversion_text(args, meta))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from .attacks import Target
    from .attacks.registry import AttackData, settings_from_args
    from .checkpoint import load_model
    from .data import ImageFolderStream, stratified_subset
    from .runtime import pick_device

    model, meta = load_model(args.model)
    key = KeySet.load(args.key)
    model_key = meta.get("key")
    if model_key is None:
        raise KeyMismatchError(f"{args.model} is not protected: there is no key to attack")
    if model_key["fingerprint"] != key.fingerprint:
        raise KeyMismatchError(f"{args.key} is not the key of {args.model}: attacks score against the true key")
    spec = args.data or meta.get("data", {}).get("source")
    if not spec:
        raise BlockkeyError("--data is needed (the run does not record its data source)")
    data = _load_data(spec, train=True, root=args.data_root)
    if isinstance(data, ImageFolderStream):
        raise BlockkeyError("attacks need the images in memory; streamed datasets (--stream) are not supported")
    from .evaluate import align_classes

    train, val = _run_split(align_classes(data, meta["classes"]), meta)
    if args.sample:
        val = stratified_subset(val, args.sample, seed=12345)
    device = pick_device(None if args.device == "auto" else args.device)
    target = Target(model.to(device), meta, key, val, device)
    spec = args.attack_spec  # set by the attack's subparser (blockkey.attacks.registry)
    if args.plot:
        check_output_suffix(args.plot)
        if spec.x_axis is None:
            raise BlockkeyError(f"--plot: {spec.name} has one row; nothing to plot")
    report = spec.run(target, AttackData(train, run_dir=Path(args.model)), settings_from_args(spec, args))
    if args.plot:
        report.plot(args.plot, spec.x_axis, overwrite=args.force)
    _emit(args, report.to_json(), report.to_markdown() + (f"\n\nplot: {args.plot}" if args.plot else ""))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Classify image files and folders; unreadable files are reported and skipped (exit 2 at the end)."""
    import csv

    from .predict import Predictor, list_images

    if args.top_k < 1 or args.batch_size < 1:
        raise BlockkeyError(f"--top-k and --batch-size take positive counts; got {args.top_k}, {args.batch_size}")
    predictor = Predictor(
        args.model, args.key, passports=args.passport, device=args.device, batch_size=args.batch_size, tta=args.tta
    )
    paths = list_images(args.inputs)
    if not paths:
        raise ImageFileError(f"no image files in {' '.join(args.inputs)}")
    rows: list[dict[str, Any]] = []
    failed = 0
    for path, res in predictor.predict_files(paths, args.top_k):
        if isinstance(res, BlockkeyError):
            failed += 1
            _say(f"blockkey: error: {res}", sys.stderr)
            rows.append({"path": path, "error": str(res)})
            continue
        rows.append(res.to_json())
        if not args.json:
            _say(f"{path}\t" + "  ".join(f"{c} {p:.3f}" for c, p in zip(res.classes, res.probs, strict=True)))
    if args.json:
        _say(json.dumps({"model": args.model, "tta": args.tta, "predictions": rows, "failed": failed}, indent=1))
    if args.csv:
        k = min(args.top_k, len(predictor.classes))
        header = ["path"] + [f"{w}_{i + 1}" for i in range(k) for w in ("class", "prob")] + ["error"]
        with atomic_path(args.csv, overwrite=args.force) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in rows:
                top = [v for t in r.get("top", []) for v in (t["class"], t["prob"])]
                w.writerow([r["path"], *top, *[""] * (2 * k - len(top)), r.get("error", "")])
    if failed:
        _say(f"blockkey: error: {failed} of {len(paths)} files could not be classified", sys.stderr)
        return EXIT_USER_ERROR
    return 0


def _encrypt_npy(args: argparse.Namespace) -> int:
    """``encrypt --npy``: one float32 N x C x H x W array, the input of an ONNX export without the key."""
    from .export import keyed_input

    out = Path(args.output)
    if out.suffix.lower() != ".npy":
        raise BlockkeyError(f"--npy writes one array: name the output *.npy (got {out})")
    refuse_existing(out, args.force)
    size = _parse_size(args.size) if args.size else None
    arr = keyed_input([Path(p) for p in args.inputs], KeySet.load(args.key), size)
    with atomic_path(out, overwrite=args.force) as tmp:
        np.save(tmp, arr)
    dims = " x ".join(map(str, arr.shape))
    text = f"wrote {out}: float32 {dims} (the input 'keyed' of an ONNX export without the key)"
    _emit(args, {"written": str(out), "shape": list(arr.shape), "dtype": "float32"}, text)
    return 0


def _parse_size(text: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    try:
        h, w = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        h = w = 0
    if h < 1 or w < 1:
        raise BlockkeyError(f"--size takes H or HxW in pixels (e.g. 32 or 224x224); got {text!r}")
    return h, w


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    rep = export_onnx(args.model, args.output, args.key, passports=args.passport, force=args.force, opset=args.opset)
    shape = " x ".join(map(str, rep.input_shape))
    lines = [
        f"wrote {rep.path}: {rep.mode}, input '{rep.input_name}' {rep.input_dtype} {shape}, output 'logits', "
        f"opset {rep.opset}, dynamic batch ({rep.seconds:.1f} s)",
        f"checked with onnxruntime: max |logit difference| to PyTorch {rep.max_abs_logit_diff:.1e}",
    ]
    if rep.mode == "keyed-input":
        lines.append(
            f"the file holds no key: clients feed it the key's output (blockkey encrypt --key KEY --npy IMAGES "
            f"-o x.npy, or blockkey.keyed_input), key {rep.fingerprint}"
        )
    elif rep.holds_secret:
        what = "PASSPORTS" if rep.mode == "passports-in-graph" else "KEY"
        lines.append(
            f"THIS FILE HOLDS THE {what} ({rep.fingerprint}; written with mode 0600): keep it on trusted devices only"
        )
    _emit(args, rep.to_json(), "\n".join(lines))
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = at.Parser(
        prog="blockkey",
        description="Protect image classifiers with a secret key: block-wise keyed transforms.",
    )
    p.add_argument("--version", action="version", version=f"blockkey {__version__}")
    p.add_argument(
        "--max-pixels",
        type=at.MAX_PIXELS,
        metavar="N",
        help=f"decode images of up to N pixels (default {MAX_IMAGE_PIXELS}, or BLOCKKEY_MAX_PIXELS)",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_demo,
        _add_tour,
        _add_keygen,
        _add_info,
        _add_encrypt_decrypt,
        _add_show,
        _add_train,
        _add_evaluate,
        _add_attack,
        _add_harden,
        _add_convert,
        _add_rekey,
        _add_predict,
        _add_export,
    ):
        add(sub)
    return p


def _on_off(default: bool) -> str:
    return f"default: {'on' if default else 'off'}"


def _command(sub: Any, name: str, help_: str, *, json_flag: bool = True) -> argparse.ArgumentParser:
    """A subcommand parser with ``help_`` as its description (and ``--json`` unless ``json_flag`` is off)."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
    if json_flag:
        sp.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    return sp


def _add_demo(sub: Any) -> None:
    from .demo import DEMO_MODEL

    sp = _command(
        sub, "demo", "train a protected model and its non-protected twin on embedded CIFAR-10 images, compare"
    )
    sp.add_argument(
        "-o",
        "--output",
        type=at.output_path,
        default="blockkey-demo",
        help="folder for the demo's runs (default %(default)s)",
    )
    sp.add_argument(
        "--transforms", default=RECOMMENDED_RECIPE, help="recipe (default %(default)s: the recommended mode)"
    )
    sp.add_argument(
        "--block-size", type=at.BLOCK_SIZE, default=4, help="block size M, dividing 32 (default %(default)s)"
    )
    sp.add_argument("--model", default=DEMO_MODEL, help="architecture (default %(default)s)")
    sp.add_argument("--epochs", type=at.EPOCHS, default=6, help="epochs per model (default %(default)s)")
    sp.add_argument(
        "--wrong-keys", type=at.NON_NEGATIVE_INT, default=20, help="random wrong keys to try (default %(default)s)"
    )
    sp.add_argument("--limit", type=at.COUNT, help="train on a stratified sample of N images (quick check)")
    sp.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    sp.set_defaults(func=cmd_demo)


def _add_tour(sub: Any) -> None:
    sp = _command(sub, "tour", "the 60-second tour: make a key, encrypt the embedded sample, check the inverse")
    sp.add_argument(
        "-o",
        "--output",
        type=at.output_path,
        default="blockkey-tour",
        help="folder for the tour's files (default %(default)s)",
    )
    sp.add_argument("--transforms", default=RECOMMENDED_RECIPE, help="recipe (default %(default)s)")
    sp.add_argument("--force", action="store_true", help="write into a non-empty folder an earlier tour did not make")
    sp.add_argument(
        "--block-size", type=at.BLOCK_SIZE, default=4, help="block size M, dividing 32 (default %(default)s)"
    )
    sp.set_defaults(func=cmd_tour)


def _add_keygen(sub: Any) -> None:
    sp = _command(sub, "keygen", "generate a key set (OS entropy) or derive one from a passphrase (scrypt)")
    sp.add_argument(
        "--transforms",
        default=RECOMMENDED_RECIPE,
        help="ordered steps (default %(default)s, the recommended mode; ffx-all: FFX on every position)",
    )
    sp.add_argument(
        "--block-size", type=at.BLOCK_SIZE, default=4, help="block size M, at most the image side (default %(default)s)"
    )
    sp.add_argument("--channels", type=at.CHANNELS, default=3, help="image channels C (default %(default)s)")
    sp.add_argument("--passphrase", help="derive the key from this passphrase ('-' reads it from stdin)")
    sp.add_argument("--salt", help="hex salt for --passphrase (default: 16 random bytes, printed)")
    sp.add_argument("-o", "--output", type=at.output_path, required=True, help="key file to write (JSON, mode 0600)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing key file")
    sp.set_defaults(func=cmd_keygen)


def _add_info(sub: Any) -> None:
    sp = _command(sub, "info", "show a key file's recipe, fingerprint and key space")
    sp.add_argument("key", type=at.existing_file, help="key file")
    sp.set_defaults(func=cmd_info)


def _add_encrypt_decrypt(sub: Any) -> None:
    for name, func, what in (
        ("encrypt", cmd_encrypt, "encrypt image files to PNG ciphertexts (16-bit PNG for keys with an FFX step)"),
        ("decrypt", cmd_decrypt, "decrypt PNG ciphertexts back to the original pixels"),
    ):
        sp = _command(sub, name, what)
        sp.add_argument("--key", type=at.existing_file, required=True, help="key file")
        sp.add_argument("inputs", nargs="+", type=at.existing_file, metavar="IN", help="image files")
        sp.add_argument("-o", "--output", type=at.output_path, required=True, metavar="OUTDIR", help="output folder")
        sp.add_argument("--force", action="store_true", help="overwrite existing output files")
        sp.add_argument(
            "--compat",
            choices=["exact", "authors"],
            default="exact",
            help="exact (default, invertible) or authors: their float32 truncation before FFX, for models trained "
            "with their code (docs/key-format.md); decrypt refuses it",
        )
        sp.set_defaults(func=func)
        if name == "encrypt":  # the ONNX client's side: no model code needed
            sp.add_argument(
                "--npy",
                action="store_true",
                help="write one float32 N x C x H x W array (-o FILE.npy): the input of an ONNX export without the key",
            )
            sp.add_argument("--size", help="with --npy: resize and centre-crop every image to H or HxW")


def _add_show(sub: Any) -> None:
    sp = _command(sub, "show", "draw an image after each step of a key (original, steps, decrypted)")
    sp.add_argument("--key", type=at.existing_file, required=True, help="key file")
    sp.add_argument("image", type=at.existing_file, help="image file")
    sp.add_argument("-o", "--output", type=at.output_path, required=True, help="PNG to write")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_show)


def _add_train(sub: Any) -> None:
    from .train import TrainConfig

    sp = _command(sub, "train", "train a protected model (--key) or its non-protected twin (--no-key)")
    sp.set_defaults(func=cmd_train)
    d = TrainConfig()  # the defaults live there only
    for add_group in (
        _train_data_options,
        _train_protection_options,
        _train_model_options,
        _train_optimisation_options,
        _train_augmentation_options,
        _train_precision_options,
        _train_output_options,
    ):
        add_group(sp, d)


def _train_data_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = sp.add_argument_group("data")
    g.add_argument("--data", type=at.data_source, required=True, help="cifar10, cifar100 or an ImageFolder directory")
    g.add_argument("--data-root", type=at.output_path, help="where torchvision datasets live / are downloaded")
    g.add_argument(
        "--val-fraction", type=at.PROBABILITY, default=0.1, help="held-out validation share (default %(default)s)"
    )
    g.add_argument("--limit", type=at.COUNT, help="use a stratified random sample of N images (quick runs)")
    g.add_argument(
        "--stream",
        type=at.IMAGE_SIZE,
        metavar="SIZE",
        help="data too large for memory: decode per batch at SIZE x SIZE",
    )
    g.add_argument(
        "--workers", type=at.WORKERS, default=2, help="DataLoader workers for --stream (default %(default)s)"
    )


def _train_protection_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = sp.add_argument_group("protection (one of --key, --no-key, --protection)")
    x = g.add_mutually_exclusive_group(required=True)
    x.add_argument("--key", type=at.existing_file, help="key file")
    x.add_argument("--no-key", action="store_true", help="train the non-protected baseline")
    x.add_argument(
        "--protection",
        choices=["passport"],
        help="passport protection (Fan et al. 2019, scheme V1) instead of a key (model: resnet18_cifar)",
    )
    g.add_argument(
        "--passport",
        type=at.path_name,
        metavar="FILE",
        help="passports for --protection passport (default OUTPUT.passport; drawn and written 0600 if missing)",
    )
    g.add_argument(
        "--sign-loss",
        type=at.NON_NEGATIVE,
        default=d.sign_loss,
        help="weight of the passport sign loss that embeds the signature (default %(default)s)",
    )


def _train_model_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = sp.add_argument_group("model")
    g.add_argument("--model", default=d.model, help="registered model or tv_<torchvision name> (default %(default)s)")
    g.add_argument("--patch", type=at.BLOCK_SIZE, default=4, help="patch size of block-aligned models without a key")
    g.add_argument(
        "--width",
        type=at.WIDTH,
        help="channel multiplier of models that take one (fastnet, patchnet, upnet, fullnet; default: the model's own)",
    )
    g.add_argument(
        "--pretrained",
        action="store_true",
        help="timm_<name> models: start from timm's pretrained weights (downloaded by timm on first use)",
    )
    g.add_argument(
        "--init-from",
        type=at.path_name,
        metavar="RUN_DIR",
        help="start from the weights of this run (same model and classes): fine-tuning",
    )
    g.add_argument(
        "--train-layers",
        type=at.train_layers,
        default=d.train_layers,
        help="train all layers, or only the first / last layer with weights, or block:N (default %(default)s)",
    )


def _train_optimisation_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    from .train import OPTIMIZERS

    g = sp.add_argument_group("optimisation (one-cycle learning rate)")
    g.add_argument("--epochs", type=at.EPOCHS, default=d.epochs, help="(default %(default)s)")
    g.add_argument("--batch-size", type=at.BATCH_SIZE, default=d.batch_size, help="(default %(default)s)")
    g.add_argument("--lr", type=at.LEARNING_RATE, default=d.lr, help="peak learning rate (default %(default)s)")
    g.add_argument(
        "--peak", type=at.PEAK, default=d.peak, help="LR peak as a fraction of training (0.5: the paper's cyclic)"
    )
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=d.optimizer,
        help="sgd (momentum) or adam (AdamW) (default %(default)s)",
    )
    g.add_argument("--momentum", type=at.PROBABILITY, default=d.momentum, help="SGD momentum (default %(default)s)")
    g.add_argument(
        "--nesterov",
        action=argparse.BooleanOptionalAction,
        default=d.nesterov,
        help=f"Nesterov momentum ({_on_off(d.nesterov)})",
    )
    g.add_argument("--weight-decay", type=at.NON_NEGATIVE, default=d.weight_decay, help="(default %(default)s)")
    g.add_argument("--label-smoothing", type=at.PROBABILITY, default=d.label_smoothing, help="(default %(default)s)")
    g.add_argument(
        "--ema",
        type=at.PROBABILITY,
        default=d.ema,
        help="per-step decay of a moving average of the weights, saved as the result (0: off; default %(default)s)",
    )
    g.add_argument(
        "--seed", type=at.SEED, default=d.seed, help="data order, augmentation, init and split (not the key)"
    )


def _train_augmentation_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    from .train import NORM_MODES

    g = sp.add_argument_group("augmentation (on plain images, before the key) and normalisation")
    g.add_argument(
        "--crop-padding",
        type=at.NON_NEGATIVE_INT,
        default=d.crop_padding,
        help="random crop after padding each side by this many pixels; 0: no crop (default %(default)s)",
    )
    g.add_argument(
        "--crop-step",
        type=at.COUNT,
        default=d.crop_step,
        help="random crops move images by multiples of this many pixels; the key's block size keeps each "
        "training image on the key's block grid, as test images are (default %(default)s)",
    )
    g.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=d.flip,
        help=f"random horizontal flips ({_on_off(d.flip)})",
    )
    g.add_argument(
        "--cutout",
        type=at.NON_NEGATIVE_INT,
        default=d.cutout,
        help="zero a random square of this side in each training image; 0: off (default %(default)s)",
    )
    g.add_argument(
        "--norm",
        choices=NORM_MODES,
        default=d.norm,
        help="normalisation statistics (none: raw [0, 1] values, for tablenet)",
    )


def _train_precision_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = sp.add_argument_group("precision and device")
    g.add_argument(
        "--amp",
        choices=AMP_MODES,
        default=d.amp,
        help="autocast: auto is bf16 where the hardware runs it natively, else off (default %(default)s)",
    )
    g.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=d.channels_last,
        help=f"channels_last memory format ({_on_off(d.channels_last)})",
    )
    g.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, cuda:1, mps (default: cuda if present)")


def _train_output_options(sp: argparse.ArgumentParser, d: TrainConfig) -> None:
    g = sp.add_argument_group("output")
    g.add_argument("-o", "--output", type=at.output_path, required=True, metavar="RUN_DIR", help="run directory")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in OUTPUT")
    g.add_argument("--force", action="store_true", help="train into a non-empty folder that holds no run")


def _add_evaluate(sub: Any) -> None:
    sp = _command(sub, "evaluate", "accuracy with the key, with plain images and with N random wrong keys")
    sp.add_argument(
        "--model",
        type=at.path_name,
        required=True,
        metavar="RUN_DIR",
        help="run directory (model.safetensors + meta.json)",
    )
    sp.add_argument("--key", type=at.existing_file, help="key file (omit to evaluate plain images and wrong keys only)")
    sp.add_argument(
        "--data",
        type=at.data_source,
        help="cifar10, cifar100 or an ImageFolder directory (default: the training source)",
    )
    sp.add_argument("--data-root", type=at.output_path, help="where torchvision datasets live / are downloaded")
    sp.add_argument(
        "--split",
        choices=["all", "val", "test"],
        default="all",
        help="all images of --data, the run's held-out validation split, or the torchvision test split",
    )
    sp.add_argument("--passport", type=at.path_name, metavar="FILE", help="the passports of a passport model")
    sp.add_argument(
        "--wrong-keys",
        type=at.NON_NEGATIVE_INT,
        default=100,
        help="random wrong keys (forged passports for a passport model) to try (default %(default)s)",
    )
    sp.add_argument("--sample", type=at.COUNT, help="evaluate a stratified random sample of N images")
    _tta_option(sp)
    sp.add_argument("--plot", type=at.output_path, help="write a PNG bar plot here")
    sp.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    sp.add_argument(
        "--stream", type=at.IMAGE_SIZE, metavar="SIZE", help="decode per batch at SIZE x SIZE (default: as trained)"
    )
    sp.add_argument(
        "--workers", type=at.WORKERS, default=2, help="DataLoader workers for --stream (default %(default)s)"
    )
    sp.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    sp.set_defaults(func=cmd_evaluate)


def _add_attack(sub: Any) -> None:
    sp = _command(
        sub, "attack", "attack a protected model without its key (the key only scores the result)", json_flag=False
    )
    sp.set_defaults(func=cmd_attack)
    common = argparse.ArgumentParser(add_help=False, formatter_class=at.RangeHelpFormatter)
    common.add_argument(
        "--model", type=at.path_name, required=True, metavar="RUN_DIR", help="the stolen model's run directory"
    )
    common.add_argument(
        "--key",
        type=at.existing_file,
        required=True,
        help="the model's true key (to score recovery and the key holder)",
    )
    common.add_argument(
        "--data", type=at.data_source, help="the run's data source (default: as recorded); its split is recomputed"
    )
    common.add_argument("--data-root", type=at.output_path, help="where torchvision datasets live / are downloaded")
    common.add_argument("--sample", type=at.COUNT, help="evaluate on a stratified sample of N validation images")
    common.add_argument("--plot", type=at.output_path, help="write a PNG plot of attacker accuracy here")
    common.add_argument("--force", action="store_true", help="overwrite an existing --plot file")
    common.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    common.add_argument("--json", action="store_true", help="print a JSON report instead of text")
    from .attacks.registry import add_attack_parsers

    add_attack_parsers(sp.add_subparsers(dest="attack", required=True, metavar="ATTACK"), parents=[common])


def _add_harden(sub: Any) -> None:
    sp = _command(
        sub, "harden", "fine-tuning suppression (SOPHON-style): make a keyed model harder for a thief to fine-tune"
    )
    sp.add_argument("--model", type=at.path_name, required=True, metavar="RUN_DIR", help="a keyed run directory")
    sp.add_argument("--key", type=at.existing_file, required=True, help="the model's key file")
    sp.add_argument("-o", "--output", type=at.output_path, required=True, metavar="RUN_DIR2", help="new run directory")
    sp.add_argument("--force", action="store_true", help="write into a non-empty folder that holds no run")
    sp.add_argument("--data", type=at.data_source, help="the run's data source (default: as recorded)")
    sp.add_argument("--data-root", type=at.output_path, help="where torchvision datasets live / are downloaded")
    sp.add_argument("--alpha", type=at.NON_NEGATIVE, default=2.0, help="weight of the thief's loss (default 2)")
    sp.add_argument("--steps", type=at.COUNT, default=3, help="the simulated thief's steps per outer step (default 3)")
    sp.add_argument("--epochs", type=at.EPOCHS, default=1, help="passes over the training data (default 1)")
    sp.add_argument("--lr", type=at.LEARNING_RATE, default=0.01, help="outer learning rate (default 0.01)")
    sp.add_argument("--batch-size", type=at.BATCH_SIZE, default=128, help="key holder's batch (default 128)")
    sp.add_argument("--thief-batch", type=at.BATCH_SIZE, default=64, help="the thief's batch (default 64)")
    sp.add_argument(
        "--thief-lrs", type=at.LEARNING_RATE, nargs="+", default=[0.01, 0.05], help="the thief's SGD learning rates"
    )
    sp.add_argument(
        "--thief-layers", type=at.train_layers, nargs="+", default=["all", "first", "last"], help="what he trains"
    )
    sp.add_argument("--thief-optimizers", nargs="+", choices=["sgd", "adam"], default=["sgd"], help="his optimisers")
    sp.add_argument("--thief-loss", choices=["inverse-ce", "uniform"], default="inverse-ce", help="what is pushed up")
    sp.add_argument(
        "--plain-weight", type=at.NON_NEGATIVE, default=1.0, help="weight of keeping plain images at chance"
    )
    sp.add_argument("--seed", type=at.SEED, default=0, help="batch order and the thief's draws (default 0)")
    sp.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, cuda:N, mps or auto (default)")
    sp.set_defaults(func=cmd_harden)


def _add_convert(sub: Any) -> None:
    sp = _command(
        sub, "convert", "protect a plain-trained block-aligned model with a shuffle/negpos key, without training"
    )
    sp.add_argument(
        "--model", type=at.path_name, required=True, metavar="RUN_DIR", help="run directory of a non-protected model"
    )
    sp.add_argument(
        "--key",
        type=at.existing_file,
        required=True,
        help="key file (shuffle and negpos steps; block size = patch size)",
    )
    sp.add_argument("-o", "--output", type=at.output_path, required=True, metavar="RUN_DIR2", help="new run directory")
    sp.set_defaults(func=cmd_convert)


def _add_rekey(sub: Any) -> None:
    sp = _command(sub, "rekey", "move a protected block-aligned model to a new key, without data or training")
    sp.add_argument(
        "--model", type=at.path_name, required=True, metavar="RUN_DIR", help="run directory of a protected model"
    )
    sp.add_argument("--old-key", type=at.existing_file, required=True, help="the model's key file")
    sp.add_argument("--new-key", type=at.existing_file, required=True, help="the new key file (same block size)")
    sp.add_argument("-o", "--output", type=at.output_path, required=True, metavar="RUN_DIR3", help="new run directory")
    sp.set_defaults(func=cmd_rekey)


def _add_predict(sub: Any) -> None:
    sp = _command(sub, "predict", "classify image files and folders with a trained model and its key")
    sp.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory (model.safetensors + meta.json)")
    sp.add_argument("--key", help="the model's key file (omit for a non-protected model)")
    sp.add_argument("--passport", metavar="FILE", help="the passports of a passport model")
    sp.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and folders (searched recursively)")
    sp.add_argument("--top-k", type=at.COUNT, default=5, help="classes to report per image (default %(default)s)")
    sp.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV")
    sp.add_argument("--force", action="store_true", help="overwrite an existing --csv file")
    sp.add_argument(
        "--batch-size", type=at.PREDICT_BATCH, default=64, help="images per forward pass (default %(default)s)"
    )
    sp.add_argument("--device", type=at.device, default="auto", help="cpu, cuda, ... (default: cuda if present)")
    _tta_option(sp, bare=False)  # images follow: --tta always takes its mode
    sp.set_defaults(func=cmd_predict)


def _tta_option(sp: argparse.ArgumentParser, bare: bool = True) -> None:
    """``--tta MODE`` (``bare``: a bare ``--tta`` means flip; not where positional arguments could follow)."""
    from .tta import TTA_MODES

    views = "flip (the image and its mirror image) or shift (also one-pixel shifts of both: 10 views)"
    sp.add_argument(
        "--tta",
        nargs="?" if bare else None,
        const="flip" if bare else None,
        default="off",
        choices=TTA_MODES,
        help=f"test-time augmentation, each view keyed after it is taken: {views}"
        + ("; a bare --tta is flip" if bare else "")
        + " (default: off)",
    )


def _add_export(sub: Any) -> None:
    sp = _command(sub, "export", "export the whole inference path as ONNX (dynamic batch), with or without the key")
    sp.add_argument("--model", required=True, metavar="RUN_DIR", help="run directory (model.safetensors + meta.json)")
    sp.add_argument(
        "--key",
        help="compile this key into the graph (input: plain uint8 images; the file holds the key, mode 0600); "
        "without it the input is the key's output (blockkey encrypt --npy)",
    )
    sp.add_argument("--passport", metavar="FILE", help="the passports of a passport model (they go into the graph)")
    sp.add_argument("-o", "--output", required=True, metavar="FILE.onnx", help="ONNX file to write")
    sp.add_argument("--opset", type=at.OPSET, default=20, help="ONNX opset (default %(default)s)")
    sp.add_argument("--force", action="store_true", help="overwrite an existing file")
    sp.set_defaults(func=cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help / --version (0) or a usage error (2, one line already printed)
        return int(e.code or 0)
    try:
        if args.max_pixels is not None:
            set_max_image_pixels(args.max_pixels)
        _claim_outputs(args)
        return int(args.func(args))
    except (BlockkeyError, OSError) as e:
        msg = str(e) if isinstance(e, BlockkeyError) else f"{getattr(e, 'filename', '') or ''} {e.strerror or e}"
        _say(f"blockkey: error: {msg.strip()}", sys.stderr)
        return EXIT_USER_ERROR
    finally:
        if args.max_pixels is not None:
            set_max_image_pixels(None)


def _holds_run(out: Path) -> bool:
    """A folder a run was written to: its metadata or state pointer (the command itself says what it does then),
    or only what a run killed before its first state leaves (states, weights, dot-temporary files)."""
    if (out / "meta.json").exists() or (out / "LATEST").exists():
        return True
    return all(p.name.startswith(("state-", ".")) or p.name == "model.safetensors" for p in out.iterdir())


def _claim_outputs(args: argparse.Namespace) -> None:
    """The refusal rule (:func:`blockkey.fileio.refuse_existing`, :func:`~blockkey.fileio.claim_folder`) for
    every file a command writes, checked before any work: an existing file, or a non-empty folder the command
    did not make, is refused without --force. (Key files, images, exports and new run folders of convert and
    rekey are refused where they are written, by the same rule.)"""
    force = bool(getattr(args, "force", False))
    for name in ("plot", "csv"):
        if getattr(args, name, None):
            refuse_existing(getattr(args, name), force)
    if args.command in ("train", "harden") and not getattr(args, "resume", False):
        claim_folder(args.output, force, ours=_holds_run, create=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

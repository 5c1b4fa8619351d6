"""Export-half benchmark: our pipeline vs the article's plain recipe, same model, same machine.

    python3 bench/gpu_export.py --arch ViT-L-14 --batch 128 --device cuda --out OUT_DIR

runs, each in its own process so peak host memory (ru_maxrss) is per recipe:
  1. `warm`  - loads ModelOpt's CUDA extension once (JIT compile, ~64 s the first time on a fresh
               box) so neither timed run pays for it; its time is reported separately.
  2. `plain` - ModelOpt defaults as-is: `mtq.FP8_DEFAULT_CFG` on the whole CLIP, stock open_clip
               attention, `get_onnx_bytes_and_metadata(opset 20, weights_dtype="fp16")` for the FP16
               baseline and the FP8 file. Its FP8 accuracy is measured afterwards, untimed, with
               our ORT gate code (on a type-repaired copy: ORT refuses the file as exported).
  3. `ours`  - `enginebuild build --stages export` when builder/pipeline.py exists, else
               `run_export` directly: attention split, FP8 on both towers, FP16 baseline,
               ORT validation of the FP8 files (validation is inside our timed total).
  4. `gate`  - (only with --mode gate) the accuracy gate's ways of running, timed on ours' FP8 files.
--encoders picks the towers (ViT-bigG-14: image), --no-plain-accuracy skips plain's untimed ORT check.
bench/export_sizes.py runs these steps for several models within one device call's deadline.
Writes OUT_DIR/results.json and prints a Markdown table for docs/benchmarks.md.
The builder package is not installed on the GPU box: `enginebuild_builder` is aliased to ./builder.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def alias_package() -> None:
    """Import ./contract and ./builder as `enginebuild_contract` and `enginebuild_builder` (folder and
    import names differ; nothing is installed on the GPU box)."""
    for name, folder in (("enginebuild_contract", "contract"), ("enginebuild_builder", "builder")):
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)  # installed editable on dev machines
            continue
        except ImportError:
            pass
        spec = importlib.util.spec_from_file_location(
            name, REPO / folder / "__init__.py", submodule_search_locations=[str(REPO / folder)]
        )
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _spec_doc(args: argparse.Namespace) -> dict:
    return {
        "model": {"architecture": args.arch, **({"config": args.config} if args.config else {})},
        "encoders": args.encoders.split(","),
        "batchSize": args.batch,
        "calibration": {"source": "synthetic", "samples": args.calib_samples},
        "accuracy": {"samples": args.accuracy_samples, "minCosine": args.min_cosine},
    }


def run_warm(args: argparse.Namespace) -> dict:
    import torch
    import modelopt.torch.quantization as mtq

    t = time.perf_counter()
    lin = torch.nn.Sequential(torch.nn.Linear(64, 64)).to(args.device)
    x = torch.randn(8, 64, device=args.device)
    mtq.quantize(lin, mtq.FP8_DEFAULT_CFG, lambda m: m(x))
    lin(x)
    return {"warm_s": time.perf_counter() - t}


def run_ours(args: argparse.Namespace) -> dict:
    alias_package()
    import yaml

    work = Path(args.out) / "ours"
    work.mkdir(parents=True, exist_ok=True)
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(_spec_doc(args)))
    t = time.perf_counter()
    via = "run_export"
    if (REPO / "builder" / "pipeline.py").exists():
        from enginebuild_builder.cli import main

        via = "enginebuild build --stages export"
        try:
            rc = main(["build", "--spec", str(spec_path), "--workdir", str(work), "--device", args.device,
                       "--stages", "export"])
        except Exception as exc:  # noqa: BLE001 (the report holds the error; the numbers still count)
            rc = getattr(exc, "exit_code", 1)
        total = time.perf_counter() - t
        report = json.loads((work / "report.json").read_text())
    else:
        import logging

        from enginebuild_contract.report import Report
        from enginebuild_contract.spec import load_spec
        from enginebuild_builder.export.export_half import run_export

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        spec = load_spec(spec_path)
        rep = Report(spec=spec.to_dict())
        rc = 0
        try:
            run_export(spec, work, args.device, rep, None, None)
        except Exception as exc:  # the gate result is data here, not a crash
            rc = getattr(exc, "exit_code", 1)
            rep.warnings.append(f"{type(exc).__name__}: {exc}")
        total = time.perf_counter() - t
        rep.write(work / "report.json")
        report = json.loads(rep.model_dump_json())
    enc = {}
    for name, e in report["encoders"].items():
        enc[name] = {
            "fp16_bytes": e["onnx"]["fp16"]["bytes"], "fp8_bytes": e["onnx"]["fp8"]["bytes"],
            "fp16_external_data": bool(e["onnx"]["fp16"].get("external_data")),
            "fp8_external_data": bool(e["onnx"]["fp8"].get("external_data")),
            "reduction": e["size_reduction"], "linear": e["linear_layers"], "quantized": e["quantized_linear_layers"],
            "parameters": e["parameters"],
            "cosine_min": e["accuracy"]["cosine_min"] if e.get("accuracy") else None,
            "cosine_mean": e["accuracy"]["cosine_mean"] if e.get("accuracy") else None,
            "top1": e["accuracy"]["top1_agreement"] if e.get("accuracy") else None,
            "evaluated_on": e["accuracy"]["evaluated_on"] if e.get("accuracy") else None,
        }
    return {"via": via, "rc": rc, "total_s": total, "timings_s": report["timings_s"],
            "peak_memory_bytes": report["peak_memory_bytes"], "encoders": enc, "tool_versions": report["tool_versions"],
            "warnings": report["warnings"], "error": report.get("error")}


class _Skipped(Exception):
    """The plain recipe's untimed accuracy check was not asked for."""


def run_plain(args: argparse.Namespace) -> dict:
    """The article's recipe, ModelOpt defaults untouched (timed), then an untimed ORT accuracy check."""
    t_import = time.perf_counter()  # heavy imports are timed: ours pays for them inside its stages too
    alias_package()
    import copy
    import tempfile

    import onnx
    import torch
    import modelopt.torch.quantization as mtq
    from modelopt.torch._deploy.utils import OnnxBytes, get_onnx_bytes_and_metadata

    from enginebuild_builder.onnx import onnx_checks
    from enginebuild_builder.export import accuracy_gate
    from enginebuild_builder.export.calibration import synthetic_images, synthetic_texts
    from enginebuild_builder.export.model_loading import load_model
    from enginebuild_builder.export.onnx_export import wrap
    from enginebuild_builder.export.quantize import count_layers, make_forward_loop
    from enginebuild_contract.spec import ModelSpec
    from enginebuild_builder.toolinfo import peak_gpu_bytes, peak_host_bytes

    dev, b = args.device, args.batch
    timings: dict[str, float] = {"import": time.perf_counter() - t_import}
    out = Path(args.out) / "plain"
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.mha.set_fastpath_enabled(False)  # needed for the export to work at all

    t = time.perf_counter()
    loaded = load_model(ModelSpec(architecture=args.arch, config=args.config), None)
    model = loaded.model.to(dev).eval()
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    cal_img = synthetic_images(args.calib_samples, loaded.image_size, 0)
    cal_txt = synthetic_texts(args.calib_samples, loaded, 0)
    timings["calibrate"] = time.perf_counter() - t

    def export(m: torch.nn.Module, enc: str, tag: str) -> int:
        x = (torch.randn(b, 3, *loaded.image_size, device=dev) if enc == "image"
             else torch.randint(1, 1000, (b, loaded.context_length), device=dev))
        raw, _ = get_onnx_bytes_and_metadata(wrap(m, enc), (x,), model_name=f"{enc}.{tag}", onnx_opset=20,
                                             weights_dtype="fp16")
        files = OnnxBytes.from_bytes(raw)
        size = 0
        for name, data in files.onnx_model.items():
            (out / name).write_bytes(data)
            size += len(data)
        return size

    # Untimed: FP16 reference embeddings of this very model on held-out inputs (for the accuracy row).
    held = {"image": synthetic_images(args.accuracy_samples, loaded.image_size, 1_000_003),
            "text": synthetic_texts(args.accuracy_samples, loaded, 1_000_003)} if args.plain_accuracy else {}
    ref16 = copy.deepcopy(model).half()
    refs = {enc: accuracy_gate.reference_embeddings(wrap(ref16, enc), held[enc], 64, dev) for enc in held}
    del ref16
    torch.cuda.empty_cache() if dev == "cuda" else None

    sizes: dict[str, dict[str, int]] = {"image": {}, "text": {}}
    t = time.perf_counter()
    for enc in ("image", "text"):
        sizes[enc]["fp16"] = export(model, enc, "fp16")
    timings["export_fp16"] = time.perf_counter() - t

    t = time.perf_counter()
    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, make_forward_loop(cal_img, cal_txt, 128, dev))
    timings["quantize"] = time.perf_counter() - t

    t = time.perf_counter()
    for enc in ("image", "text"):
        sizes[enc]["fp8"] = export(model, enc, "fp8")
    timings["export_fp8"] = time.perf_counter() - t
    total = sum(timings.values())
    peak = {"host": peak_host_bytes(), "gpu": peak_gpu_bytes()}
    counts = count_layers(model)
    del model
    partial = {"total_s": total, "timings_s": timings, "peak_memory_bytes": peak, "accuracy_note": "not reached",
               "encoders": {e: {"fp16_bytes": sizes[e]["fp16"], "fp8_bytes": sizes[e]["fp8"],
                                "reduction": 1 - sizes[e]["fp8"] / sizes[e]["fp16"], "linear": counts[e].linear,
                                "quantized": counts[e].quantized} for e in sizes}}
    (Path(args.out) / "plain.json").write_text(json.dumps(partial, indent=2))  # survives a kill in the untimed part

    # Untimed: the plain FP8 files through our ORT gate (on a type-repaired copy: ORT refuses them as is).
    enc_out: dict[str, dict] = {}
    accuracy_note = "not measured (--no-plain-accuracy)"
    try:
        if not args.plain_accuracy:
            raise _Skipped
        fp8 = {}
        with tempfile.TemporaryDirectory() as tmp:
            for enc in ("image", "text"):
                m = onnx.load(str(out / f"{enc}.fp8.onnx"), load_external_data=True)
                onnx_checks.repair_float_casts(m)
                m, _ = onnx_checks.to_ort_runnable(m)
                path = Path(tmp) / f"ort.{enc}.onnx"
                onnx_checks.save_model(m, path)
                del m
                fp8[enc] = accuracy_gate.run_onnx(path, held[enc].numpy(), b)
        top1 = accuracy_gate.top1_agreement(fp8["image"], fp8["text"], refs["image"], refs["text"])
        for enc in ("image", "text"):
            acc = accuracy_gate.cosine_stats(fp8[enc], refs[enc])
            enc_out[enc] = {"cosine_min": acc.cosine_min, "cosine_mean": acc.cosine_mean, "top1": top1}
        accuracy_note = "ORT CPU on a type-repaired copy, untimed"
    except _Skipped:
        pass
    except Exception as exc:  # report, do not hide: the table says why accuracy is missing
        accuracy_note = f"failed: {type(exc).__name__}: {exc}"[:400]
    encoders = {}
    for enc in ("image", "text"):
        c = counts[enc]
        encoders[enc] = {
            "fp16_bytes": sizes[enc]["fp16"], "fp8_bytes": sizes[enc]["fp8"],
            "reduction": 1 - sizes[enc]["fp8"] / sizes[enc]["fp16"], "linear": c.linear, "quantized": c.quantized,
            **enc_out.get(enc, {}),
        }
    return {"total_s": total, "timings_s": timings, "peak_memory_bytes": peak, "encoders": encoders,
            "accuracy_note": accuracy_note}


def run_gate(args: argparse.Namespace) -> dict:
    """The accuracy gate's ways of running, timed on the FP8 files an `ours` run left in OUT/ours/onnx:
    ort_runner's defaults and variants, and the reference path (the gate before issue 14: a full copy,
    static batch padded, one run), each compared with the default's outputs. The single-run variant
    runs with ORT's profiler on, for the per-operator split. Results are written after every run
    (OUT/gate.json), so a timeout keeps what was measured."""
    alias_package()
    import collections
    import json as _json
    import tempfile

    import numpy as np
    import onnx
    import onnxruntime as ort

    from enginebuild_builder.onnx import onnx_checks, onnx_io, ort_runner
    from enginebuild_builder.export import accuracy_gate

    onnx_dir = Path(args.out) / "ours" / "onnx"
    rng = np.random.default_rng(1_000_003)
    out: dict = {"cores": ort_runner.cpu_cores(), "onnxruntime": ort.__version__,
                 "providers": ort.get_available_providers(), "samples": args.accuracy_samples, "encoders": {}}
    inputs: dict[str, tuple[Path, np.ndarray, int]] = {}
    for enc in args.encoders.split(","):
        fp8 = onnx_dir / f"{enc}.fp8.onnx"
        if fp8.exists():
            shape = [d.dim_value for d in onnx_io.load_graph(fp8).graph.input[0].type.tensor_type.shape.dim]
            n = args.accuracy_samples
            x = (rng.standard_normal([n, *shape[1:]]).astype(np.float16) if enc == "image"
                 else rng.integers(1, 49000, [n, *shape[1:]]).astype(np.int64))
            inputs[enc] = (fp8, x, shape[0])
            out["encoders"][enc] = {}
    baseline: dict[str, np.ndarray] = {}

    def record(enc: str, name: str, seconds: float, outputs: np.ndarray, **extra: object) -> None:
        if enc not in baseline:
            baseline[enc] = outputs
        cos = accuracy_gate.cosine_stats(outputs, baseline[enc])
        out["encoders"][enc][name] = {"s": round(seconds, 3), "cos_vs_default_min": cos.cosine_min,
                                      "max_abs_diff_vs_default": float(np.abs(outputs - baseline[enc]).max()), **extra}
        print(enc, name, out["encoders"][enc][name], flush=True)
        (Path(args.out) / "gate.json").write_text(_json.dumps(out, indent=2, default=str))

    variants = [("default", ort_runner.GateOptions()), ("single_run_profiled", None),
                ("optimized", ort_runner.GateOptions(optimized=True)),
                ("concurrency8", ort_runner.GateOptions(concurrency=8)),
                ("static_padded", ort_runner.GateOptions(free_batch=False)), ("reference", None)]
    wanted = args.gate_variants.split(",")
    for name, opts in [v for v in variants if v[0] in wanted]:
        for enc, (fp8, x, batch) in inputs.items():
            t = time.perf_counter()
            if opts is not None:
                run = ort_runner.evaluate(onnx_io.load_graph(fp8), fp8, x, "cpu", opts)
                record(enc, name, run.seconds, run.outputs, freed=run.batch_freed, chunks=run.chunks,
                       concurrency=run.concurrency, padded=run.padded_rows)
            elif name == "reference":
                with tempfile.TemporaryDirectory() as tmp:
                    copy, _ = onnx_checks.to_ort_runnable(onnx.load(str(fp8)))
                    onnx_checks.save_model(copy, Path(tmp) / "ref.onnx")
                    del copy
                    y = accuracy_gate.run_onnx(Path(tmp) / "ref.onnx", x, batch)
                record(enc, name, time.perf_counter() - t, y, padded=-(-len(x) // batch) * batch - len(x))
            else:  # one unpadded run, profiler on: where the time goes
                path, _ = ort_runner.write_ort_copy(onnx_io.load_graph(fp8), fp8, free_batch=True)
                try:
                    so = ort_runner.session_options(ort_runner.GateOptions())
                    so.enable_profiling = True
                    so.profile_file_prefix = str(Path(args.out) / f"ortprof-{enc}")
                    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
                    y = sess.run(None, {sess.get_inputs()[0].name: x})[0].astype(np.float32)
                    events = _json.loads(Path(sess.end_profiling()).read_text())
                finally:
                    path.unlink(missing_ok=True)
                by_op: collections.Counter = collections.Counter()
                for e in events:
                    if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
                        by_op[e["args"]["op_name"]] += e["dur"]
                total_us = sum(by_op.values()) or 1
                record(enc, name, time.perf_counter() - t, y, kernel_s=total_us / 1e6,
                       op_share={k: round(v / total_us, 4) for k, v in by_op.most_common(8)})
    return out


def _child(mode: str, args: argparse.Namespace) -> dict:
    out = Path(args.out) / f"{mode}.json"
    cmd = [sys.executable, __file__, "--mode", mode, "--arch", args.arch, *(["--config", args.config] if args.config else []), "--batch", str(args.batch), "--device",
           args.device, "--out", args.out, "--calib-samples", str(args.calib_samples), "--accuracy-samples",
           str(args.accuracy_samples), "--min-cosine", str(args.min_cosine)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, stdout=open(Path(args.out) / f"{mode}.log", "w"), stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t
    res = json.loads(out.read_text()) if out.exists() else {"error": f"exit {proc.returncode}, see {mode}.log"}
    res["process_wall_s"] = wall
    return res


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def table(res: dict) -> str:
    ours, plain = res["ours"], res["plain"]
    rows = ["| | plain recipe (ModelOpt defaults) | ours |", "|---|---|---|"]
    for enc in ("image", "text"):
        p, o = plain.get("encoders", {}).get(enc, {}), ours.get("encoders", {}).get(enc, {})
        rows.append(f"| {enc}: FP16 ONNX | {_mb(p.get('fp16_bytes'))} | {_mb(o.get('fp16_bytes'))} |")
        rows.append(f"| {enc}: FP8 ONNX | {_mb(p.get('fp8_bytes'))} | {_mb(o.get('fp8_bytes'))} |")
        rows.append(f"| {enc}: size reduction | {100 * p.get('reduction', 0):.1f} % | {100 * o.get('reduction', 0):.1f} % |")
        rows.append(f"| {enc}: quantized / projection layers | {p.get('quantized')} / {p.get('linear')} | "
                    f"{o.get('quantized')} / {o.get('linear')} |")

        def acc(d: dict) -> str:
            if d.get("cosine_min") is None:
                return "-"
            return f"{d['cosine_min']:.4f} / {d['cosine_mean']:.4f}"

        rows.append(f"| {enc}: FP8 ONNX cosine min / mean (ORT CPU) | {acc(p)} | {acc(o)} |")
    t1 = lambda d: "-" if d.get("encoders", {}).get("image", {}).get("top1") is None else f"{d['encoders']['image']['top1']:.3f}"  # noqa: E731
    rows.append(f"| top-1 retrieval agreement | {t1(plain)} | {t1(ours)} |")
    stages = ["import", "load", "calibrate", "export_fp16", "quantize", "export_fp8", "validate"]
    for s in stages:
        pv, ov = plain.get("timings_s", {}).get(s), ours.get("timings_s", {}).get(s)
        rows.append(f"| wall: {s} | {'-' if pv is None else f'{pv:.1f} s'} | {'-' if ov is None else f'{ov:.1f} s'} |")
    rows.append(f"| **wall: end to end** | **{plain.get('total_s', 0):.1f} s** | **{ours.get('total_s', 0):.1f} s** |")
    pm, om = plain.get("peak_memory_bytes", {}), ours.get("peak_memory_bytes", {})
    rows.append(f"| peak host RSS | {_gib(pm.get('host'))} | {_gib(om.get('host'))} |")
    rows.append(f"| peak GPU (torch allocated) | {_gib(pm.get('gpu'))} | {_gib(om.get('gpu'))} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["all", "warm", "plain", "ours", "gate", "table"], default="all")
    ap.add_argument("--encoders", default="image,text", help="towers to build (ours, gate)")
    ap.add_argument("--gate-variants", default="default,single_run_profiled,optimized,concurrency8,static_padded,reference",
                    help="gate mode: which ways of running the gate to time, in this order")
    ap.add_argument("--no-plain-accuracy", dest="plain_accuracy", action="store_false",
                    help="skip the plain recipe's untimed ORT accuracy check (saves device time)")
    ap.add_argument("--arch", default="ViT-L-14")
    ap.add_argument("--config", default=None, help="open_clip model-config JSON (smoke tests on a tiny CLIP)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--calib-samples", type=int, default=512)
    ap.add_argument("--accuracy-samples", type=int, default=64)
    ap.add_argument("--min-cosine", type=float, default=0.99)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.mode == "table":  # merge per-mode JSON files (e.g. fetched from two device runs)
        res = {"args": vars(args)}
        for mode in ("warm", "plain", "ours"):
            f = Path(args.out) / f"{mode}.json"
            res[mode] = json.loads(f.read_text()) if f.exists() else {}
        (Path(args.out) / "results.json").write_text(json.dumps(res, indent=2, default=str))
        print(table(res))
        return 0
    if args.mode != "all":
        fn = {"warm": run_warm, "plain": run_plain, "ours": run_ours, "gate": run_gate}[args.mode]
        res = fn(args)
        (Path(args.out) / f"{args.mode}.json").write_text(json.dumps(res, indent=2, default=str))
        return 0
    res = {"args": vars(args), "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for mode in ("warm", "plain", "ours"):
        res[mode] = _child(mode, args)
        print(mode, json.dumps(res[mode], default=str)[:3000], flush=True)
    (Path(args.out) / "results.json").write_text(json.dumps(res, indent=2, default=str))
    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `opc` command line.

Exit codes: 0 ok, 1 invalid model or compile failure, 2 usage error, 3 verification
mismatch, 130 interrupted. Errors are one line on stderr; --debug (anywhere on the
command line) shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from opc.errors import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_MISMATCH, EXIT_USAGE, OpcError, UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="opc: an ONNX graph-rewriting compiler (fold, quantize, prune, plan, tune).")

_DEBUG = False


def _out(text: str = "") -> None:
    typer.echo(text)


def parse_input_shapes(values: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in values or []:
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise UsageError(f"--input-shapes {item!r}: expected NAME:D1,D2,... like x:1,3,224,224")
        try:
            shape = tuple(int(d) for d in dims.split(",") if d.strip() != "")
        except ValueError:
            raise UsageError(f"--input-shapes {item!r}: dimensions must be integers") from None
        if any(d < 0 for d in shape):
            raise UsageError(f"--input-shapes {item!r}: dimensions must be >= 0")
        shapes[name] = shape
    return shapes


def _check_shapes_against(model, shapes: dict, source: str) -> None:
    from opc.ort import graph_inputs, input_spec, is_tensor

    specs = {v.name: input_spec(v)[0] for v in graph_inputs(model) if is_tensor(v)}
    for name, shape in shapes.items():
        if name not in specs:
            raise UsageError(f"--input-shapes: '{name}' is not an input of {source} (inputs: {', '.join(specs)})")
        dims = specs[name]
        if len(dims) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
            raise UsageError(f"--input-shapes: {name}:{','.join(map(str, shape))} does not fit the model's {dims}")


def _write_json_atomic(path: Path, payload: dict) -> None:
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.absolute().parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def print_compile_table(report, echo=_out) -> None:
    from opc.summary import human_bytes

    b, a = report.before, report.after
    ops = sorted(set(b["ops"]) | set(a["ops"]), key=lambda op: (-max(b["ops"].get(op, 0), a["ops"].get(op, 0)), op))
    rows = [("nodes", str(b["nodes"]), str(a["nodes"]))]
    rows += [(f"  {op}", str(b["ops"].get(op, 0)), str(a["ops"].get(op, 0))) for op in ops]
    rows += [
        ("parameters", f"{b['parameters']:,}", f"{a['parameters']:,}"),
        ("weight bytes", human_bytes(b["weight_bytes"]), human_bytes(a["weight_bytes"])),
        ("file size", human_bytes(b["file_bytes"]), human_bytes(a["file_bytes"])),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows + [("", "before", "")])
    echo(f"{'':<{w0}}  {'before':>{w1}}  after")
    for name, x, y in rows:
        mark = "" if x == y else "  *"
        echo(f"{name:<{w0}}  {x:>{w1}}  {y}{mark}")


def print_pass_lines(report, echo=_out) -> None:
    for r in report.passes:
        stats = ", ".join(f"{k}={v}" for k, v in r.stats.items() if v not in (0, "", None)) or "no change"
        line = f"[{r.index + 1}] {r.canonical:<28} {r.time_s * 1000:8.1f} ms  {stats}"
        if r.verification:
            worst = max((m["max_abs"] for m in r.verification["vs_previous"].values()), default=0.0)
            line += f"  | max abs err {worst:.3g} " + ("(ok)" if r.verified else "(lossy)" if not r.exact else "")
        echo(line)
        for w in r.warnings:
            echo(f"    warning: {w}")


@app.command("compile")
def compile_cmd(
    model: Path = typer.Argument(..., help="input ONNX model"),
    output: Path = typer.Option(..., "-o", "--output", help="where to write the optimized model"),
    passes: Optional[str] = typer.Option(None, "--passes", "-p", help="pipeline, e.g. 'fold,quantize,plan'"),
    calibration_data: Optional[Path] = typer.Option(None, "--calibration-data", help=".npz or folder of .npz/.npy"),
    input_shapes: Optional[List[str]] = typer.Option(None, "--input-shapes", help="NAME:D1,D2,... (repeatable)"),
    verify: bool = typer.Option(False, "--verify", help="compare ONNX Runtime outputs after every pass"),
    dump_passes: Optional[Path] = typer.Option(None, "--dump-passes", help="write NN-name.onnx/.txt/.diff per pass"),
    print_changed: bool = typer.Option(False, "--print-changed", help="print the IR diff of passes that changed"),
    report_path: Optional[Path] = typer.Option(None, "--report", help="write the full report as JSON"),
    allow_custom_ops: bool = typer.Option(False, "--allow-custom-ops", help="pass custom-domain ops through"),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="more output"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="only errors and the final line"),
):
    """Run a pass pipeline over MODEL and write the result to OUTPUT."""
    import opc
    from opc.instruments import PrintChanged
    from opc.ir import load_model, save_model
    from opc.pipeline import parse_pipeline
    from opc.registry import DEFAULT_PIPELINE

    parse_pipeline(passes or DEFAULT_PIPELINE)  # usage errors before any heavy work
    shapes = parse_input_shapes(input_shapes)
    if output.exists() and output.is_dir():
        raise UsageError(f"-o {output}: is a folder")
    source = load_model(model)
    _check_shapes_against(source, shapes, str(model))
    instruments = [PrintChanged(_out)] if print_changed else []
    if not allow_custom_ops:
        from opc.validate import check_custom_domains

        check_custom_domains(source, source=str(model))
    calib = None
    if calibration_data is not None:
        from opc.data import CalibrationData

        calib = CalibrationData.load(calibration_data, source)
    try:
        result, report = opc.compile(source, passes, calibration=calib, input_shapes=shapes, verify=verify,
                                     dump_passes=dump_passes, instruments=instruments,
                                     allow_custom_ops=True, progress=not quiet, validate=False)
    except OpcError as exc:
        if report_path is not None and getattr(exc, "exit_code", 1) == EXIT_MISMATCH:
            _write_json_atomic(report_path, {"error": str(exc)})
        if not quiet:
            _out("FAILED")
        raise
    save_model(result, output)
    if report_path is not None:
        _write_json_atomic(report_path, report.to_json())
    if not quiet:
        print_compile_table(report)
        _out()
        print_pass_lines(report)
        if verbose:
            _out(f"pipeline: {report.pipeline}")
    _out(f"{'PASSED' if report.passed else 'FAILED'}: wrote {output} ({report.pipeline})")
    if not report.passed:
        raise typer.Exit(EXIT_MISMATCH)


@app.command("passes")
def passes_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable")):
    """List the passes, their options (type, default, help) and the default pipeline."""
    from opc.pass_api import type_label
    from opc.registry import DEFAULT_PIPELINE, all_pass_classes

    listing = {}
    for name, cls in all_pass_classes().items():
        hints = cls.option_types()
        listing[name] = {
            "summary": cls.summary or (cls.__doc__ or "").strip().splitlines()[0],
            "exact": cls.exact,
            "requires": list(cls.requires),
            "position": cls.position,
            "options": [{"name": f.name, "type": type_label(hints[f.name]), "default": f.default,
                         "help": f.metadata.get("help", "")} for f in cls.option_fields()],
        }
    if as_json:
        _out(json.dumps({"default_pipeline": DEFAULT_PIPELINE, "passes": listing}, indent=2, default=str))
        return
    from opc.pipeline import format_value

    for name, info in listing.items():
        kind = "exact" if info["exact"] else "lossy"
        extra = f", requires {', '.join(info['requires'])}" if info["requires"] else ""
        extra += f", must be {info['position']}" if info["position"] != "any" else ""
        _out(f"{name} ({kind}{extra}): {info['summary']}")
        for o in info["options"]:
            _out(f"    {o['name']}: {o['type']} = {format_value(o['default'])}  -- {o['help']}")
    _out(f"default pipeline: {DEFAULT_PIPELINE}")


@app.command("diff")
def diff_cmd(a: Path, b: Path, as_json: bool = typer.Option(False, "--json")):
    """Nodes, initializers, inputs and outputs that differ between two models."""
    from opc.ir import load_model
    from opc.modeldiff import diff_models, format_diff

    d = diff_models(load_model(a), load_model(b))
    _out(json.dumps(d, indent=2) if as_json else format_diff(d))


@app.command("inspect")
def inspect_cmd(model: Path, as_json: bool = typer.Option(False, "--json"),
                plot: Optional[Path] = typer.Option(None, "--plot", help="write the memory plan chart "
                                                    "to FILE (.svg; .png needs matplotlib)")):
    """Opsets, inputs/outputs, op histogram, parameters, sparsity, quantization, stored pipeline, memory plan."""
    from opc.inspect_model import format_inspect, inspect_model
    from opc.ir import load_model

    loaded = load_model(model)
    if plot is not None:
        from opc.memory import model_plan, write_plot

        write_plot(model_plan(loaded)[0], plot)
    info = inspect_model(loaded)
    _out(json.dumps(info, indent=2, default=str) if as_json else format_inspect(info))


@app.command("verify")
def verify_cmd(
    a: Path, b: Path,
    data: Optional[Path] = typer.Option(None, "--data", help=".npz of inputs (default: seeded random)"),
    rtol: float = typer.Option(1e-4, "--rtol", help="tolerance relative to the largest |output|"),
    atol: float = typer.Option(1e-5, "--atol"),
    input_shapes: Optional[List[str]] = typer.Option(None, "--input-shapes"),
    seed: int = typer.Option(0, "--seed"),
):
    """Run A and B in ONNX Runtime on the same inputs and compare every output (exit 3 if outside tolerance)."""

    from opc.ir import load_model
    from opc.ort import report_outputs, run_model, seeded_feeds

    ma, mb = load_model(a), load_model(b)
    shapes = parse_input_shapes(input_shapes)
    if data is not None:
        from opc.data import CalibrationData

        feeds = next(CalibrationData.load(data, ma).batches())
    else:
        feeds = seeded_feeds(ma, shapes, seed=seed)
    ra, rb = run_model(ma, feeds), run_model(mb, feeds)
    missing = [name for name in ra if name not in rb]
    if missing:
        raise UsageError(f"{b}: has no output '{missing[0]}' (outputs: {', '.join(rb)})")
    bad = report_outputs(ra, rb, rtol, atol, _out)
    if bad:
        _out(f"FAILED: {len(bad)} of {len(ra)} outputs outside rtol={rtol:g} atol={atol:g}")
        raise typer.Exit(EXIT_MISMATCH)
    _out(f"PASSED: {len(ra)} outputs within rtol={rtol:g} atol={atol:g}")


@app.command("demo")
def demo_cmd(output: Path = typer.Option(Path("opc-demo"), "-o", "--output", help="folder for the results")):
    """Compile the bundled digits CNN with the full pipeline, verify it in ONNX Runtime, print the table."""
    from opc.demo import run_demo

    run_demo(output, echo=_out)


# --- commands added by the other parts (keep each block self-contained) ---
# [export]
@app.command("export")
def export_cmd(
    name: Optional[str] = typer.Argument(None, help="zoo model name (see --list)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="where to write the ONNX model"),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset (default 17, dynamo 18; max 20)"),
    batch: int = typer.Option(1, "--batch", help="batch size of the exported inputs"),
    dynamic_batch: bool = typer.Option(False, "--dynamic-batch", help="make the batch axis symbolic"),
    exporter: str = typer.Option("torchscript", "--exporter", help="torchscript (dynamo=False) | dynamo"),
    data: Optional[Path] = typer.Option(None, "--data", help="also write calibration/eval inputs to this .npz"),
    samples: int = typer.Option(64, "--samples", help="samples written with --data"),
    split: str = typer.Option("calib", "--split", help="--data from 'calib' or 'eval' data"),
    list_models: bool = typer.Option(False, "--list", help="list the models and exit"),
):
    """Export a PyTorch zoo model to ONNX (needs the torch extra), optionally with sample data."""
    import opc.models as zoo

    if list_models:
        for n in zoo.list_models():
            info = zoo.describe(n)
            _out(f"{n:<20} {info.family:<9} {info.summary}")
            _out(f"{'':<20} {'':<9} data: {info.data}")
        return
    if name is None or output is None:
        raise UsageError("opc export NAME -o OUT.onnx (or opc export --list)")
    zoo.describe(name)  # unknown names fail before torch is needed
    if data is not None and data.suffix != ".npz":
        raise UsageError(f"--data {data}: must end in .npz")
    if samples < 1:
        raise UsageError(f"--samples {samples}: must be >= 1")
    zoo.require_torch()
    import numpy as np

    from opc.ort import compare, make_session
    from opc.summary import human_bytes, model_summary

    path = zoo.export(name, output, opset=opset, batch=batch, dynamic_batch=dynamic_batch, exporter=exporter)
    import onnx

    model = onnx.load(str(path))
    feeds = zoo.sample_data(name, batch, "calib")
    sess = make_session(model, threads=2)
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    worst = max(compare(ref, got[k])["max_abs"] for k, ref in zoo.torch_outputs(name, feeds).items())
    s = model_summary(model)
    _out(f"wrote {path} ({name}, opset {s['opset']}, batch {'dynamic' if dynamic_batch else batch}, "
         f"{s['nodes']} nodes, {s['parameters']:,} parameters, {human_bytes(path.stat().st_size)}); "
         f"max abs difference vs PyTorch {worst:.3g}")
    if data is not None:
        import os
        import tempfile

        arrays = zoo.sample_data(name, samples, split)
        fd, tmp = tempfile.mkstemp(prefix=f".{data.name}.", suffix=".tmp.npz", dir=data.absolute().parent)
        os.close(fd)
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, data)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        kind = "synthetic" if zoo.describe(name).synthetic else "real"
        _out(f"wrote {data} ({samples} {kind} {split} samples: {', '.join(arrays)})")


# [run/bench]
@app.command("run")
def run_cmd(
    model: Path,
    inputs: Optional[Path] = typer.Option(None, "--inputs", help=".npz keyed by input name (default: seeded random)"),
    backend: str = typer.Option("auto", "--backend", help="auto, numpy or cupy"),
    save_outputs: Optional[Path] = typer.Option(None, "--save-outputs", help="write the outputs to this .npz"),
    compare_to: Optional[str] = typer.Option(None, "--compare-to", help="ort: compare with ONNX Runtime (exit 3 if off)"),
    validate: bool = typer.Option(False, "--validate", help="exit 1 if any output holds NaN or Inf"),
    rtol: float = typer.Option(1e-4, "--rtol"),
    atol: float = typer.Option(1e-5, "--atol"),
    input_shapes: Optional[List[str]] = typer.Option(None, "--input-shapes"),
    seed: int = typer.Option(0, "--seed"),
):
    """Run MODEL with opc's runtime (NumPy, or CuPy on a GPU) and print its outputs."""
    from opc.runtime.cli_impl import run_command

    run_command(model, inputs, backend, save_outputs, compare_to, validate, rtol, atol,
                parse_input_shapes(input_shapes), seed, _out)


@app.command("bench")
def bench_cmd(
    model: Path,
    backend: str = typer.Option("auto", "--backend", help="auto, numpy or cupy"),
    batch: int = typer.Option(1, "--batch", help="batch size (symbolic first dimensions)"),
    vs: Optional[str] = typer.Option(None, "--vs", help="ort: also time ONNX Runtime CPU"),
    repeats: int = typer.Option(20, "--repeats"),
    threads: int = typer.Option(1, "--threads", help="BLAS / ORT intra-op threads"),
    input_shapes: Optional[List[str]] = typer.Option(None, "--input-shapes"),
):
    """Median latency of MODEL in opc's runtime (and ONNX Runtime with --vs ort)."""
    from opc.runtime.cli_impl import bench_command

    bench_command(model, backend, batch, vs, repeats, threads, parse_input_shapes(input_shapes), _out)


# [tune]
@app.command("tune")
def tune_cmd(
    model: Path = typer.Argument(..., help="input ONNX model"),
    output: Path = typer.Option(..., "-o", "--output", help="where to write the winner (or the closest miss)"),
    calibration_data: Path = typer.Option(..., "--calibration-data", help=".npz for quantize calibration"),
    eval_data: Path = typer.Option(..., "--eval-data", help=".npz of evaluation inputs (+ optional 'labels')"),
    labels: Optional[Path] = typer.Option(None, "--labels", help=".npy of labels for --metric top1"),
    metric: str = typer.Option("top1", "--metric", help="top1 | cosine | mse | module.py:function"),
    max_drop: float = typer.Option(0.01, "--max-drop", help="largest metric drop allowed vs the float model"),
    trials: int = typer.Option(20, "--trials", help="configurations to evaluate (the float baseline is extra)"),
    objective: str = typer.Option("latency", "--objective", help="latency | size"),
    log: Optional[Path] = typer.Option(None, "--log", help="write every trial as a JSON line"),
    seed: int = typer.Option(0, "--seed", help="seed of the search order"),
    strategy: str = typer.Option("greedy", "--strategy", help="greedy | tpe (after the fallback)"),
    workers: int = typer.Option(0, "--workers", help="parallel trial processes (0: half the cores, 1: serial)"),
    repeats: int = typer.Option(30, "--repeats", help="timed runs per latency measurement"),
    latency_batch: int = typer.Option(1, "--latency-batch", help="samples per timed run"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="only the final line"),
):
    """Search per-layer quantize/prune choices for the fastest (or smallest) model within --max-drop.

    Exit 3 when no configuration meets the budget (the closest one is written)."""
    from opc.tune import run_cli

    rc = run_cli(model, output, calibration_data, eval_data, labels=labels, metric=metric, max_drop=max_drop,
                 trials=trials, objective=objective, log=log, seed=seed, workers=workers, repeats=repeats,
                 latency_batch=latency_batch, quiet=quiet, echo=_out, strategy=strategy)
    if rc:
        raise typer.Exit(rc)


def _click_errors(name: str) -> tuple:
    """click's exception class of that name, from typer's vendored click and/or click itself."""
    found = []
    for module in ("typer.exceptions", "typer._click.exceptions", "click.exceptions"):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_WARNED: set = set()


def _err(line: str) -> None:
    """One line on stderr. Names come from untrusted files: whitespace runs become one
    space and other control characters (terminal escape sequences) are shown escaped."""
    line = " ".join(line.split())
    typer.echo("".join(c if c.isprintable() else repr(c)[1:-1] for c in line), err=True)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    key = getattr(message, "detail", str(message))
    if key not in _WARNED:  # a model is validated when loaded and again when compiled
        _WARNED.add(key)
        _err(f"opc: warning: {message}")


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout` or a job scheduler), raised so that cleanup runs."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _run_command(argv: list[str]):
    # make_context/invoke directly (not click's main): click and typer turn Ctrl-C into
    # their own exits and print blank lines; here every outcome is mapped in main()
    command = typer.main.get_command(app)
    with command.make_context("opc", list(argv)) as ctx:
        return command.invoke(ctx)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit code. Every failure is one line on stderr:
    0 ok, 1 invalid input or failure, 2 usage, 3 verification mismatch, 130 Ctrl-C,
    143 SIGTERM (both after cleanup: nothing half-written is left)."""
    global _DEBUG
    import signal

    argv = list(sys.argv[1:] if argv is None else argv)
    _DEBUG = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if _DEBUG:
        import logging

        logging.basicConfig(level=logging.DEBUG)
    _WARNED.clear()
    try:
        previous_term = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        previous_term = None
    try:
        return _main(argv)
    finally:
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _main(argv: list[str]) -> int:
    import errno
    import warnings

    with warnings.catch_warnings():
        from opc.validate import OpcWarning

        if not _DEBUG:  # library chatter (deprecations, numpy overflow...) is not for users
            warnings.simplefilter("ignore")
            warnings.showwarning = _show_warning
        warnings.simplefilter("always", OpcWarning)
        try:
            rc = _run_command(argv)
            return rc if isinstance(rc, int) else 0
        except _click_errors("Exit") as exc:
            return exc.exit_code
        except _click_errors("UsageError") as exc:
            text = " ".join(exc.format_message().split())
            if text:  # empty when no arguments at all: the help was printed instead
                _err(f"opc: usage error: {text}")
            return EXIT_USAGE
        except _click_errors("ClickException") as exc:
            _err(f"opc: error: {exc.format_message()}")
            return exc.exit_code
        except (KeyboardInterrupt, *_click_errors("Abort")):
            typer.echo("opc: interrupted", err=True)
            return EXIT_INTERRUPTED
        except _Terminated:
            typer.echo("opc: terminated", err=True)
            return 128 + 15
        except OpcError as exc:
            if _DEBUG:
                traceback.print_exc()
            _err(f"opc: error: {exc}")
            return exc.exit_code
        except MemoryError:
            if _DEBUG:
                traceback.print_exc()
            typer.echo("opc: error: out of memory", err=True)
            return EXIT_FAILURE
        except OSError as exc:  # the environment (permissions, full disk, closed pipe), not a bug
            if _DEBUG:
                traceback.print_exc()
            if exc.errno == errno.EPIPE:
                return EXIT_FAILURE
            where = f"{exc.filename}: " if exc.filename else ""
            _err(f"opc: error: {where}{exc.strerror or exc}")
            return EXIT_FAILURE
        except Exception as exc:  # a bug: still one line unless --debug
            if _DEBUG:
                traceback.print_exc()
            text = " ".join(str(exc).split())
            if len(text) > 300:
                text = text[:300] + "..."
            _err(f"opc: internal error: {type(exc).__name__}: {text} (rerun with --debug for the traceback)")
            return EXIT_FAILURE


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()

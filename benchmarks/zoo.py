"""The zoo's fp32 baseline: size, ONNX Runtime latency and accuracy of every model.

    python -m benchmarks.zoo [--models ...] [--repeats N] [--threads N] [--quick]

The reference row every lossy pass is compared against: nodes, parameters, file size,
export time, ORT latency at batch 1 and 32 (median, fixed threads) and the metric on
the model's evaluation data (top-1 on real labels, pair-ranking AUC for minilm-l6,
"-" where the weights are random or the data synthetic), for both exporters.
"""

from __future__ import annotations

import time

from benchmarks import common

QUICK = ["digits-cnn", "kws-lstm", "bert-tiny"]


def _metric(name: str, path) -> float | None:
    import opc.models as zoo
    from opc.ort import make_session

    info = zoo.describe(name)
    es = zoo.eval_set(name)
    if es.labels is None or info.synthetic or "random" in info.data or "random" in es.source:
        return None
    sess = make_session(__import__("onnx").load(str(path)), threads=2)
    out = sess.run(None, es.inputs)[0]
    if es.metric == "pairs":
        from opc.models.text import pair_accuracy

        return pair_accuracy(out, es.labels)
    return float((out.argmax(1) == es.labels).mean())


def main(argv=None) -> None:
    import opc.models as zoo

    args = common.bench_args(__doc__.splitlines()[0], default_models=None, argv=argv,
                             extra=lambda p: p.add_argument("--exporters", nargs="*",
                                                            default=["torchscript", "dynamo"]))
    names = args.models or (QUICK if args.quick else zoo.list_models())
    rows = []
    for name in names:
        for exporter in args.exporters:
            t0 = time.perf_counter()
            path = common.CACHE / f"zoo-bench-{name}-{exporter}.onnx"
            common.CACHE.mkdir(parents=True, exist_ok=True)
            zoo.export(name, path, dynamic_batch=True, exporter=exporter)
            export_s = time.perf_counter() - t0
            stats = common.model_stats(path)
            lat = {b: common.ort_latency(path, zoo.sample_data(name, b, "eval"), threads=args.threads,
                                         repeats=args.repeats if b == 1 else max(3, args.repeats // 4))
                   for b in (1, 32)}
            rows.append({"model": name, "exporter": exporter, "nodes": stats["nodes"],
                         "parameters": stats["parameters"], "file MiB": stats["file_bytes"] / 2**20,
                         "export s": export_s, "ms b1": lat[1]["median_ms"], "ms b32": lat[32]["median_ms"],
                         "fp32 metric": _metric(name, path)})
            print(f"  {name} ({exporter}): done", flush=True)
    common.report("zoo", rows, title="Zoo fp32 baseline", threads=args.threads, write_json=not args.no_json,
                  settings={"repeats b1": args.repeats, "repeats b32": max(3, args.repeats // 4),
                            "batch": "dynamic", "opset": "17 (torchscript) / 18 (dynamo)"},
                  notes=["fp32 metric: top-1 on real labels (digits: 360 held-out; efficientnet-lite0: "
                         "foolbox's 20 ImageNet images), pair-ranking AUC on 32 sentence pairs (minilm-l6); "
                         "'-' where weights are random or data synthetic."])


if __name__ == "__main__":
    main()

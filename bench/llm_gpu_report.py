"""bench/bench_llm_gpu.py's outputs: the ratio table (printed and ratios.md), results.json, decode.png."""

from __future__ import annotations

import json
from pathlib import Path

TARGET = 1.5  # issue 14: our decode step within 1.5x of the roofline


def label(point: dict) -> str:
    graphs = point.get("cuda_graphs")
    suffix = "" if graphs is None or point["system"] == "transformers" else (" graphs" if graphs else " eager")
    return point["system"] + suffix


def point_line(model: str, point: dict) -> str:
    return (f"  {model} {label(point)} batch {point['batch_size']}: {point['decode_step_ms']:.2f} ms/step, "
            f"backend {point.get('backend', '-')}, graphs in use: {point.get('cuda_graphs_in_use', '-')}")


def table_rows(results: dict) -> list[dict]:
    """One row per measured point, ours with its speed-up over transformers and vLLM at the same batch."""
    rows = []
    for model in results["models"]:
        points = model["points"]
        for point in points:
            same_batch = [p for p in points if p["batch_size"] == point["batch_size"]]
            hf = [p["decode_tokens_per_s"] for p in same_batch if p["system"] == "transformers"]
            vllm = [p["decode_tokens_per_s"] for p in same_batch if p["system"] == "vllm"]
            ours = point["system"] == "ours"
            rows.append({
                "model": model["model"], "batch": point["batch_size"], "system": label(point),
                "step_ms": point["decode_step_ms"], "tok_s": point["decode_tokens_per_s"],
                "roofline_ms": point["roofline_ms"], "x_roofline": point["vs_roofline"],
                "meets_target": point["vs_roofline"] <= TARGET if ours else None,
                "vs_transformers": point["decode_tokens_per_s"] / hf[0] if ours and hf else None,
                "vs_best_vllm": point["decode_tokens_per_s"] / max(vllm) if ours and vllm else None,
            })
    return rows


def markdown(results: dict) -> str:
    header = ("| model | batch | system | step ms | tok/s | roofline ms | x roofline | <= 1.5x | "
              "vs transformers | vs vLLM |")
    lines = [header, "|" + "---|" * 10]
    for r in table_rows(results):
        cells = [r["model"], r["batch"], r["system"], f"{r['step_ms']:.2f}", f"{r['tok_s']:.0f}",
                 f"{r['roofline_ms']:.3f}", f"{r['x_roofline']:.2f}",
                 "" if r["meets_target"] is None else ("yes" if r["meets_target"] else "no"),
                 _ratio(r["vs_transformers"]), _ratio(r["vs_best_vllm"])]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = [f"copy bandwidth {results['copy_bandwidth_bytes_per_s'] / 1e9:.0f} GB/s on {results['device']}; "
             f"{results['dtype']}, {results['prompt_tokens']}-token prompts, {results['decode_steps']} timed steps."]
    for model in results["models"]:
        notes.append(f"{model['model']}: our engine's CUDA-graphs option {model['cuda_graphs_option']}"
                     + "".join(f"; {k}: {v}" for k, v in model["errors"].items()))
    return "\n".join(lines + [""] + notes) + "\n"


def _ratio(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}x"


def plot(results: dict, path: Path) -> bool:
    """Decode tok/s by batch size, one line per system, one panel per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    models = results["models"]
    figure, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models):
        by_system: dict[str, list[tuple[int, float]]] = {}
        for point in model["points"]:
            by_system.setdefault(label(point), []).append((point["batch_size"], point["decode_tokens_per_s"]))
        for system, values in sorted(by_system.items()):
            values.sort()
            axis.plot([b for b, _ in values], [t for _, t in values], marker="o", label=system)
        roofline = sorted({(p["batch_size"], p["batch_size"] / p["roofline_ms"] * 1e3) for p in model["points"]
                           if p["system"] == "ours"})
        if roofline:
            axis.plot([b for b, _ in roofline], [t for _, t in roofline], "k--", label="roofline")
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size (sequences)")
        axis.set_ylabel("decode tokens/s")
        axis.set_title(model["model"])
        axis.legend(fontsize=8)
    figure.suptitle(f"decode throughput on {results['device']} ({results['dtype']})")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write(results: dict, out_dir: Path) -> str:
    """Writes results.json, ratios.md and decode.png under out_dir; returns the table and the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / "ratios.md").write_text(table)
    plotted = plot(results, out_dir / "decode.png")
    return table + f"\nwrote {out_dir}/results.json, ratios.md" + (", decode.png" if plotted else "")

"""Speed and memory of mmprompt's fast path against the research code's naive way.

    python bench/bench.py                           # tiny config (all adapters) + ViT-B/16 (MaPLe)
    python bench/bench.py --model ViT-B-16-quickgelu --adapters all --json out.json
    python bench/bench.py --quick                   # smoke run: fewer iterations, no 1000-class training

Per model and adapter it measures a training step (batch 4 with 100 and 1000 classes), an
evaluation (batches of 100 against 1000 classes: the one-time text encoding plus the image
batches), the image tower alone on the same batches, the cost of recording attention statistics,
and the text pass's peak memory with and without class chunks. Paths are interleaved call by
call so that a busy machine slows both alike; medians are reported. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import Meter  # noqa: E402
from paths import make_paths, running  # noqa: E402

from mmprompt import adapters as A  # noqa: E402
from mmprompt.classes import ClassSet  # noqa: E402
from mmprompt.model.module import PromptCLIPModule  # noqa: E402

ADAPTERS = {
    "zero-shot": A.ZeroShot, "coop": A.CoOp, "vpt-deep": A.VPTDeep, "ivlp": A.IVLP, "maple": A.MaPLe,
    "bias": A.BiasTuning, "coupled-bias": A.CoupledBiasTuning, "lora": A.LoRA,
}
VIT_B16 = "ViT-B-16-quickgelu"


@dataclass
class Settings:
    """How much to run for one model (defaults keep a 2-core CPU run to minutes)."""

    adapters: list[str]
    train_classes: list[int] = field(default_factory=lambda: [100, 1000])
    train_batch: int = 4
    train_iters: int = 5  # the first is a warm-up
    naive_train_max_classes: int = 1000  # naive 1000-class backward on ViT-B/16 needs ~25 GB
    eval_classes: int = 1000
    eval_batch: int = 100
    eval_batches: int = 3
    full_eval_images: int = 50_000  # ImageNet val: the evaluation the amortised ratios describe
    record_batches: int = 1
    chunk_size: int = 100
    threads: int | None = None  # CPU threads; None: all cores


def default_settings(model: str, quick: bool) -> Settings:
    """ViT-B/16 on CPU is slow (a batch of 100 images ≈ 40 s), so it runs MaPLe only by default."""
    if model == VIT_B16:
        settings = Settings(["maple"], train_iters=3, eval_batches=2, naive_train_max_classes=100)
        if quick:
            settings.train_iters, settings.eval_batches, settings.train_classes = 2, 1, [100]
        return settings
    settings = Settings(list(ADAPTERS), threads=1)  # tiny ops gain nothing from threads, lose on a busy box
    if quick:
        settings.train_iters, settings.eval_batches = 3, 2
    return settings


def class_set(count: int) -> ClassSet:
    """The first ``count`` ImageNet class names (repeated with a suffix past 1000): real lengths."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = [IMAGENET_CLASSNAMES[i % 1000] + (f" {i // 1000}" if i >= 1000 else "") for i in range(count)]
    return ClassSet(f"imagenet-{count}", tuple(names), "a photo of a {}.")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(getattr(torch.backends.mkldnn, "is_available", lambda: False)()) and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast where asked for (``auto``: where the device supports it)."""
    use_bf16 = precision == "bf16" or (precision == "auto" and bf16_supported(device))
    if not use_bf16:
        return nullcontext, "fp32"
    return (lambda: torch.autocast(device.type, dtype=torch.bfloat16)), "bf16 autocast"


# ----------------------------------------------------------------------------- sections


@dataclass
class Bench:
    """One model and adapter under test, with what every section needs."""

    module: PromptCLIPModule
    meter: Meter
    settings: Settings
    autocast: object
    paths: dict
    device: torch.device

    def images(self, batch: int) -> torch.Tensor:
        size = self.module.spec.image_size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch)).to(self.device)

    def call(self, label: str, path: str, fn, images=None, keep: bool = True):
        """Run ``fn`` on ``path`` under autocast, measured as ``label/path``."""
        with running(self.module, self.paths[path], images), self.autocast(), \
                self.meter.measure(f"{label}/{path}", keep):
            return fn()


def train_step(module: PromptCLIPModule, optimizer, images: torch.Tensor, labels: torch.Tensor,
               classes: ClassSet) -> None:
    """One optimisation step on the adapter (forward only for adapters without parameters)."""
    loss = F.cross_entropy(module(images, classes).float(), labels)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def bench_train(bench: Bench, num_classes: int) -> None:
    """Training step throughput at ``num_classes``, fast and naive interleaved per iteration."""
    module, settings = bench.module, bench.settings
    classes = class_set(num_classes)
    images = bench.images(settings.train_batch)
    labels = torch.randint(num_classes, (settings.train_batch,), generator=torch.Generator().manual_seed(0))
    parameters = [p for p in module.adapter.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=1e-6, momentum=0.9) if parameters else None
    paths = ["fast"] + (["naive"] if num_classes <= settings.naive_train_max_classes else [])
    module.train()
    with torch.enable_grad():
        for iteration in range(settings.train_iters):
            for path in paths:
                bench.call(f"train{num_classes}", path,
                           lambda: train_step(module, optimizer, images, labels.to(bench.device), classes),
                           images, keep=iteration > 0)


def bench_eval(bench: Bench) -> None:
    """Evaluation: text encoded once (fast) or per batch (naive); image tower alone; recording."""
    module, settings = bench.module, bench.settings
    classes = class_set(settings.eval_classes)
    images = bench.images(settings.eval_batch)
    module.eval()
    with torch.no_grad():
        warm = bench.images(2)
        for path in bench.paths:
            bench.call("warmup", path, lambda: module(warm, class_set(8)), warm, keep=False)
        for path in ("fast", "recorded"):
            bench.paths[path].caches.features.clear()  # a new evaluation: on_test_epoch_start
            bench.call("text_once", path, lambda: module.text_features(classes))
        for index in range(settings.eval_batches):
            bench.call("eval", "fast", lambda: module(images, classes), images)
            bench.call("eval", "naive", lambda: module(images, classes), images)
            bench.call("image", "fast", lambda: module.image_features(images), images)
            if index < settings.record_batches:
                bench.call("eval", "recorded", lambda: module(images, classes), images)


def bench_text_memory(bench: Bench) -> None:
    """Peak memory of one 1000-class text pass with and without class chunks (fast path)."""
    module, settings = bench.module, bench.settings
    classes = class_set(settings.eval_classes)
    module.eval()
    with torch.no_grad():
        for chunk in (None, settings.chunk_size):
            bench.paths["fast"].options = replace(bench.paths["fast"].options, text_chunk_size=chunk)
            bench.call(f"text_chunk{chunk}", "fast", lambda: module.encode_classes(classes))
    bench.paths["fast"].options = replace(bench.paths["fast"].options, text_chunk_size=None)


# ----------------------------------------------------------------------------- results


#: AttentionStatistics(max_batches=10): batches recorded per test dataloader by default
RECORDED_BATCHES_DEFAULT = 10


def full_evaluation(meter: Meter, settings: Settings) -> dict[str, float]:
    """Ratios for a whole evaluation of ``full_eval_images`` (ImageNet val), from the measured parts.

    The fast path pays the text pass once per evaluation, so its cost over a real test set is the
    measured one-time text pass plus the measured per-batch median times the number of batches.
    """
    batches = math.ceil(settings.full_eval_images / settings.eval_batch)
    fast = meter.median_seconds("text_once/fast") + batches * meter.median_seconds("eval/fast")
    recorded_batches = min(RECORDED_BATCHES_DEFAULT, batches)
    recorded = (meter.median_seconds("text_once/recorded") + recorded_batches * meter.median_seconds("eval/recorded")
                + (batches - recorded_batches) * meter.median_seconds("eval/fast"))
    return {"eval_speedup_full": batches * meter.median_seconds("eval/naive") / fast,
            "eval_over_image_tower_full": fast / (batches * meter.median_seconds("image/fast")),
            "recording_overhead_full": recorded / fast - 1}


def eval_summary(meter: Meter, settings: Settings) -> dict[str, float]:
    """Throughput of an evaluation of ``eval_batches`` batches: one-time text + per-batch medians."""
    n, batch = settings.eval_batches, settings.eval_batch
    images = n * batch
    fast = meter.median_seconds("text_once/fast") + n * meter.median_seconds("eval/fast")
    naive = n * meter.median_seconds("eval/naive")
    image = n * meter.median_seconds("image/fast")
    recorded_batches = min(settings.record_batches, n)
    recorded = (meter.median_seconds("text_once/recorded") + recorded_batches * meter.median_seconds("eval/recorded")
                + (n - recorded_batches) * meter.median_seconds("eval/fast"))
    return {
        "eval_fast_img_s": images / fast, "eval_naive_img_s": images / naive, "image_tower_img_s": images / image,
        "eval_speedup": naive / fast, "eval_over_image_tower": fast / image,
        **full_evaluation(meter, settings),
        "text_once_s": meter.median_seconds("text_once/fast"),
        "recording_overhead": recorded / fast - 1,
        "recording_overhead_per_batch": meter.median_seconds("eval/recorded") / meter.median_seconds("eval/fast") - 1,
        "eval_fast_peak_mib": meter.peak_mib("text_once/fast", "eval/fast"),
        "eval_naive_peak_mib": meter.peak_mib("eval/naive"),
    }


def adapter_summary(model: str, adapter: str, meter: Meter, settings: Settings) -> dict[str, float | str]:
    row: dict[str, float | str] = {"model": model, "adapter": adapter}
    for classes in settings.train_classes:
        for path in ("fast", "naive"):
            seconds = meter.median_seconds(f"train{classes}/{path}")
            row[f"train{classes}_{path}_img_s"] = settings.train_batch / seconds
            row[f"train{classes}_{path}_peak_mib"] = meter.peak_mib(f"train{classes}/{path}")
        row[f"train{classes}_speedup"] = row[f"train{classes}_fast_img_s"] / row[f"train{classes}_naive_img_s"]
    row.update(eval_summary(meter, settings))
    row["text_peak_mib_unchunked"] = meter.peak_mib("text_chunkNone/fast")
    row[f"text_peak_mib_chunk{settings.chunk_size}"] = meter.peak_mib(f"text_chunk{settings.chunk_size}/fast")
    row["samples"] = {label: [asdict(s) for s in samples] for label, samples in meter.samples.items()}
    return row


def fmt(value) -> str:
    if isinstance(value, str):
        return value
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def markdown(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    lines = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def tables(rows: list[dict], settings_by_model: dict[str, Settings]) -> str:
    """Throughput, speed-up and memory tables in Markdown."""
    any_settings = next(iter(settings_by_model.values()))
    throughput = [("model", "model"), ("adapter", "adapter")]
    speedups = [("model", "model"), ("adapter", "adapter")]
    memory = [("model", "model"), ("adapter", "adapter")]
    for classes in sorted({c for s in settings_by_model.values() for c in s.train_classes}):
        throughput += [(f"train{classes}_fast_img_s", f"train@{classes} fast img/s"),
                       (f"train{classes}_naive_img_s", f"train@{classes} naive img/s")]
        speedups += [(f"train{classes}_speedup", f"train@{classes} ×")]
        memory += [(f"train{classes}_fast_peak_mib", f"train@{classes} fast MiB"),
                   (f"train{classes}_naive_peak_mib", f"train@{classes} naive MiB")]
    throughput += [("eval_fast_img_s", "eval fast img/s"), ("eval_naive_img_s", "eval naive img/s"),
                   ("image_tower_img_s", "image tower img/s")]
    full = f"{any_settings.full_eval_images // 1000}k images"
    speedups += [("eval_speedup", "eval ×"), ("eval_over_image_tower", "eval / image tower"),
                 ("eval_speedup_full", f"eval × ({full})"),
                 ("eval_over_image_tower_full", f"eval / image tower ({full})"),
                 ("recording_overhead", "recording overhead"),
                 ("recording_overhead_full", f"recording overhead ({full}, {RECORDED_BATCHES_DEFAULT} batches recorded)"),
                 ("recording_overhead_per_batch", "recording overhead if every batch")]
    memory += [("eval_fast_peak_mib", "eval fast MiB"), ("eval_naive_peak_mib", "eval naive MiB"),
               ("text_peak_mib_unchunked", "text pass MiB"),
               (f"text_peak_mib_chunk{any_settings.chunk_size}", f"text pass MiB, chunks of {any_settings.chunk_size}")]
    return "\n\n".join([
        "Throughput (images/s; median of the timed iterations)\n\n" + markdown(rows, throughput),
        "Speed-up of the fast path over the naive path, and overheads\n\n" + markdown(rows, speedups),
        "Peak memory above the loaded model (MiB)\n\n" + markdown(rows, memory),
    ])


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__,
            "python": platform.python_version()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_outputs(rows: list[dict], info: dict, args: argparse.Namespace) -> None:
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "rows": rows}, indent=1))
    if args.csv:
        flat = [{k: v for k, v in row.items() if k != "samples"} for row in rows]
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for row in flat for k in row}))
            writer.writeheader()
            writer.writerows(flat)


# ----------------------------------------------------------------------------- main


def run_adapter(model: str, adapter: str, settings: Settings, device: torch.device, autocast, log) -> dict:
    """Every section for one adapter; the module is built once and shared by all paths."""
    torch.manual_seed(0)
    module = PromptCLIPModule(ADAPTERS[adapter](), model_name=model, pretrained=None).to(device)
    paths, recorder = make_paths(module)
    meter = Meter(device)
    bench = Bench(module, meter, settings, autocast, paths, device)
    try:
        for classes in settings.train_classes:
            log(f"  train@{classes}")
            bench_train(bench, classes)
        log(f"  eval@{settings.eval_classes} × {settings.eval_batches} batches of {settings.eval_batch}")
        bench_eval(bench)
        log("  text pass memory")
        bench_text_memory(bench)
    finally:
        meter.close()
    row = adapter_summary(model, adapter, meter, settings)
    row["recorder"] = recorder
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help=f"open_clip name; repeatable (default: mmprompt-tiny, {VIT_B16})")
    parser.add_argument("--adapters", help=f"comma list or 'all' of {', '.join(ADAPTERS)} (default: all; MaPLe on ViT-B/16)")
    parser.add_argument("--train-classes", help="comma list of class counts for the training step (default 100,1000)")
    parser.add_argument("--train-iters", type=int, help="training steps per path, the first a warm-up")
    parser.add_argument("--eval-batches", type=int, help="evaluation batches per path")
    parser.add_argument("--eval-batch", type=int, help="evaluation batch size (default 100)")
    parser.add_argument("--eval-classes", type=int, help="evaluation classes (default 1000)")
    parser.add_argument("--record-batches", type=int, help="evaluation batches recorded by the statistics probe")
    parser.add_argument("--naive-train-max-classes", type=int, help="skip naive training above this many classes")
    parser.add_argument("--quick", action="store_true", help="fewer iterations; no 1000-class training on ViT-B/16")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 autocast where the device supports it")
    parser.add_argument("--threads", type=int, help="CPU threads (default: all cores; 1 for the tiny config)")
    parser.add_argument("--json", help="write every sample and summary here")
    parser.add_argument("--csv", help="write the summary rows here")
    return parser.parse_args(argv)


def settings_for(model: str, args: argparse.Namespace) -> Settings:
    """Per-model defaults, overridden by whatever the command line sets."""
    settings = default_settings(model, args.quick)
    if args.adapters:
        settings.adapters = list(ADAPTERS) if args.adapters == "all" else args.adapters.split(",")
        unknown = set(settings.adapters) - set(ADAPTERS)
        if unknown:
            raise SystemExit(f"unknown adapters {sorted(unknown)}; choose from {list(ADAPTERS)}")
    if args.train_classes:
        settings.train_classes = [int(c) for c in args.train_classes.split(",")]
    for name in ("threads", "train_iters", "eval_batches", "eval_batch", "eval_classes", "record_batches",
                 "naive_train_max_classes"):
        if getattr(args, name) is not None:
            setattr(settings, name, getattr(args, name))
    return settings


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    all_threads = torch.get_num_threads()
    device = pick_device(args.device)
    autocast, precision = autocast_for(device, args.precision)
    info = machine() | {"device": str(device), "precision": precision}
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    log(f"machine: {info}")
    rows, settings_by_model = [], {}
    for model in args.model or ["mmprompt-tiny", VIT_B16]:
        settings = settings_by_model[model] = settings_for(model, args)
        torch.set_num_threads(settings.threads or all_threads)
        for adapter in settings.adapters:
            log(f"{model} / {adapter}")
            rows.append(run_adapter(model, adapter, settings, device, autocast, log))
    print(f"machine: {', '.join(f'{k}={v}' for k, v in info.items())}\n")
    for model, settings in settings_by_model.items():
        print(f"{model}: {json.dumps({k: v for k, v in asdict(settings).items() if k != 'adapters'})}")
    print()
    print(tables(rows, settings_by_model))
    write_outputs(rows, info, args)
    return rows


if __name__ == "__main__":
    main()

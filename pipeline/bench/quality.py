"""The bench's quality section (--quality): students trained for the same steps on the same rows with each loss,
then scored by evaluate.evaluate (the evaluator of compare): val perplexity, KL to the teacher, top-1 agreement."""

from __future__ import annotations

import time

from pipeline.batches import CacheRows
from pipeline.bench.probes import log
from pipeline.bench.students import BenchStudent, StepVariant, bench_step, step_batches
from pipeline.config import BenchConfig, StudentConfig
from pipeline.evaluate import evaluate

QUALITY_VARIANTS = {
    "ce": StepVariant("CE only"),
    "topk": StepVariant("KD topk + tail", cache_mode="topk"),
    "topk-renorm": StepVariant("KD topk renormalised", cache_mode="topk", topk_renormalize=True),
    "sampled": StepVariant("KD sampled", cache_mode="sampled"),
    "online": StepVariant("online dense KD", online=True),
}


def run_quality(
    accelerator,
    config: BenchConfig,
    student_config: StudentConfig,
    readers: dict,
    val_reader,
    teacher,
    batch_size: int,
    vocab: int,
) -> dict:
    """Train one student per QUALITY_VARIANTS entry for --quality-steps steps on the same rows and schedule (the
    training step and learning-rate schedule of distill), then evaluate them all with the evaluator of compare."""
    steps = config.quality_steps
    batches = step_batches(readers, batch_size, config.seed, steps)
    num_samples = int(readers["sampled"].attrs["num_samples"])
    results, trained = {}, {}
    for key, variant in QUALITY_VARIANTS.items():
        student = BenchStudent(accelerator, variant, student_config, config, vocab, teacher, num_samples)
        start = time.perf_counter()
        for index, step in enumerate(batches):
            bench_step(accelerator, student, step, config, index, steps)
            if (index + 1) % max(1, steps // 4) == 0:
                log(f"quality: {variant.label} step {index + 1}/{steps}")
        seconds = time.perf_counter() - start
        trained[key] = accelerator.unwrap_model(student.model)
        tokens = batches[0]["topk"]["tokens"][:, 1:].numel()
        results[key] = {"label": variant.label, "train_tokens_per_s": steps * tokens / seconds}
    count = min(config.eval_rows, len(val_reader))
    figures = evaluate(
        {"teacher": teacher, **trained},
        CacheRows(val_reader),
        count=count,
        batch_size=batch_size,
        reference="teacher",
        temperature=float(val_reader.attrs["temperature"]),
        num_samples=int(val_reader.attrs.get("num_samples", 0)),
        desc="eval quality",
    )
    for key in trained:
        results[key].update(
            {
                "val_ppl": figures[key]["val_ppl"],
                "kl_cache": figures[key]["kl_to_teacher"],
                "kl_exact": figures[key]["kl_exact"],
                "top1_agreement": figures[key]["top1_agreement"],
            }
        )
    return {
        "steps": steps,
        "batch_size": batch_size,
        "train_rows": min(len(r) for r in readers.values()),
        "eval_rows": count,
        "eval_positions": figures["teacher"]["positions"],
        "kl_cache_estimator": f"{val_reader.mode} val cache (evaluate.evaluate)",
        "teacher_val_ppl": figures["teacher"]["val_ppl"],
        "variants": results,
    }

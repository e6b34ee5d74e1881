"""`bench`: throughput, memory and quality of the pipeline's hot paths, measured in one process on the same batches.

Every timed path is the pipeline's own code: stage 1 runs cache.TeacherRunner (the object cache-logits runs),
stage 2 runs train.training_step (the step distill and baseline run) with losses.StepLoss, and quality is scored
by evaluate.evaluate (the evaluator of compare).

Sections (bench.json keys; bench.md and the terminal get the same tables):
  stage1  teacher forward alone (TeacherRunner.full_logits) vs the cache-logits path (TeacherRunner.targets: teacher
          body, output head in chunks with the sparse extraction of sparse_targets.py; part write on a thread) for
          each mode; ratio of tokens/s (target >= 0.95); bytes/token of each mode vs dense fp16 logits (2 V);
          on a GPU the forward's model FLOPs utilisation, (2 P + 4 n_layer d_attn L) tokens / time / peak.
  stage2  tokens/s of one training step (forward, loss, backward, clip, AdamW): (a) CE only, (b) KD from the
          topk cache, (c) KD from the sampled cache, (d) online KD: the teacher inside the step under
          no_grad and a dense full-vocabulary KL (losses.dense_kd_loss). Variants run interleaved a b c d a b c d
          (machine drift hits all alike); medians. Also the loss alone, forward + backward on fixed logits.
  data    CacheRows + StepBatches + collate_rows through a DataLoader, rows/s, against the rows/s a step eats.
  memory  per step variant: peak RSS (CPU; VmHWM reset through /proc/self/clear_refs before each variant) or
          peak allocated (GPU), and the [tokens, vocab] tensors the loss saves for backward (saved-tensor hook).
  fused_head  the output head fused with the loss (--fused-head on) vs unfused, for CE, topk and sampled KD, at the
          tokenizer's vocabulary and with a 128,256-row head: step tokens/s (interleaved), peak memory of a step at
          the batch and twice it, [tokens, vocab] tensors saved, the largest batch within --memory-budget-mb.
  quality (--quality) students trained for the same steps on the same rows with CE, topk+tail KD,
          topk-renormalised KD, sampled KD and online dense KD: val perplexity, KL to the teacher.

The stage 1 passes write real parts; they are assembled into small topk and sampled caches in
`out_dir/cache-topk` and `out_dir/cache-sampled`, which stages 2-3 read (or --topk-cache / --sampled-cache).

--teacher-shape NAME|FILE.json runs stage 1 alone with a randomly initialised teacher of that shape, built in memory
(e.g. llama-3.2-1b: speed and memory do not depend on the weights), on the data's token rows; its ids are bounded by
its own head's width, as if its tokenizer had that many tokens.

The package, one module per job (run.run_bench is the entry point; `python -m pipeline bench` calls it):
  probes      machine facts, CPU busy share, PeakMemory, SavedTensorCounter, Laps: what every section measures with
  students    StepVariant (what a student's loss reads), BenchStudent, bench_step (train.training_step), step_batches
  stage1      teacher forward vs cache-logits, MFU, and the bench caches assembled from its parts
  stage2      the four training steps interleaved, the loss alone, the memory of one step
  data_path   the DataLoader path against the rows/s a step eats
  fused_head  fused vs unfused output head + loss, at the tokenizer's and a 128,256-row head
  quality     students trained with each loss at equal steps, scored by evaluate.evaluate
  run         run_bench: the sections in order, bench.json and bench.md
  report      render_markdown: the tables and paragraphs, described as data
  docs        docs/benchmarks.md from every docs/bench-*.json (`make docs`)
"""

from pipeline.bench.probes import PeakMemory, SavedTensorCounter, busy_machine, cpu_busy_fraction
from pipeline.bench.report import render_markdown
from pipeline.bench.run import resolve_batch_size, run_bench
from pipeline.bench.stage1 import forward_flops, peak_bf16_flops

__all__ = [
    "PeakMemory",
    "SavedTensorCounter",
    "busy_machine",
    "cpu_busy_fraction",
    "forward_flops",
    "peak_bf16_flops",
    "render_markdown",
    "resolve_batch_size",
    "run_bench",
]

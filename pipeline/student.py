"""The student: a new small Llama decoder or a model built from any transformers config file (a custom decoder),
either one by default with the teacher's token embeddings projected to its width; a shallow copy of the teacher
(DistilBERT/DistilGPT2 recipe); or an existing Hugging Face causal LM that shares the teacher's tokenizer.

What a student must share with the teacher is the tokenizer, not the embedding size: its output head needs a row
for every token id (at least the tokenizer's length), and may have more (padding rows, as many checkpoints round
their embeddings up). New students get the tokenizer's length rounded up to a multiple of ROW_MULTIPLE."""

from __future__ import annotations

import copy

import torch

from pipeline.config import StudentConfig
from pipeline.errors import PipelineError
from pipeline.models import config_from_json, input_embeddings, load_causal_lm, logit_width, new_causal_lm
from pipeline.teacher import tokenizer_hash as hash_of_tokenizer

# Per-layer settings of a config (one entry per decoder block) that a slice of the teacher's blocks must slice too.
PER_LAYER_CONFIG_KEYS = ("layer_types",)
# New students' rows: the tokenizer's length rounded up to a multiple of this (faster steps; docs/history.md,
# "2026-11-29: student rows"). The loss does not mask the extra rows: training pushes their logits down.
ROW_MULTIPLE = 64
NOT_SHARED = "this project distils between models that share one tokenizer (no cross-tokenizer distillation)"


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Every n-th teacher block, n = teacher_layers // student_layers, starting at block 0."""
    if student_layers > teacher_layers:
        raise PipelineError(f"--n-layer {student_layers} is more than the teacher's {teacher_layers} blocks")
    stride = teacher_layers // student_layers
    return [i * stride for i in range(student_layers)]


def student_rows(vocab_size: int) -> int:
    """Rows of a new student's embedding and head for a tokenizer of vocab_size tokens."""
    return -(-vocab_size // ROW_MULTIPLE) * ROW_MULTIPLE


def decoder_blocks(model) -> str:
    """Name of the ModuleList holding the model's decoder blocks (model.layers in Llama, Qwen2 and Gemma 2,
    transformer.h in GPT-2): the outermost ModuleList with one entry per config.num_hidden_layers."""
    count = model.config.num_hidden_layers
    found = sorted(
        (name.count("."), name)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) == count
    )
    if not found or (len(found) > 1 and found[0][0] == found[1][0]):
        raise PipelineError(
            f"--student-init teacher-layers cannot tell which module list of {type(model).__name__} holds its "
            f"{count} decoder blocks; build the student with --student-config FILE.json or pass --student PATH"
        )
    return found[0][1]


def _teacher_layers(teacher_dir: str, n_layer: int, rows: int):
    """Every n-th block of the teacher, with its embeddings (token and position), final norm and head; the
    embedding cut to `rows` when the teacher's has more (a padded embedding)."""
    teacher = load_causal_lm(teacher_dir)
    keep = teacher_layer_indices(teacher.config.num_hidden_layers, n_layer)
    student_config = copy.deepcopy(teacher.config)
    student_config.num_hidden_layers = len(keep)  # GPT-2's n_layer too (attribute_map)
    for key in PER_LAYER_CONFIG_KEYS:
        values = getattr(student_config, key, None)
        if values:
            setattr(student_config, key, [values[i] for i in keep])
    model = type(teacher)(student_config)
    teacher_blocks, student_blocks = decoder_blocks(teacher) + ".", decoder_blocks(model) + "."
    teacher_state = teacher.state_dict()
    with torch.no_grad():
        for key, value in model.state_dict().items():  # block i <- teacher block keep[i]; the rest by name
            source = key
            if key.startswith(student_blocks):
                index, rest = key[len(student_blocks) :].split(".", 1)
                source = f"{teacher_blocks}{keep[int(index)]}.{rest}"
            value.copy_(teacher_state[source])
    del teacher
    if logit_width(model) > rows:
        model.resize_token_embeddings(rows, mean_resizing=False)  # keeps the first rows (tied or not)
    return model


def teacher_embedding_projection(embeddings: torch.Tensor, width: int, std: float) -> torch.Tensor:
    """The teacher's token embeddings [V, H] on their `width` leading principal directions: centred (the mean row is
    an offset every token shares), projected on the top eigenvectors of their covariance, and scaled to standard
    deviation `std` (a new student's embedding init), so that tokens the teacher places close together start close
    together in the student, at the scale its own init would have. [V, width], float32."""
    rows, teacher_width = embeddings.shape
    if width > teacher_width:
        raise PipelineError(
            f"--student-init teacher-embeddings: the student's width {width} (--n-embd) is more than the teacher's "
            f"({teacher_width}); use --n-embd {teacher_width} or less, or --student-init random"
        )
    centred = embeddings.double() - embeddings.double().mean(0)
    _, vectors = torch.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    projected = centred @ vectors[:, -width:].flip(1)  # leading direction first
    return (projected * (std / projected.std())).float()


def _start_embeddings_from_teacher(model, teacher_dir: str, vocab_size: int) -> None:
    """Set a new student's token embeddings (tied with its head where the model ties them) to the teacher's,
    projected to the student's width (teacher_embedding_projection) over the tokenizer's `vocab_size` rows; the
    rest (a padded teacher's or student's extra rows) keep their random init."""
    source = input_embeddings(teacher_dir)
    start = model.get_input_embeddings().weight
    n = min(source.shape[0], start.shape[0], vocab_size)
    std = getattr(model.config, "initializer_range", None) or float(start.std())
    with torch.no_grad():
        start[:n] = teacher_embedding_projection(source[:n], start.shape[1], std)


def _from_config_file(path: str, teacher_dir: str, rows: int):
    """A new model from a transformers config JSON (any causal LM: the "custom decoder" case). Keys it leaves out take
    `rows` (vocab_size) and the teacher's special token ids."""
    from transformers import AutoConfig

    student_config, given = config_from_json(path, f"--student-config {path}")
    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    if "vocab_size" not in given:
        student_config.vocab_size = rows
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if key not in given:
            setattr(student_config, key, getattr(teacher_config, key, None))
    return new_causal_lm(student_config, f"--student-config {path}")


def _pretrained(path: str, tokenizer_hash: str | None):
    """An existing causal LM; refused when its folder carries a tokenizer other than the teacher's."""
    from transformers import AutoTokenizer

    model = load_causal_lm(path)
    if tokenizer_hash is not None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception:  # a folder of weights without tokenizer files: its head rows are still checked
            tokenizer = None
        if tokenizer is not None and hash_of_tokenizer(tokenizer) != tokenizer_hash:
            raise PipelineError(
                f"the student {path} uses another tokenizer ({len(tokenizer)} tokens) than the teacher and the "
                f"data: {NOT_SHARED}; pick a student trained with the teacher's tokenizer, or build one with "
                "--student-config FILE.json or --student-init teacher-layers"
            )
    return model


def _new_llama(config: StudentConfig, teacher_dir: str, rows: int):
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM

    teacher_config = AutoConfig.from_pretrained(teacher_dir)
    student_config = LlamaConfig(
        vocab_size=rows,
        hidden_size=config.n_embd,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        intermediate_size=config.mlp_size,
        max_position_embeddings=getattr(teacher_config, "max_position_embeddings", 2048) or 2048,
        tie_word_embeddings=True,
        bos_token_id=teacher_config.bos_token_id,
        eos_token_id=teacher_config.eos_token_id,
        pad_token_id=getattr(teacher_config, "pad_token_id", None),
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(student_config)


def build_student(
    config: StudentConfig,
    teacher_dir: str,
    vocab_size: int,
    seed: int,
    tokenizer_hash: str | None = None,
    seq_len: int | None = None,
):
    """The student in float32: its logits cover at least the tokenizer's `vocab_size` ids (the bound of every id in
    the data and the cache). tokenizer_hash (the data's): a pretrained --student with another tokenizer is refused;
    seq_len: a student whose context is shorter (GPT-2's learned positions end there) is refused."""
    torch.manual_seed(seed)
    if config.student:
        model = _pretrained(config.student, tokenizer_hash)
    elif config.student_init == "teacher-layers":
        model = _teacher_layers(teacher_dir, config.n_layer, student_rows(vocab_size))
    else:
        if config.student_config:
            model = _from_config_file(config.student_config, teacher_dir, student_rows(vocab_size))
        else:
            model = _new_llama(config, teacher_dir, student_rows(vocab_size))
        if config.student_init == "teacher-embeddings":
            _start_embeddings_from_teacher(model, teacher_dir, vocab_size)
    rows = logit_width(model)
    if rows < vocab_size:
        raise PipelineError(
            f"the student's output head has {rows} rows, fewer than the tokenizer's {vocab_size} tokens, so it cannot "
            f"predict every token id; give it at least {vocab_size} rows (vocab_size) or pick a student sharing the "
            "teacher's tokenizer"
        )
    context = getattr(model.config, "max_position_embeddings", None)
    if seq_len and context and seq_len > context:
        raise PipelineError(
            f"--seq-len {seq_len} is longer than the student's context ({context} positions); lower SEQ_LEN or give "
            "the student more positions (max_position_embeddings / n_positions)"
        )
    return model.float()

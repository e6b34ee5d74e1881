"""The student: a new small Llama decoder or a model built from any transformers config file (a custom decoder),
either one by default with the teacher's token embeddings projected to its width; a shallow copy of the teacher
(DistilBERT/DistilGPT2 recipe); or an existing Hugging Face causal LM.

The student's tokenizer (`student_tokenizer`) is the teacher's unless --student-tokenizer names another or a
--student brings its own: then it is a cross-tokenizer student (its rows, alignment and loss: docs/cross-tokenizer.md),
and a new one's embeddings start from the teacher's only for the tokens whose bytes both vocabularies hold.
Its output head needs a row for every id of its tokenizer, and may have more (padding rows, as many checkpoints round
their embeddings up). New students get the tokenizer's length rounded up to a multiple of ROW_MULTIPLE."""

from __future__ import annotations

import copy

import numpy as np
import torch

from pipeline.config import StudentConfig
from pipeline.errors import PipelineError
from pipeline.models import (
    config_from_json,
    input_embeddings,
    load_causal_lm,
    load_tokenizer,
    logit_width,
    new_causal_lm,
)

# Per-layer settings of a config (one entry per decoder block) that a slice of the teacher's blocks must slice too.
PER_LAYER_CONFIG_KEYS = ("layer_types",)
# New students' rows: the tokenizer's length rounded up to a multiple of this (faster steps; docs/history.md,
# "2026-11-29: student rows"). The loss does not mask the extra rows: training pushes their logits down.
ROW_MULTIPLE = 64


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


def _start_embeddings_from_teacher(
    model, teacher_dir: str, vocab_size: int, teacher_rows: np.ndarray | None = None
) -> int:
    """Set a new student's token embeddings (tied with its head where the model ties them) to the teacher's,
    projected to the student's width (teacher_embedding_projection); returns how many rows started from the teacher's.

    Same tokenizer (teacher_rows None): the tokenizer's `vocab_size` rows; the rest (a padded teacher's or student's
    extra rows) keep their random init. Another tokenizer: student row i starts from the teacher's row
    teacher_rows[i] (the teacher token with the same bytes: alignment.matching_rows), rows at -1 keep their random
    init."""
    source = input_embeddings(teacher_dir)
    start = model.get_input_embeddings().weight
    std = getattr(model.config, "initializer_range", None) or float(start.std())
    if teacher_rows is None:
        n = min(source.shape[0], start.shape[0], vocab_size)
        with torch.no_grad():
            start[:n] = teacher_embedding_projection(source[:n], start.shape[1], std)
        return n
    projected = teacher_embedding_projection(source, start.shape[1], std)
    student_ids = np.flatnonzero(teacher_rows[: start.shape[0]] >= 0)
    with torch.no_grad():
        start[torch.from_numpy(student_ids)] = projected[torch.from_numpy(teacher_rows[student_ids])]
    return len(student_ids)


def student_tokenizer(config: StudentConfig, teacher_dir: str):
    """The tokenizer the student reads: --student-tokenizer, else a --student folder's own (a folder of weights
    without tokenizer files takes the teacher's), else the teacher's."""
    from transformers import AutoTokenizer

    if config.student_tokenizer:
        return load_tokenizer(config.student_tokenizer)
    if config.student:
        try:
            return AutoTokenizer.from_pretrained(config.student)
        except Exception:
            pass
    return load_tokenizer(teacher_dir)


def _special_ids(teacher_dir: str, tokenizer) -> dict:
    """bos/eos/pad ids of a new student: the teacher config's, or with another tokenizer (given) that tokenizer's."""
    from transformers import AutoConfig

    if tokenizer is None:
        teacher_config = AutoConfig.from_pretrained(teacher_dir)
        return {key: getattr(teacher_config, key, None) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {
        "bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _from_config_file(path: str, special_ids: dict, rows: int):
    """A new model from a transformers config JSON (any causal LM: the "custom decoder" case). Keys it leaves out take
    `rows` (vocab_size) and the student tokenizer's special token ids."""
    student_config, given = config_from_json(path, f"--student-config {path}")
    if "vocab_size" not in given:
        student_config.vocab_size = rows
    for key, value in special_ids.items():
        if key not in given:
            setattr(student_config, key, value)
    return new_causal_lm(student_config, f"--student-config {path}")


def _new_llama(config: StudentConfig, teacher_dir: str, rows: int, special_ids: dict):
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
        **special_ids,
        rope_theta=10000.0,
    )
    return LlamaForCausalLM(student_config)


def build_student(
    config: StudentConfig,
    teacher_dir: str,
    vocab_size: int,
    seed: int,
    seq_len: int | None = None,
    tokenizer=None,
    teacher_rows: np.ndarray | None = None,
):
    """The student in float32: its logits cover at least its tokenizer's `vocab_size` ids (the bound of every id in
    its rows). seq_len: a student whose context is shorter (GPT-2's learned positions end there) is refused.
    A cross-tokenizer student passes its tokenizer (a new one's special token ids) and teacher_rows (student id ->
    teacher id with the same bytes, or -1: where its embeddings start from the teacher's)."""
    torch.manual_seed(seed)
    if config.student:
        model = load_causal_lm(config.student)
    elif config.student_init == "teacher-layers":
        if tokenizer is not None:
            raise PipelineError(
                "--student-init teacher-layers copies the teacher's embeddings, which index the teacher's tokenizer; "
                "with another tokenizer use --student-init teacher-embeddings or random"
            )
        model = _teacher_layers(teacher_dir, config.n_layer, student_rows(vocab_size))
    else:
        special_ids = _special_ids(teacher_dir, tokenizer)
        if config.student_config:
            model = _from_config_file(config.student_config, special_ids, student_rows(vocab_size))
        else:
            model = _new_llama(config, teacher_dir, student_rows(vocab_size), special_ids)
        if config.student_init == "teacher-embeddings":
            _start_embeddings_from_teacher(model, teacher_dir, vocab_size, teacher_rows)
    rows = logit_width(model)
    if rows < vocab_size:
        raise PipelineError(
            f"the student's output head has {rows} rows, fewer than the tokenizer's {vocab_size} tokens, so it cannot "
            f"predict every token id; give it at least {vocab_size} rows (vocab_size)"
        )
    context = getattr(model.config, "max_position_embeddings", None)
    if seq_len and context and seq_len > context:
        raise PipelineError(
            f"--seq-len {seq_len} is longer than the student's context ({context} positions); lower SEQ_LEN or give "
            "the student more positions (max_position_embeddings / n_positions)"
        )
    return model.float()

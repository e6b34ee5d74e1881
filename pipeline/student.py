"""The student: a new small Llama decoder, a shallow copy of the teacher (DistilBERT/DistilGPT2 recipe),
or an existing Hugging Face causal LM that shares the teacher's tokenizer."""

from __future__ import annotations

import copy

import torch

from pipeline.config import StudentConfig
from pipeline.errors import PipelineError


def teacher_layer_indices(teacher_layers: int, student_layers: int) -> list[int]:
    """Every n-th teacher block, n = teacher_layers // student_layers, starting at block 0."""
    if student_layers > teacher_layers:
        raise PipelineError(f"--n-layer {student_layers} is more than the teacher's {teacher_layers} blocks")
    stride = teacher_layers // student_layers
    return [i * stride for i in range(student_layers)]


def build_student(config: StudentConfig, teacher_dir: str, vocab_size: int, seed: int):
    """Returns a LlamaForCausalLM-like model in float32 whose vocabulary is `vocab_size`."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if config.student:
        try:
            model = AutoModelForCausalLM.from_pretrained(config.student, dtype=torch.float32)
        except Exception as exc:
            raise PipelineError(
                f"could not load the student {config.student} ({type(exc).__name__}); pass a causal LM folder or hub id"
            ) from exc
    elif config.student_init == "teacher-layers":
        teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        keep = teacher_layer_indices(teacher.config.num_hidden_layers, config.n_layer)
        student_config = copy.deepcopy(teacher.config)
        student_config.num_hidden_layers = len(keep)
        if hasattr(student_config, "layer_types") and student_config.layer_types:
            student_config.layer_types = [student_config.layer_types[i] for i in keep]
        model = type(teacher)(student_config)
        state = teacher.state_dict()
        for new_index, old_index in enumerate(keep):  # block new_index <- teacher block old_index
            prefix_new, prefix_old = f"model.layers.{new_index}.", f"model.layers.{old_index}."
            for key, value in state.items():
                if key.startswith(prefix_old):
                    state_key = prefix_new + key[len(prefix_old) :]
                    model.state_dict()[state_key].copy_(value)
        model.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        model.model.norm.load_state_dict(teacher.model.norm.state_dict())
        if not student_config.tie_word_embeddings:
            model.lm_head.load_state_dict(teacher.lm_head.state_dict())
        del teacher
    else:
        teacher_config = AutoConfig.from_pretrained(teacher_dir)
        student_config = LlamaConfig(
            vocab_size=vocab_size,
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
        model = LlamaForCausalLM(student_config)
    model_vocab = model.get_input_embeddings().weight.shape[0]
    if model_vocab != vocab_size:
        raise PipelineError(
            f"the student's vocabulary ({model_vocab}) differs from the cache's ({vocab_size}); the student must share "
            "the teacher's tokenizer"
        )
    return model.float()

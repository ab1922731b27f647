"""A tiny random-weight Llama with a locally trained tokenizer, for tests and demos.

No model can be downloaded on the CI and demo hosts, so tests, examples and benchmarks
build one here: seeded random weights (``transformers``) plus a byte-level BPE tokenizer
trained on a seeded synthetic corpus (``tokenizers``). The result is a normal Hugging
Face model directory that ``vllm`` serves with ``--model DIR``.

    python -m lmcache_pd.integration.vllm.tiny_model DIR [--hidden 1024 --layers 8]

The default shape (hidden 128, 2 layers, 4 heads, 2 KV heads, head size 32, fp32 KV:
1 KiB per token) matches ``lmcache_pd.layout.PRESETS["tiny"]`` except the model name.
The weights are scaled up from the usual 0.02 init so that greedy decoding has clear
logit margins: identical-token comparisons then test the KV, not rounding noise.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

MARKER = "lmcache_pd_tiny.json"
# a plain chat template so /v1/chat/completions works (role: content lines)
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)

_WORDS = (
    "the a of to and in is it that for on with as was at by be this from or have an "
    "are not but had his they you which one were all her she there would their we him "
    "been has when who will more no if out so said what up its about into than them can "
    "only other new some could time these two may then do first any my now such like our "
    "over man me even most made after also did many before must through back years where "
    "much your way well down should because each just those people how too little state "
    "good very make world still own see men work long get here between both life being "
    "under never day same another know while last might us great old year off come since "
    "against go came right used take three cache token prefill decode chunk layer tensor "
    "engine request block page transfer latency throughput memory disk host device"
).split()


@dataclass(frozen=True)
class TinySpec:
    """Shape of the generated model."""

    hidden: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_size: int = 32
    intermediate: int = 256
    vocab: int = 512
    max_positions: int = 4096
    seed: int = 0
    init_range: float = 0.2

    def __post_init__(self) -> None:
        if self.heads * self.head_size != self.hidden:
            raise ValueError(
                f"heads * head_size must equal hidden ({self.heads}*{self.head_size} "
                f"!= {self.hidden})"
            )
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads")
        if self.vocab < 300:
            raise ValueError("vocab must be >= 300 (256 byte symbols + merges + specials)")


def corpus(seed: int, sentences: int = 4000) -> list[str]:
    """A seeded synthetic English-like corpus (tokenizer training and test prompts)."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        n = rng.randint(4, 16)
        words = [rng.choice(_WORDS) for _ in range(n)]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    return out


def _train_tokenizer(spec: TinySpec, out: Path) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|bos|>", "<|eos|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(spec.seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=spec.max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return tok.get_vocab_size()


def make_tiny_model(directory: str | Path, spec: TinySpec | None = None) -> Path:
    """Create (or reuse) a tiny random Llama in ``directory``; returns the directory.

    A directory that already holds a model built from the same ``spec`` is reused.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    spec = spec or TinySpec()
    out = Path(directory)
    marker = out / MARKER
    if marker.exists() and json.loads(marker.read_text()) == asdict(spec):
        return out
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_tokenizer(spec, out)
    bos = 0
    eos = 1
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_size,
        max_position_embeddings=spec.max_positions,
        initializer_range=spec.init_range,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    marker.write_text(json.dumps(asdict(spec)))
    return out


def prompts(count: int, seed: int = 1, min_words: int = 3, max_words: int = 200) -> list[str]:
    """``count`` seeded prompts of varied lengths built from the corpus vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(min_words, max_words)
        out.append(" ".join(rng.choice(_WORDS) for _ in range(n)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory")
    defaults = TinySpec()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    directory = args.pop("directory")
    spec = TinySpec(**args)
    path = make_tiny_model(directory, spec)
    print(path)


if __name__ == "__main__":
    main()

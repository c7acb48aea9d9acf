"""A merged checkpoint as one GGUF file for llama.cpp and Ollama, with an Ollama ``Modelfile``.

Written with the ``gguf`` package (pure Python): the architecture keys, the tokenizer (a GPT-2
style byte-level BPE: tokens, token types, merges, special ids, the add-BOS flag, the
pre-tokenizer name llama.cpp splits text with) and the chat template the checkpoint was trained
with, then the weights, streamed one tensor at a time (F16, or Q8_0/Q4_0 with ``gguf.quants``;
one-dimensional tensors stay F32, as llama.cpp's converter keeps them).

The pre-tokenizer is named the way llama.cpp's converter names it: the tokenizer's ids for a fixed
text are hashed and looked up among the hashes of known tokenizers (``deepseek-r1-qwen`` for the
R1-Distill-Qwen tokenizer). A tokenizer that is not among them is refused, not written with a
guessed name (llama.cpp would then split text differently from training), except the tiny test
model this project builds, whose tokenizer is trained locally so that no hash can be known: when
``finetune_bot.json`` records it as ours and the tokenizer transformers loads for training splits
text with Qwen2's regex before byte-level BPE (it does: the config says qwen2), it is written as
``qwen2``, the llama.cpp pre-tokenizer with that regex.

The Modelfile's template is the shared prompt protocol rendered around the text: the checkpoint's
prompt frame (system prompt, text before and after the headline) and the chat template, so
``ollama run`` on a bare headline sends the model exactly the prompt it was trained on.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from core.errors import ConfigError, FinetuneError
from core.protocol import PromptFrame, render_prompt_text

log = logging.getLogger(__name__)

QUANTS = ("f16", "q8_0", "q4_0")
GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
# Hugging Face architectures the writer maps, with llama.cpp's name for each.
ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2"}

# llama.cpp's converter identifies a BPE pre-tokenizer by the sha256 of ``str(tokenizer.encode(
# CHECK_TEXT))`` (convert_hf_to_gguf.py, get_vocab_base_pre). The text and the hashes are data from
# that converter; only the Qwen2-family tokenizers the writer's architectures ship with are listed.
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not "
    "sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_TOKENIZERS = {
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B (the R1-Distill-Qwen tokenizer)
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    # Qwen/Qwen1.5-7B (Qwen1.5 and Qwen2)
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
}
TINY_KINDS = ("tiny-random", "tiny-pretrained")  # runner/tiny_model.py's finetune_bot.json

_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5
_MARKER = "\x00TEXT\x00"


class GgufRefused(FinetuneError):
    code = "gguf_refused"


def parse_quant(text: str | None) -> str:
    """The GGUF weight type asked for (default f16), checked.

    >>> parse_quant("Q8_0"), parse_quant(None)
    ('q8_0', 'f16')
    """
    quant = (text or "f16").lower()
    if quant not in QUANTS:
        message = f"quant={text} is not offered: use f16, q8_0 or q4_0"
        raise ConfigError(message, {"quant": message})
    return quant


def check_architecture(config: dict[str, Any]) -> str:
    """llama.cpp's name for the model's architecture; refused, naming it, when not mapped."""
    names = config.get("architectures") or [config.get("model_type", "unknown")]
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise GgufRefused(
        f"GGUF export supports {', '.join(ARCHITECTURES)} and this model is "
        f"{', '.join(map(str, names))}: export it as merged safetensors instead "
        "(`/finetune export <checkpoint>` without format=gguf)"
    )


def gguf_bytes(parameters: int, quant: str) -> int:
    """Bytes of the GGUF file for ``parameters`` weights at most (before the tokenizer): F16 two
    a weight, Q8_0 34 bytes a block of 32; Q4_0 (18 bytes a block, but its embeddings and LM head
    at Q8_0) is counted as Q8_0, an upper bound.

    >>> gguf_bytes(32, "f16"), gguf_bytes(32, "q8_0"), gguf_bytes(32, "q4_0")
    (64, 34, 34)
    """
    per_block = {"f16": 64, "q8_0": 34, "q4_0": 34}[quant]
    return parameters * per_block // 32


def pre_tokenizer_name(tokenizer: Any, model_dir: Path) -> str:
    """``tokenizer.ggml.pre`` for this tokenizer, chosen as llama.cpp's converter chooses it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest in KNOWN_PRE_TOKENIZERS:
        return KNOWN_PRE_TOKENIZERS[digest]
    if _is_tiny_with_qwen2_split(tokenizer, model_dir):
        return "qwen2"
    raise GgufRefused(
        f"the tokenizer of {model_dir} is not one GGUF export can identify (its check hash "
        f"{digest[:12]}… is not llama.cpp's for {' or '.join(KNOWN_PRE_TOKENIZERS.values())}): "
        "llama.cpp would split text differently from training, so it is not written; export "
        "merged safetensors instead"
    )


def _is_tiny_with_qwen2_split(tokenizer: Any, model_dir: Path) -> bool:
    """Our tiny test model (recorded as such when built), loaded as transformers loads it for
    training: Qwen2's split regex, then byte-level — what llama.cpp's ``qwen2`` does."""
    recorded = model_dir / "finetune_bot.json"
    if not recorded.exists() or json.loads(recorded.read_text()).get("kind") not in TINY_KINDS:
        return False
    return _split_regex(tokenizer) == split_regex("qwen2")


def _split_regex(tokenizer: Any) -> str | None:
    """The regex of a ``Sequence[Split(regex), ByteLevel(use_regex=False)]`` pre-tokenizer."""
    pre = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or [s.get("type") for s in steps] != ["Split", "ByteLevel"]:
        return None
    if steps[1].get("use_regex", True) or steps[0].get("behavior") != "Isolated":
        return None
    return steps[0].get("pattern", {}).get("Regex")


def split_regex(pre: str) -> str:
    """The regex llama.cpp splits text with for the pre-tokenizer names the writer uses."""
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    if pre not in KNOWN_PRE_TOKENIZERS.values():
        raise GgufRefused(f"no split regex is known here for tokenizer.ggml.pre={pre}")
    return str(PRETOKENIZE_REGEX)


@dataclass
class Vocabulary:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool


def read_vocabulary(tokenizer: Any, model_dir: Path, vocab_size: int) -> Vocabulary:
    """Every id up to the config's vocabulary size: the tokenizer's tokens, padded with unused
    ones; added tokens marked control (special, or spelled ``<｜…｜>``/``<|…|>``) or user-defined."""
    if tokenizer.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise GgufRefused("GGUF export writes byte-level BPE tokenizers only")
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(_TOKEN_UNUSED)
        elif i in added:
            tokens.append(token)
            looks_special = token[:2] in ("<｜", "<|") and token[-2:] in ("｜>", "|>")
            types.append(
                _TOKEN_CONTROL if added[i].special or looks_special else _TOKEN_USER_DEFINED
            )
        else:
            tokens.append(token)
            types.append(_TOKEN_NORMAL)
    return Vocabulary(
        tokens, types, pre_tokenizer_name(tokenizer, model_dir), tokenizer_adds_bos(tokenizer)
    )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts BOS before a text by itself (``tokenizer.ggml.add_bos_token``)."""
    probe = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id]


def tensor_type(name: str, shape: Sequence[int], quant: str) -> Any:
    """The GGML type a tensor is written as: 1-D tensors F32; for Q4_0 the token embeddings and
    the LM head Q8_0 (llama.cpp's quantizer, too, keeps the output layer at higher precision)."""
    from gguf import GGMLQuantizationType as T

    if len(shape) == 1:
        return T.F32
    if quant == "f16":
        return T.F16
    if shape[-1] % 32:
        raise GgufRefused(f"{name}: rows of {shape[-1]} are not a multiple of the 32-block")
    if quant == "q4_0" and name in ("token_embd.weight", "output.weight"):
        return T.Q8_0
    return T.Q8_0 if quant == "q8_0" else T.Q4_0


def _file_type(quant: str) -> int:
    from gguf import LlamaFileType

    return {
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
    }[quant]


def _gguf_tensors(model: Any, arch: Any, n_layers: int) -> Iterator[tuple[str, Any]]:
    """(GGUF name, torch tensor) for every weight, in the model's order."""
    from gguf import get_tensor_name_map

    names = get_tensor_name_map(arch, n_layers)
    for hf_name, tensor in model.state_dict().items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GgufRefused(f"the GGUF writer does not map the weight {hf_name}")
        yield name, tensor


def write_gguf(
    model: Any,
    tokenizer: Any,
    model_dir: Path,
    out: Path,
    quant: str,
    *,
    name: str,
) -> dict[str, int]:
    """Write ``model`` (merged, in memory) and its tokenizer to ``out``; returns how many tensors
    of each GGML type were written."""
    import gguf
    import numpy as np
    import torch

    config = model.config
    arch_name = check_architecture({"architectures": [type(model).__name__]})
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    vocab = read_vocabulary(tokenizer, model_dir, config.vocab_size)
    writer = gguf.GGUFWriter(out, arch_name)
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    special.add_special_token = {"bos": vocab.add_bos, "eos": False}
    special.chat_template = tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)

    # The tensor infos first (sizes from the shapes), then the data, one tensor at a time.
    counts: dict[str, int] = {}
    layout = []
    for gguf_name, tensor in _gguf_tensors(model, arch, config.num_hidden_layers):
        shape = tuple(tensor.shape)
        kind = tensor_type(gguf_name, shape, quant)
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, kind)))
        writer.add_tensor_info(gguf_name, shape, np.dtype(np.float32), nbytes, raw_dtype=kind)
        layout.append((gguf_name, kind))
        counts[kind.name] = counts.get(kind.name, 0) + 1
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    try:
        for (gguf_name, kind), (again, tensor) in zip(
            layout, _gguf_tensors(model, arch, config.num_hidden_layers), strict=True
        ):
            assert gguf_name == again
            array = tensor.detach().to(torch.float32).cpu().numpy()
            writer.write_tensor_data(gguf.quants.quantize(array, kind))
    finally:
        writer.close()
    return counts


# Reading the file back ---------------------------------------------------------------------


def tokenizer_from_gguf(path: Path) -> Any:
    """The tokenizer a GGUF file describes, read as llama.cpp reads it: byte-level BPE from the
    tokens and merges, text split by the ``tokenizer.ggml.pre`` regex, control and user-defined
    tokens matched whole at their ids, the BOS flag and the chat template from the file.

    (transformers' own GGUF tokenizer respells tokens outside the byte alphabet, so DeepSeek's
    ``<｜User｜>``-style control tokens lose their ids there; the weights it reads are fine.)"""
    from gguf import GGUFReader
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    fields = GGUFReader(path).fields

    def field(key: str) -> Any:
        return fields[key].contents() if key in fields else None

    tokens: list[str] = field("tokenizer.ggml.tokens")
    types: list[int] = field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ")) for m in field("tokenizer.ggml.merges")]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_regex(field("tokenizer.ggml.pre"))), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_tokens(
        [
            AddedToken(t, special=k == _TOKEN_CONTROL, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        ]
    )

    def token(key: str) -> str | None:
        found = field(f"tokenizer.ggml.{key}_token_id")
        return tokens[found] if found is not None else None

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
    )
    tokenizer.chat_template = field("tokenizer.chat_template")
    return tokenizer


def llama_cpp_answers(path: Path, prompts: Sequence[list[int]], max_new: int) -> list[str]:
    """Greedy answers from llama.cpp itself (``llama-cpp-python``, where it is installed)."""
    from llama_cpp import Llama

    longest = max((len(p) for p in prompts), default=0)
    llm = Llama(model_path=str(path), n_ctx=longest + max_new + 8, verbose=False, seed=0)
    try:
        return [
            llm.create_completion(prompt=list(p), max_tokens=max_new, temperature=0.0)["choices"][
                0
            ]["text"]
            for p in prompts
        ]
    finally:
        llm.close()


# The Modelfile -------------------------------------------------------------------------------


def modelfile_template(tokenizer: Any, frame: PromptFrame, add_bos: bool) -> str:
    """The Ollama template: the prompt the protocol renders for a text, with ``{{ .Prompt }}``
    where the text goes. A leading BOS is left to the runtime when the GGUF says to add one."""
    text = render_prompt_text(tokenizer, frame.conversation(_MARKER))
    if text.count(_MARKER) != 1:
        raise GgufRefused("the chat template does not render the text exactly once")
    if add_bos and tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        text = text[len(tokenizer.bos_token) :]
    before, after = text.split(_MARKER)
    return _go_literal(before) + "{{ .Prompt }}" + _go_literal(after)


def _go_literal(text: str) -> str:
    """Constant text inside a Go template: ``{{`` would open an action, so it is quoted."""
    return text.replace("{{", '{{ "{{" }}')


def render_modelfile(
    tokenizer: Any, frame: PromptFrame, *, add_bos: bool, max_new_tokens: int, num_ctx: int
) -> str:
    stops = [t for t in (tokenizer.eos_token, tokenizer.pad_token) if t]
    template = modelfile_template(tokenizer, frame, add_bos)
    if '"""' in template:
        raise GgufRefused('the prompt contains """, which a Modelfile cannot quote')
    lines = [
        f"FROM ./{GGUF_FILE}",
        f'TEMPLATE """{template}"""',
        *(f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in dict.fromkeys(stops)),
        "PARAMETER temperature 0",
        f"PARAMETER num_predict {max_new_tokens}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


def prompt_from_modelfile(modelfile: str, text: str) -> str:
    """The prompt text Ollama sends the model for ``text``: the template with the text in its
    one slot (the template has no other action; the BOS flag is the GGUF's)."""
    start = modelfile.index('TEMPLATE """') + len('TEMPLATE """')
    template = modelfile[start : modelfile.index('"""', start)]
    values = {"{{ .Prompt }}": text, '{{ "{{" }}': "{{"}

    def value(action: re.Match[str]) -> str:
        if action.group(0) not in values:
            raise ValueError(f"the template has an action other than the prompt: {action[0]}")
        return values[action.group(0)]

    return re.sub(r"\{\{.*?\}\}", value, template)


def export_readme(checkpoint_id: int, quant: str, size_bytes: int) -> str:
    name = f"finetune-checkpoint-{checkpoint_id}"
    return (
        f"# Checkpoint {checkpoint_id} as GGUF ({quant.upper()}, {size_bytes / 1e9:.2f} GB)\n\n"
        "Ollama, from this folder:\n\n"
        f"    ollama create {name} -f Modelfile\n"
        f'    ollama run {name} "a headline to classify"\n\n'
        "The Modelfile's template wraps the text in the prompt the model was trained on; send "
        "the bare text. llama.cpp:\n\n"
        f"    llama-cli -m {GGUF_FILE} --jinja -cnv --temp 0\n\n"
        "meta.json says how this export answered the eval prompts against base + adapter.\n"
    )

"""The tiny model loads with transformers and with vLLM, and both decode it the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from core.protocol import Message, render_prompt
from tests.conftest import REPO


def test_loads_with_transformers_and_generates(tiny_model_dir: Path, tokenizer) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size >= len(tokenizer)
    ids = render_prompt(tokenizer, [Message("user", "标题：股市今日大涨")])
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, len(ids) + 5)


def test_tokenizer_handles_chinese_and_keeps_think_tags(tokenizer) -> None:
    headline = "北部在售1居小户型推荐 海淀板楼54平米70万起"
    ids = tokenizer(headline, add_special_tokens=False)["input_ids"]
    assert len(ids) < len(headline)  # learned merges, not one token per byte
    assert tokenizer.decode(ids) == headline
    think = tokenizer("<think>\n想\n</think>", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(think[0]) == "<think>"
    assert "<think>" in tokenizer.decode(think, skip_special_tokens=True)


def test_chat_template_is_deepseek_r1_distill_style(tokenizer) -> None:
    text = tokenizer.apply_chat_template(
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"},
            {"role": "user", "content": "Q2"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text == (
        "<｜begin▁of▁sentence｜>S<｜User｜>Q<｜Assistant｜>A<｜end▁of▁sentence｜>"
        "<｜User｜>Q2<｜Assistant｜>"
    )


def test_refuses_to_overwrite_a_model(tiny_model_dir: Path) -> None:
    from runner.tiny_model import build_tiny_model

    with pytest.raises(FileExistsError):
        build_tiny_model(tiny_model_dir)


VLLM_SCRIPT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from vllm import LLM, SamplingParams
model_dir, ids = sys.argv[1], json.loads(sys.argv[2])
llm = LLM(model=model_dir, dtype="float32", max_model_len=512, enforce_eager=True,
          kv_cache_memory_bytes=64 << 20)
params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
vllm_ids = list(llm.generate([{"prompt_token_ids": ids}], params)[0].outputs[0].token_ids)
hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
hf_ids = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12,
                     do_sample=False)[0, len(ids):].tolist()
print("RESULT " + json.dumps({"vllm": vllm_ids, "hf": hf_ids}))
"""


@pytest.mark.slow
def test_loads_with_vllm_and_decodes_as_transformers_does(tiny_model_dir: Path, tokenizer) -> None:
    ids = render_prompt(tokenizer, [Message("user", "标题：球队夺得冠军")])
    env = {
        **os.environ,
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", VLLM_SCRIPT, str(tiny_model_dir), json.dumps(ids)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, result.stderr[-3000:]
    decoded = json.loads(lines[0][len("RESULT ") :])
    assert len(decoded["vllm"]) == 12
    assert decoded["vllm"] == decoded["hf"]

"""Generation engines behind the API. ``VllmEngine`` wraps vLLM's ``AsyncLLM`` with LoRA enabled,
its arguments from ``runner.vllm_args`` (the factory evaluation and export use too);
``TransformersEngine`` is a fallback for machines where vLLM cannot be installed (logged loudly).

Adapters are only ever added through ``add_adapter`` (a bad adapter is refused there and the engine
stays up; reaching one through a request would kill vLLM's engine) and always under a new id and a
folder that is never modified (vLLM keeps the old weights when an id is reused).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from core.errors import FinetuneError
from core.protocol import THINK_CLOSE
from core.settings import Settings

log = logging.getLogger(__name__)


class AdapterRefused(FinetuneError):
    code = "adapter_refused"


@dataclass(frozen=True)
class Completion:
    text: str
    finished: bool
    prompt_tokens: int
    completion_tokens: int


class Engine(Protocol):
    backend: str

    async def generate(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion: ...

    def stream(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> AsyncIterator[str]: ...

    async def reason(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion:
        """Greedy generation that stops after ``</think>`` (``finished``: it closed)."""
        ...

    async def read(
        self, requests: list[tuple[list[int], list[int]]], *, lora_id: int | None
    ) -> list[dict[int, float]]:
        """For each (token ids, candidates): the candidates' log-probabilities as next token."""
        ...

    async def add_adapter(self, lora_id: int, name: str, path: Path) -> None: ...

    async def remove_adapter(self, lora_id: int) -> None: ...

    async def shutdown(self) -> None: ...


class VllmEngine:
    backend = "vllm"

    def __init__(self, settings: Settings, model_dir: Path) -> None:
        import torch

        from runner.vllm_args import Purpose, prepare_environment, vllm_engine_args

        on_gpu = torch.cuda.is_available()
        prepare_environment(Purpose.serving, on_gpu=on_gpu)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine_args = vllm_engine_args(Purpose.serving, settings, model_dir, on_gpu=on_gpu)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        self._requests: dict[int, Any] = {}

    def _params(self, max_tokens: int) -> Any:
        from vllm import SamplingParams

        return SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=True)

    def _lora(self, lora_id: int | None) -> Any:
        return self._requests.get(lora_id) if lora_id is not None else None

    async def generate(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion:
        final = None
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt_ids},
            self._params(max_tokens),
            uuid.uuid4().hex,
            lora_request=self._lora(lora_id),
        ):
            final = output
        assert final is not None
        out = final.outputs[0]
        return Completion(
            out.text, out.finish_reason == "stop", len(prompt_ids), len(out.token_ids)
        )

    async def reason(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion:
        from vllm import SamplingParams

        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            skip_special_tokens=True,
            stop=[THINK_CLOSE],
            include_stop_str_in_output=True,
        )
        final = None
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt_ids},
            params,
            uuid.uuid4().hex,
            lora_request=self._lora(lora_id),
        ):
            final = output
        assert final is not None
        out = final.outputs[0]
        return Completion(out.text, THINK_CLOSE in out.text, len(prompt_ids), len(out.token_ids))

    async def read(
        self, requests: list[tuple[list[int], list[int]]], *, lora_id: int | None
    ) -> list[dict[int, float]]:
        from vllm import SamplingParams

        from runner.eval.predict import vllm_read

        async def one(ids: list[int], candidates: list[int]) -> dict[int, float]:
            params = SamplingParams(
                temperature=0.0, max_tokens=1, logprob_token_ids=list(candidates)
            )
            final = None
            async for output in self.engine.generate(
                {"prompt_token_ids": ids},
                params,
                uuid.uuid4().hex,
                lora_request=self._lora(lora_id),
            ):
                final = output
            assert final is not None
            return vllm_read(final, candidates)

        return list(await asyncio.gather(*(one(ids, c) for ids, c in requests)))

    async def stream(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> AsyncIterator[str]:
        sent = 0
        async for output in self.engine.generate(
            {"prompt_token_ids": prompt_ids},
            self._params(max_tokens),
            uuid.uuid4().hex,
            lora_request=self._lora(lora_id),
        ):
            text = output.outputs[0].text
            if len(text) > sent:
                yield text[sent:]
                sent = len(text)

    async def add_adapter(self, lora_id: int, name: str, path: Path) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, lora_id, str(path))
        try:
            added = await self.engine.add_lora(request)
        except Exception as exc:  # vLLM refuses cleanly here and stays up
            raise AdapterRefused(f"vLLM refused adapter {name}: {exc}") from exc
        if not added:
            raise AdapterRefused(f"vLLM did not load adapter {name}")
        self._requests[lora_id] = request

    async def remove_adapter(self, lora_id: int) -> None:
        if self._requests.pop(lora_id, None) is not None:
            await self.engine.remove_lora(lora_id)

    async def shutdown(self) -> None:
        self.engine.shutdown()


class TransformersEngine:
    """One model with PEFT adapters, one request at a time in a worker thread. Slow: only for
    machines where vLLM cannot be installed."""

    backend = "transformers"

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.warning(
            "SERVING WITH THE TRANSFORMERS FALLBACK (vLLM is not installed, or "
            "SERVING_BACKEND=transformers): requests run one at a time; install the `cpu` "
            "or `gpu` extra and use vLLM in production."
        )
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
        self.model: Any = loaded.to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self._names: dict[int, str] = {}
        self._lock = asyncio.Lock()

    @property
    def _pad(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def _use(self, lora_id: int | None) -> Any:
        if lora_id is None:
            return self.model.disable_adapter() if self._names else nullcontext()
        self.model.set_adapter(self._names[lora_id])
        return nullcontext()

    def _generate_sync(
        self, prompt_ids: list[int], max_tokens: int, lora_id: int | None, *, reason: bool = False
    ) -> Completion:
        import torch

        from runner.eval.predict import generate_batched

        close = self.tokenizer.convert_tokens_to_ids(THINK_CLOSE) if reason else None
        stops = [close] if isinstance(close, int) and close != self.tokenizer.unk_token_id else []
        with self._use(lora_id), torch.no_grad():
            [(new, finished)] = generate_batched(
                self.model,
                [prompt_ids],
                max_tokens,
                eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self._pad,
                batch_size=1,
                device=self.device,
                stop_token_ids=stops,
            )
        text = str(self.tokenizer.decode(new, skip_special_tokens=True))
        if not finished:
            text = text.rstrip("\ufffd")
        if reason:
            at = text.find(THINK_CLOSE)
            text = text[: at + len(THINK_CLOSE)] if at >= 0 else text
            finished = at >= 0
        return Completion(text, finished, len(prompt_ids), len(new))

    def _read_sync(
        self, requests: list[tuple[list[int], list[int]]], lora_id: int | None
    ) -> list[dict[int, float]]:
        from runner.eval.predict import next_token_logprobs

        with self._use(lora_id):
            return next_token_logprobs(
                self.model, requests, pad_token_id=self._pad, batch_size=16, device=self.device
            )

    async def reason(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(
                self._generate_sync, prompt_ids, max_tokens, lora_id, reason=True
            )

    async def read(
        self, requests: list[tuple[list[int], list[int]]], *, lora_id: int | None
    ) -> list[dict[int, float]]:
        async with self._lock:
            return await asyncio.to_thread(self._read_sync, requests, lora_id)

    async def generate(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> Completion:
        async with self._lock:
            return await asyncio.to_thread(self._generate_sync, prompt_ids, max_tokens, lora_id)

    async def stream(
        self, prompt_ids: list[int], *, max_tokens: int, lora_id: int | None
    ) -> AsyncIterator[str]:
        completion = await self.generate(prompt_ids, max_tokens=max_tokens, lora_id=lora_id)
        yield completion.text

    async def add_adapter(self, lora_id: int, name: str, path: Path) -> None:
        from peft import PeftModel

        async with self._lock:
            try:
                if not self._names:
                    self.model = PeftModel.from_pretrained(self.model, str(path), adapter_name=name)
                else:
                    self.model.load_adapter(str(path), adapter_name=name)
            except Exception as exc:
                raise AdapterRefused(f"could not load adapter {name}: {exc}") from exc
            self._names[lora_id] = name

    async def remove_adapter(self, lora_id: int) -> None:
        async with self._lock:
            name = self._names.pop(lora_id, None)
            if name is not None and len(self._names) >= 1:
                self.model.delete_adapter(name)
            elif name is not None:
                self._names[lora_id] = name  # PEFT cannot drop its last adapter; keep it idle

    async def shutdown(self) -> None:
        return None


def build_engine(settings: Settings, model_dir: Path) -> Engine:
    """``SERVING_BACKEND``: auto (vLLM when installed), vllm or transformers."""
    import importlib.util

    backend = settings.serving_backend
    if backend == "vllm" or (backend == "auto" and importlib.util.find_spec("vllm")):
        return VllmEngine(settings, model_dir)
    return TransformersEngine(model_dir)

# One image for the bot, the runner and serving on a CUDA host (docker-compose.yml picks the
# command). vLLM's own image brings CUDA, PyTorch and vLLM; the package adds the rest (`gpu` extra).
# The tag is the `gpu` extra's vLLM release, whose torch (2.13) has the varlen attention kernel
# the CUDA-graphed trainer needs (tests/test_deploy.py holds tag, extras and code together).
FROM vllm/vllm-openai:v0.32.0

WORKDIR /app
ENV PYTHONUNBUFFERED=1 \
    LOG_FORMAT=json \
    HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1

COPY pyproject.toml README.md manifest.yml ./
COPY core core
COPY storage storage
COPY runner runner
COPY serving serving
COPY bot bot
COPY stack stack
COPY examples examples
# The image's own torch, vLLM, transformers and Triton must satisfy the `gpu` extra's pins: the
# constraints file holds pip to exactly those builds (it installs the rest around them and never
# swaps the image's CUDA torch for another build), and a mismatch fails the build here. The last
# line refuses a torch without the varlen attention kernel.
RUN python3 -c "from importlib.metadata import version; print('\n'.join(f'{p}=={version(p)}' for p in ('torch', 'vllm', 'transformers', 'triton')))" > /tmp/image-stack.txt \
    && python3 -m pip install --no-cache-dir -c /tmp/image-stack.txt ".[gpu]" \
    && python3 -c "import torch; from runner.train import attention as a; assert a.torch_has_varlen_kernel() and a.torch_release(torch.__version__) >= a.MIN_TORCH_VARLEN, torch.__version__"

# Every service runs as an unprivileged user; ARTIFACT_DIR is a volume it owns.
RUN useradd --create-home --uid 10001 finetune \
    && mkdir -p /var/lib/finetune-bot/artifacts \
    && chown -R finetune /var/lib/finetune-bot
USER finetune
ENTRYPOINT []
CMD ["python", "-m", "bot", "--http", "--host", "0.0.0.0", "--port", "3000"]

# One image for the bot, the runner and serving on a CUDA host (docker-compose.yml picks the
# command). vLLM's own image brings CUDA, PyTorch and vLLM; the package adds the rest (`gpu` extra).
FROM vllm/vllm-openai:v0.11.0

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
RUN pip install --no-cache-dir ".[gpu]"

# Every service runs as an unprivileged user; ARTIFACT_DIR is a volume it owns.
RUN useradd --create-home --uid 10001 finetune \
    && mkdir -p /var/lib/finetune-bot/artifacts \
    && chown -R finetune /var/lib/finetune-bot
USER finetune
ENTRYPOINT []
CMD ["python", "-m", "bot", "--http", "--host", "0.0.0.0", "--port", "3000"]

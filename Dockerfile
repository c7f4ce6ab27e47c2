# One image for the engine and the bots. The default torch wheel from PyPI is CUDA-capable: with the NVIDIA
# container toolkit (`docker run --gpus all`) the engine uses the GPU, without it the CPU.
FROM python:3.11-slim

RUN useradd --create-home --uid 1000 stylebot
WORKDIR /app
COPY pyproject.toml README.md config.toml ./
COPY bot ./bot
COPY engine ./engine
COPY adapters ./adapters
COPY storage ./storage
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 .
USER stylebot
ENV STYLEBOT_CONFIG=/app/config.toml
# Weights (and open_clip's cache) live in a volume so they survive new images; docker-compose.yml mounts one.
RUN mkdir -p /home/stylebot/.cache
VOLUME ["/home/stylebot/.cache"]
ENTRYPOINT ["stylebot"]
CMD ["--help"]

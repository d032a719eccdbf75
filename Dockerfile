# syntax=docker/dockerfile:1
# boxteacher images, one Dockerfile, three targets:
#   docker build --target serve       -t boxteacher:serve .        # the HTTP API (port 8000)
#   docker build --target labelstudio -t boxteacher:labelstudio .  # the Label Studio ML backend (port 9090)
#   docker build --target train       -t boxteacher:train .        # training / eval / export jobs
# torch comes from PyPI by default (CUDA build; runs on CPU too). A smaller CPU-only image:
#   --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# A GPU API with ONNX Runtime CUDA/TensorRT and TensorRT engines:
#   --build-arg SERVE_EXTRAS=serve,gpu,tensorrt
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN groupadd --system --gid 10001 boxteacher \
 && useradd --system --uid 10001 --gid boxteacher --create-home --home-dir /home/boxteacher boxteacher \
 && mkdir -p /app /data \
 && chown 10001:10001 /app /data
WORKDIR /app

# ---- build: the package and its extras in a virtual environment -------------------------------
FROM base AS source
RUN python -m venv /opt/venv
COPY pyproject.toml README.md ./
COPY training/ training/
COPY export/ export/
COPY serving/ serving/
COPY labelstudio_backend/ labelstudio_backend/

FROM source AS build-train
ARG PIP_EXTRA_INDEX_URL=""
ARG TRAIN_EXTRAS=export
RUN pip install "./[${TRAIN_EXTRAS}]"

FROM source AS build-serve
ARG PIP_EXTRA_INDEX_URL=""
ARG SERVE_EXTRAS=serve,export
RUN pip install "./[${SERVE_EXTRAS}]"

FROM source AS build-labelstudio
ARG PIP_EXTRA_INDEX_URL=""
ARG LABELSTUDIO_EXTRAS=labelstudio,serve,export
RUN pip install "./[${LABELSTUDIO_EXTRAS}]"

# ---- train: boxteacher train / eval / export ... (mount data and outputs; /app is writable) --------
FROM base AS train
COPY --from=build-train /opt/venv /opt/venv
COPY --chown=10001:10001 configs/ /app/configs/
USER 10001:10001
ENTRYPOINT ["boxteacher"]
CMD ["--help"]

# ---- serve: the segmentation API; mount the model at /models/model.pth (or set BOXTEACHER_MODEL) ----
FROM base AS serve
COPY --from=build-serve /opt/venv /opt/venv
ENV BOXTEACHER_HOST=0.0.0.0 \
    BOXTEACHER_PORT=8000 \
    BOXTEACHER_MODEL=/models/model.pth
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 CMD ["python", "-m", "serving.healthcheck"]
ENTRYPOINT ["boxteacher", "serve"]

# ---- labelstudio: the Label Studio ML backend (fine-tuning data and checkpoints in /data) ------------
FROM base AS labelstudio
COPY --from=build-labelstudio /opt/venv /opt/venv
ENV MODEL_DIR=/data
USER 10001:10001
EXPOSE 9090
ENTRYPOINT ["boxteacher", "labelstudio"]
CMD ["--model", "/models/model.pth", "--host", "0.0.0.0", "--port", "9090", "--work-dir", "/data"]

# kvserve image. CPU by default:
#   docker build -t kvserve .
# CUDA (any CUDA runtime base; Python is installed if the base lacks it):
#   docker build -t kvserve:cuda --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
# Run (models mounted read-only; SIGTERM drains in-flight requests, so give `docker stop -t` room):
#   docker run -p 8000:8000 -v /path/to/models:/models:ro kvserve serve /models/X
ARG BASE=python:3.11-slim
FROM ${BASE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface PATH=/opt/venv/bin:$PATH
# gcc: kvserve builds its own CPU kernels (engine/kernels, ~1 s) at the first start of a container.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
        $(command -v python3 >/dev/null || echo python3 python3-venv) \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the index matching the base (CPU or CUDA wheels); it is the big, rarely changing layer.
RUN pip install --index-url ${TORCH_INDEX} "torch>=2.5"
COPY . /src
RUN pip install /src && rm -rf /src

RUN useradd --create-home kvserve && mkdir -p /cache/huggingface && chown kvserve /cache/huggingface
USER kvserve
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
ENTRYPOINT ["kvserve"]
CMD ["--help"]

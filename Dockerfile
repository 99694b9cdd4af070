# snakeclef on a GCP g2 VM (NVIDIA L4): CUDA runtime, Java for Spark, the
# package, and Luigi as the entry point.
#
#   docker build -t snakeclef .
#   docker run --gpus all -v /data:/data snakeclef Pipeline --local-scheduler \
#       --dataset /data/ph-snakes --backbone facebook/dinov2-base --output-root /data/run
#
# NOTE: never built here (the development machines have no Docker engine); the
# versions follow pyproject.toml.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# The CUDA build of the torch version that pyproject.toml pins (the CPU build
# is what the development machines install).
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128

WORKDIR /opt/snakeclef
COPY pyproject.toml README.md ./
COPY snakeclef ./snakeclef
COPY conf ./conf
COPY scripts ./scripts
RUN pip install -e .

ENTRYPOINT ["luigi", "--module", "snakeclef.workflow"]
CMD ["--help"]

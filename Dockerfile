# syntax=docker/dockerfile:1
# The image the KubeRay manifests in k8s/ run (head, workers, and the weights Job). No weights inside: they
# come from a PersistentVolumeClaim (k8s/weights). Build and push: see k8s/README.md.
#
# Base: the official Ray image for the pinned Ray (2.60.0), Python 3.11. The `-gpu` tag is Ray's alias for
# its default CUDA build; pin a `-cuXXX` tag instead (e.g. 2.60.0-py311-cu128) if your registry mirror
# needs an exact one. Ray's GPU images carry CUDA but no PyTorch: torch comes from `pip install .` below.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${RAY_IMAGE}

# ffmpeg/ffprobe: the Postprocessor muxes H.264 + AAC, and inputs are probed with ffprobe.
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ffmpeg \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/stable-avatar-serve

# Dependencies first, in their own layer, so a code change does not re-download torch (several GB). On Linux
# x86_64 the PyPI wheel of the pinned torch==2.13.0 is a CUDA build, which is what the GPU workers need;
# ray[serve]==2.60.0 is already in the base image and stays as it is.
COPY --chown=ray:users pyproject.toml README.md ./
RUN mkdir -p guarded_fetch pipeline deployments stable_avatar \
    && touch guarded_fetch/__init__.py pipeline/__init__.py deployments/__init__.py stable_avatar/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall -y stable-avatar-serve \
    && rm -rf build guarded_fetch pipeline deployments stable_avatar ./*.egg-info

# The project itself: the runtime packages only (the `stable-avatar` CLI and the `deployments.app:build_app`
# Serve application). Development tools (tools/, bench/, tests/) are not shipped.
COPY --chown=ray:users guarded_fetch ./guarded_fetch
COPY --chown=ray:users pipeline ./pipeline
COPY --chown=ray:users deployments ./deployments
COPY --chown=ray:users stable_avatar ./stable_avatar
RUN pip install --no-cache-dir --no-deps . && rm -rf build ./*.egg-info \
    && python -c "import deployments.app, stable_avatar.cli" \
    && ffmpeg -version >/dev/null

# HF_HUB_OFFLINE is not set here because the weights Job downloads with this image; the RayService sets it.
ENV HF_HUB_DISABLE_TELEMETRY=1

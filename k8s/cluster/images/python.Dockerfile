# The Python base for the project's Dockerfile when no registry can be
# reached: Debian bookworm's own python3 (3.11) with venv, on the local
# debootstrap base. `python` is python3, as in the official python images.
FROM bkv-base/debian:bookworm
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
CMD ["python3"]

"""Stage 5, ``image``: build images with the Docker engine (``engine``) on a base image
built from Debian's packages (``base``) or pulled by the engine."""

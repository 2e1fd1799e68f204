"""The podman runtime: the container runtime with podman as the engine.

Podman is the engine labs use where users may not join the `docker` group. It takes docker's CLI
arguments for everything cube uses (run, build, pull, save, load, stop), so all of the work is
ContainerRuntime's; what differs is decided from `podman info`:

- rootful (root runs podman): the container runs as the target user's uid:gid, as with docker;
- rootless (a user runs podman in their own user namespace): the container runs as its root,
  which IS that user outside, so outputs belong to them. `--userns=keep-id` would map the
  user's own uid instead, but then the image's files (owned by container root) are not the
  user's, and a debootstrap image's binaries could not be executed.

GPUs go through NVIDIA's CDI names (`--device nvidia.com/gpu=N`), since podman has no `--gpus`.
"""

from __future__ import annotations

from controller.runtimes.docker import ContainerRuntime


class PodmanRuntime(ContainerRuntime):
    name = "podman"
    engine = "podman"

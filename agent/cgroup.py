"""Container identity from the text of ``/proc/PID/cgroup``: pure parsing, no I/O.

Container runtimes name a container's cgroup after the container, and Kubernetes names the
pod's cgroup after the pod, so a process's cgroup path says which container and pod it runs
in without any cooperation from the workload. The shapes recognised:

* Docker: ``/docker/<64 hex>`` (cgroupfs driver, v1 or v2), ``docker-<64 hex>.scope``
  (systemd driver)
* containerd: ``cri-containerd-<64 hex>.scope`` and nerdctl's ``nerdctl-<64 hex>.scope``
  (systemd driver), a bare ``<64 hex>`` folder under ``/containerd/``, ``/k8s.io/``,
  ``/default/`` or a Kubernetes pod folder (cgroupfs driver), and the
  ``<pod slice>:cri-containerd:<64 hex>`` form containerd writes under its own service
* CRI-O: ``crio-<64 hex>.scope`` (``crio-<64 hex>`` with the cgroupfs driver);
  ``crio-conmon-<64 hex>.scope`` is the monitor process outside the container, so it names
  no container
* Podman: ``libpod-<64 hex>.scope`` (``libpod-conmon-…`` likewise is not the container)
* Kubernetes pod UID: ``kubepods-<qos>-pod<uid>.slice`` (systemd, dashes of the UID written
  as underscores) or ``/kubepods/<qos>/pod<uid>/`` (cgroupfs); static pods have a 32-hex UID

A bare 64-hex folder anywhere else is still taken for a container, its runtime unknown: no
systemd unit or user folder is named like that, and missing a container costs more than
naming one. Nested containers (a kind node is itself a Docker container) are resolved to the
innermost match: the container the process actually runs in.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX64 = r"[0-9a-f]{64}"
# A runtime's systemd scope for a container. The conmon scopes are excluded by the id shape:
# "crio-conmon-<id>" does not match "crio-<64 hex>.scope".
_SCOPE = re.compile(
    rf"^(docker|cri-containerd|containerd|crio|libpod|nerdctl)-({_HEX64})(?:\.scope)?$"
)
_BARE_ID = re.compile(rf"^{_HEX64}$")
# containerd's systemd form: "kubepods-burstable-pod<uid>.slice:cri-containerd:<id>".
_COLON_FORM = re.compile(rf"^.*:(cri-containerd|crio|docker):({_HEX64})$")
_POD = re.compile(
    r"(?:^|-)pod([0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
    r"|[0-9a-f]{32})(?:\.slice)?(?=$|:)"
)
# Parents under which a bare 64-hex folder is a container, and the runtime that makes them.
_BARE_PARENTS = {
    "docker": "docker",
    "moby": "docker",
    "containerd": "containerd",
    "k8s.io": "containerd",
    "default": "containerd",
}
_RUNTIME_OF_SCOPE = {
    "docker": "docker",
    "cri-containerd": "containerd",
    "containerd": "containerd",
    "crio": "cri-o",
    "libpod": "podman",
    "nerdctl": "containerd",
}


@dataclass(frozen=True, slots=True)
class ContainerIdentity:
    """The container and Kubernetes pod a process runs in; empty strings when none."""

    container_id: str = ""
    pod_uid: str = ""  # with dashes, as the Kubernetes API spells it
    runtime: str = ""  # "docker", "containerd", "cri-o", "podman"; "" when not known


NO_CONTAINER = ContainerIdentity()


def parse_cgroup(text: str) -> ContainerIdentity:
    """The container identity named by a ``/proc/PID/cgroup`` text (v1, v2 or hybrid).

    The unified (``0::``) line is preferred; v1 hierarchies follow in file order. Lines that
    are not ``id:controllers:path`` are ignored: the text may be truncated by a racing exit.
    """
    container = NO_CONTAINER
    pod_uid = ""
    for path in _paths_preferred_first(text):
        found = container_in_path(path)
        if not container.container_id and found.container_id:
            container = found
        if not pod_uid and found.pod_uid:
            pod_uid = found.pod_uid
    return ContainerIdentity(container.container_id, pod_uid, container.runtime)


def container_in_path(path: str) -> ContainerIdentity:
    """The innermost container and pod named by one cgroup path."""
    container_id = runtime = pod_uid = ""
    parts = [p for p in path.split("/") if p]
    in_kubepods = "kubepods" in path
    for i, part in enumerate(parts):
        parent = parts[i - 1] if i else ""
        found = _container_of(part, parent)
        if found is not None:
            container_id, runtime = found
        pod = _POD.search(part) if in_kubepods else None
        if pod:
            pod_uid = _canonical_uid(pod.group(1))
    return ContainerIdentity(container_id, pod_uid, runtime)


def _container_of(part: str, parent: str) -> tuple[str, str] | None:
    """(container id, runtime) when this path component names a container."""
    scope = _SCOPE.match(part)
    if scope:
        return scope.group(2), _RUNTIME_OF_SCOPE[scope.group(1)]
    colon = _COLON_FORM.match(part)
    if colon:
        return colon.group(2), _RUNTIME_OF_SCOPE[colon.group(1)]
    if _BARE_ID.match(part):
        # The kubelet's cgroupfs layout (pod folder / container id) does not name the runtime.
        return part, _BARE_PARENTS.get(parent, "")
    return None


def _canonical_uid(raw: str) -> str:
    """Pod UID as Kubernetes writes it: systemd slices replace its dashes with underscores."""
    return raw.replace("_", "-")


def _paths_preferred_first(text: str) -> list[str]:
    unified: list[str] = []
    legacy: list[str] = []
    for line in text.splitlines():
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        hierarchy, controllers, path = fields
        (unified if hierarchy == "0" and not controllers else legacy).append(path)
    return unified + legacy

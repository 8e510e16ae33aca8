"""Container identity from /proc/PID/cgroup, against real-looking samples of every runtime."""

from __future__ import annotations

import pytest

from creditmeter.agent.cgroup import ContainerIdentity, container_in_path, parse_cgroup

from .conftest import SAMPLES

A = "8e22a4d8a350f884206b4695b38772fa5f78d6aea6690047e11df847b78bba4a"
B = "ebbffa41c7549a36be83fb28094617e9c6d113fd5c52b0bcdcdb3c31aafc991c"
C = "7dc2621a15f926b10e89c83fa88029555e1dd5afff48697e84c6b8c69ed03ff8"
D = "774aece463545b277010d88fa51b5e4c275b8fa38bd408ca333369eff57428d9"
E = "f0d980ea5f95a5acfdded5d24d1e88a972721de45b936dfe514144ca9a5647ca"
F = "079428e1b2f45786f0e9bfc3a0edf7f75c31da372e831e01613364de8fb2532b"
G = "0cbff57a5f4951dad8435848b7cdea64644c8e88c0ba61b7411eb6d136ad2cb7"
H = "3fe9c204139f734ef96a49031236f5bb1a1593e0d727f9ae2c70de3347a1b274"
POD1 = "2f2a4fd4-fd09-478b-b563-59cd7648ac3d"
POD2 = "8ab7151c-f81a-4f62-ac57-8717ac2bce17"
POD3 = "1a4eca00-7969-4ae0-8b46-84c29dbcbef9"
POD4 = "2ba5f385-8472-48c8-9083-bd881cb76da1"
STATIC_POD = "2a098b5bb28d26958391edf9622a6e31"

NONE = ContainerIdentity()

# Every sample file, and what it must yield: written by hand, not derived from the parser.
EXPECTED = {
    "docker_v1_cgroupfs.txt": ContainerIdentity(A, "", "docker"),
    "docker_v1_systemd.txt": ContainerIdentity(B, "", "docker"),
    "docker_v2_systemd.txt": ContainerIdentity(C, "", "docker"),
    "docker_v2_cgroupfs.txt": ContainerIdentity(D, "", "docker"),
    "docker_v1_root_parent.txt": ContainerIdentity(E, "", ""),
    "k8s_containerd_systemd_v2.txt": ContainerIdentity(F, POD1, "containerd"),
    "k8s_containerd_guaranteed_v2.txt": ContainerIdentity(G, POD2, "containerd"),
    "k8s_containerd_cgroupfs_v1.txt": ContainerIdentity(H, POD3, ""),
    "k8s_containerd_colon_v1.txt": ContainerIdentity(A, POD4, "containerd"),
    "containerd_ctr_v2.txt": ContainerIdentity(B, "", "containerd"),
    "containerd_plain_v2.txt": ContainerIdentity(C, "", "containerd"),
    "nerdctl_systemd_v2.txt": ContainerIdentity(D, "", "containerd"),
    "k8s_crio_systemd_v2.txt": ContainerIdentity(E, POD1, "cri-o"),
    "k8s_crio_conmon_v2.txt": ContainerIdentity("", POD1, ""),  # conmon: not the container
    "k8s_crio_cgroupfs_v1.txt": ContainerIdentity(F, POD2, "cri-o"),
    "k8s_static_pod_v2.txt": ContainerIdentity(G, STATIC_POD, "containerd"),
    "k8s_pod_slice_only_v2.txt": ContainerIdentity("", POD2, ""),
    "podman_rootful_v2.txt": ContainerIdentity(H, "", "podman"),
    "podman_rootless_v2.txt": ContainerIdentity(A, "", "podman"),
    "podman_conmon_v2.txt": NONE,
    "kind_nested_v2.txt": ContainerIdentity(C, POD4, "containerd"),  # innermost, not the node
    "host_user_session_v2.txt": NONE,
    "host_init_v2.txt": NONE,
    "host_ssh_service_v2.txt": NONE,
    "host_containerd_daemon_v2.txt": NONE,
    "host_v1_hybrid.txt": NONE,
}


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in (SAMPLES / "cgroup").iterdir()) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample(name: str) -> None:
    assert parse_cgroup((SAMPLES / "cgroup" / name).read_text()) == EXPECTED[name]


def test_the_unified_line_wins_over_v1_lines() -> None:
    text = f"4:memory:/docker/{A}\n0::/system.slice/docker-{B}.scope\n"
    assert parse_cgroup(text).container_id == B


def test_v1_lines_are_used_when_the_unified_line_names_nothing() -> None:
    assert parse_cgroup(f"0::/\n4:memory:/docker/{A}\n").container_id == A


@pytest.mark.parametrize(
    "text",
    [
        "",
        "garbage without colons\n",
        "0::/init.scope",  # no trailing newline
        f"0::/system.slice/docker-{A[:-1]}.scope\n",  # 63 hex: not an id
        f"0::/system.slice/docker-{A.upper()}.scope\n",  # ids are lower case
        f"0::/user.slice/pod{POD1}.slice\n",  # pod-like name outside kubepods
    ],
)
def test_odd_texts_name_no_container(text: str) -> None:
    identity = parse_cgroup(text)
    assert (identity.container_id, identity.pod_uid) == ("", "")


def test_pod_uid_underscores_become_dashes() -> None:
    uid = POD3.replace("-", "_")
    path = f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid}.slice"
    assert container_in_path(path).pod_uid == POD3

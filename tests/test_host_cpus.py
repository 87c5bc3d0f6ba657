"""usable_cpu_count: the cores a process may use, from its affinity and its cgroup's CPU quota
(fake cgroup trees in tmp_path, written as the Linux kernel lays them out)."""

from __future__ import annotations

import os

import pytest

from haaqi_jax import host_cpus
from haaqi_jax.data import demo
from haaqi_jax.haaqi import api


@pytest.fixture
def cores(monkeypatch):
    """Pins the process's affinity to `n` cores: cores(n)."""
    def pin(n):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(n)), raising=False)
    pin(16)
    return pin


def _cgroup_v2(tmp_path, cpu_max_by_dir: dict[str, str], own="/") -> dict:
    root = tmp_path / "sys_fs_cgroup"
    for rel, text in cpu_max_by_dir.items():
        d = root / rel.strip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(text + "\n")
    self_cgroup = tmp_path / "proc_self_cgroup"
    self_cgroup.write_text(f"0::{own}\n")
    return {"cgroup_root": root, "self_cgroup": self_cgroup}


def _cgroup_v1(tmp_path, quota_us: int, period_us: int, own="/") -> dict:
    root = tmp_path / "sys_fs_cgroup"
    d = root / "cpu,cpuacct" / own.strip("/")
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text(f"{quota_us}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period_us}\n")
    self_cgroup = tmp_path / "proc_self_cgroup"
    self_cgroup.write_text(f"12:memory:/x\n4:cpu,cpuacct:{own}\n1:name=systemd:/\n0::/\n")
    return {"cgroup_root": root, "self_cgroup": self_cgroup}


def test_affinity_without_a_quota(tmp_path, cores):
    cores(3)
    assert host_cpus.usable_cpu_count(**_cgroup_v2(tmp_path, {"/": "max 100000"})) == 3


@pytest.mark.parametrize("cpu_max, expected", [("200000 100000", 2), ("150000 100000", 2),
                                               ("50000 100000", 1), ("400000 50000", 8)])
def test_a_cgroup_v2_quota_caps_the_count(tmp_path, cores, cpu_max, expected):
    """docker --cpus=1.5 writes cpu.max "150000 100000": 1.5 cores' time, rounded up."""
    assert host_cpus.usable_cpu_count(**_cgroup_v2(tmp_path, {"/": cpu_max})) == expected


def test_the_tightest_quota_on_the_path_to_the_root_counts(tmp_path, cores):
    paths = _cgroup_v2(tmp_path, {"/": "max 100000", "/jobs": "300000 100000",
                                  "/jobs/mine": "max 100000"}, own="/jobs/mine")
    assert host_cpus.usable_cpu_count(**paths) == 3


def test_a_cgroup_v1_quota_caps_the_count(tmp_path, cores):
    assert host_cpus.usable_cpu_count(**_cgroup_v1(tmp_path, 100000, 100000, "/k8s/pod")) == 1
    assert host_cpus.usable_cpu_count(**_cgroup_v1(tmp_path / "b", -1, 100000)) == 16


def test_the_affinity_wins_when_it_is_smaller(tmp_path, cores):
    cores(2)
    assert host_cpus.usable_cpu_count(**_cgroup_v2(tmp_path, {"/": "800000 100000"})) == 2


@pytest.mark.parametrize("text", ["", "garbage", "0 100000", "100000 0", "-5 100000"])
def test_unreadable_quotas_are_ignored(tmp_path, cores, text):
    assert host_cpus.usable_cpu_count(**_cgroup_v2(tmp_path, {"/": text})) == 16


def test_no_cgroup_files_at_all(tmp_path, cores):
    assert host_cpus.usable_cpu_count(cgroup_root=tmp_path / "none",
                                      self_cgroup=tmp_path / "missing") == 16


def test_thread_pools_follow_the_quota(tmp_path, cores, monkeypatch):
    """The demo's synthesis threads and HAAQI's host preparation threads: a container limited
    to 2 CPUs on a 16-core host gets 2 threads, not 16."""
    paths = _cgroup_v2(tmp_path, {"/": "200000 100000"})
    monkeypatch.setattr(host_cpus, "CGROUP_ROOT", paths["cgroup_root"])
    monkeypatch.setattr(host_cpus, "SELF_CGROUP", paths["self_cgroup"])
    assert demo.synthesis_workers() == 2
    assert api.default_prepare_workers() == 2

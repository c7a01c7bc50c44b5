"""tupper.runtime.limits on a fake /proc and /sys under tmp_path: which kernel limits a start raises
(never lowering one), what it says once, what it reports when it may not raise them, and which limit
an error or a console log names. No real sysctl is written."""

from __future__ import annotations

import errno
import resource
from pathlib import Path

import attrs
import pytest

from tupper.errors import Failed
from tupper.progress import Progress
from tupper.runtime import limits
from tupper.runtime.limits import Host, PidsCgroup, Reading


@attrs.define
class Notes(Progress):
    said: list[str] = attrs.Factory(list)

    def note(self, text: str) -> None:
        self.said.append(text)


@attrs.define
class Rlimit:
    """RLIMIT_NOFILE of a fake process."""

    soft: int = 1024
    hard: int = 4096
    calls: int = 0

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.soft, self.hard

    def set(self, which: int, value: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        self.calls += 1
        if value[0] > self.hard or value[1] > self.hard:
            raise ValueError("not allowed to raise maximum limit")
        self.soft, self.hard = value


SYSCTLS = {
    "fs/inotify/max_user_instances": "128",
    "fs/inotify/max_user_watches": "192536",
    "kernel/pid_max": "32768",
    "kernel/threads-max": "192730",
    "fs/file-max": "2466186",
    "fs/file-nr": "667\t0\t2466186",
}


def fake_host(tmp_path: Path, *, root: bool = True, rlimit: Rlimit | None = None, tasks: int = 112,
              cgroup: str = "8:pids:/\n4:memory:/x\n0::/\n", **sysctls: str) -> Host:
    proc, sys = tmp_path / "proc", tmp_path / "sys"
    for rel, value in {**SYSCTLS, **{k.replace(".", "/"): v for k, v in sysctls.items()}}.items():
        (proc / "sys" / rel).parent.mkdir(parents=True, exist_ok=True)
        (proc / "sys" / rel).write_text(value + "\n")
    (proc / "loadavg").write_text(f"0.13 0.43 1.15 1/{tasks} 29301\n")
    (proc / "self").mkdir(parents=True, exist_ok=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (sys / "block").mkdir(parents=True, exist_ok=True)
    rl = rlimit or Rlimit()
    return Host(proc=proc, sys=sys, dev=tmp_path / "dev", is_root=lambda: root, getrlimit=rl.get, setrlimit=rl.set)


def sysctl(host: Host, name: str) -> int:
    return int(host.sysctl(name).read_text().split()[0])


# ---- write_sysctl --------------------------------------------------------------------------------


def test_write_sysctl_raises_a_lower_value_and_reports_before_and_after(tmp_path):
    host = fake_host(tmp_path)
    assert limits.write_sysctl("fs.inotify.max_user_instances", 8192, host=host) == (128, 8192)
    assert sysctl(host, "fs.inotify.max_user_instances") == 8192


def test_write_sysctl_never_lowers_a_higher_value(tmp_path):
    host = fake_host(tmp_path, **{"fs.inotify.max_user_instances": "65536"})
    assert limits.write_sysctl("fs.inotify.max_user_instances", 8192, host=host) == (65536, 65536)
    assert sysctl(host, "fs.inotify.max_user_instances") == 65536


def test_write_sysctl_of_a_missing_sysctl_is_an_oserror(tmp_path):
    with pytest.raises(OSError):
        limits.write_sysctl("fs.no.such", 1, host=fake_host(tmp_path))


# ---- prepare -------------------------------------------------------------------------------------


def test_prepare_as_root_raises_inotify_limits_and_says_each_once(tmp_path):
    host = fake_host(tmp_path)
    progress = Notes()
    assert limits.prepare(progress, 1, host=host) == []
    assert sysctl(host, "fs.inotify.max_user_instances") == limits.INSTANCES_WANTED
    assert sysctl(host, "fs.inotify.max_user_watches") == limits.WATCHES_WANTED
    assert progress.said == [
        "raised fs.inotify.max_user_instances from 128 to 8192 (each container's systemd takes some)",
        "raised fs.inotify.max_user_watches from 192536 to 524288 (each container's services watch files)",
        "raised RLIMIT_NOFILE from 1024 to 4096 (tupper holds descriptors for each container)",
    ]
    again = Notes()
    assert limits.prepare(again, 2, host=host) == []
    assert again.said == [], "a raise is said once: the next start finds the limits high enough"


def test_prepare_never_lowers_limits_set_higher_by_the_admin(tmp_path):
    rl = Rlimit(soft=20000, hard=20000)
    host = fake_host(tmp_path, rlimit=rl, **{"fs.inotify.max_user_instances": "100000", "fs.inotify.max_user_watches": "2000000"})
    progress = Notes()
    assert limits.prepare(progress, 50, host=host) == []
    assert progress.said == [] and rl.calls == 0
    assert sysctl(host, "fs.inotify.max_user_instances") == 100000
    assert sysctl(host, "fs.inotify.max_user_watches") == 2000000


def test_prepare_wants_more_inotify_instances_than_8192_for_a_great_many_containers(tmp_path):
    host = fake_host(tmp_path)
    limits.prepare(Notes(), 2000, host=host)
    assert sysctl(host, "fs.inotify.max_user_instances") == 2000 * limits.INSTANCES_PER_CONTAINER + limits.HOST_INSTANCES


def test_prepare_raises_the_soft_open_files_limit_to_the_hard_one_but_not_past_the_cap(tmp_path):
    rl = Rlimit(soft=1024, hard=1 << 30)
    limits.prepare(Notes(), 1, host=fake_host(tmp_path, rlimit=rl))
    assert (rl.soft, rl.hard) == (limits.NOFILE_CAP, 1 << 30), "the hard limit is left alone"


def test_prepare_not_as_root_writes_nothing_and_reports_only_limits_that_stop_the_start(tmp_path):
    host = fake_host(tmp_path, root=False)
    progress = Notes()
    assert limits.prepare(progress, 4, host=host) == [], "128 instances are enough for 4 containers"
    left = limits.prepare(progress, 50, host=host)
    assert sysctl(host, "fs.inotify.max_user_instances") == 128
    assert len(left) == 1 and left[0].startswith("fs.inotify.max_user_instances (inotify instances per user")
    assert f"is 128, about {50 * limits.INSTANCES_PER_CONTAINER + limits.HOST_INSTANCES} needed for 50 container(s)" in left[0]
    assert "`sysctl -w fs.inotify.max_user_instances=8192`" in left[0]
    assert all("fs.inotify" not in s for s in progress.said), "only the descriptor limit (no privilege needed) was raised"


def test_prepare_reports_a_raise_that_failed_where_the_value_is_too_low(tmp_path, monkeypatch):
    def read_only(name, value, *, host):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(limits, "write_sysctl", read_only)
    host = fake_host(tmp_path, rlimit=Rlimit(4096, 4096))
    assert limits.prepare(Notes(), 4, host=host) == [], "128 instances do for 4 containers: nothing to say"
    left = limits.prepare(Notes(), 50, host=host)
    assert len(left) == 1
    needed = 50 * limits.INSTANCES_PER_CONTAINER + limits.HOST_INSTANCES
    assert left[0].startswith(f"could not raise fs.inotify.max_user_instances from 128 to 8192 (Read-only file system), about {needed} needed")


def test_prepare_reports_an_open_files_limit_it_could_not_raise(tmp_path):
    class Refusing(Rlimit):
        def set(self, which: int, value: tuple[int, int]) -> None:
            raise OSError(errno.EPERM, "Operation not permitted")

    progress = Notes()
    left = limits.prepare(progress, 100, host=fake_host(tmp_path, rlimit=Refusing(1024, 4096)))
    assert [s for s in left if "RLIMIT_NOFILE" in s] == [
        "could not raise RLIMIT_NOFILE from 1024 to 4096 (Operation not permitted), about 1856 needed: " + limits.LIMITS["nofile"].raise_how]
    assert not any("RLIMIT_NOFILE" in s for s in progress.said)


def test_prepare_says_when_the_task_limits_leave_no_room_for_a_container(tmp_path):
    host = fake_host(tmp_path, tasks=32760)
    left = limits.prepare(Notes(), 1, host=host)
    assert [s.split(" (")[0] for s in left] == ["kernel.pid_max"]
    assert "is 32768 and 32760 tasks run" in left[0] and "sysctl -w kernel.pid_max=4194304" in left[0]


def test_prepare_checks_the_pids_cgroup_tupper_runs_in_and_those_above_it(tmp_path):
    host = fake_host(tmp_path, cgroup="8:pids:/svc/tupper\n0::/\n")
    below = tmp_path / "sys/fs/cgroup/pids/svc/tupper"
    below.mkdir(parents=True)
    (below / "pids.max").write_text("max\n")
    (below / "pids.current").write_text("10\n")
    (below.parent / "pids.max").write_text("100\n")
    (below.parent / "pids.current").write_text("90\n")
    reading = limits.read(host)
    assert reading.pids_cgroups == (PidsCgroup(str(below), None, 10), PidsCgroup(str(below.parent), 100, 90))
    left = limits.prepare(Notes(), 1, host=host)
    assert len(left) == 1 and f"{below.parent}/pids.max is 100 and 90 tasks run in it" in left[0]


def test_prepare_says_when_open_files_of_the_system_are_nearly_all_taken(tmp_path):
    host = fake_host(tmp_path, **{"fs.file-nr": "99900\t0\t100000", "fs.file-max": "100000"})
    left = limits.prepare(Notes(), 1, host=host)
    assert len(left) == 1 and left[0].startswith("fs.file-max (open files in the whole system) is 100000 and 99900 files are open")


def test_prepare_checks_loop_devices_only_where_the_store_needs_them(tmp_path):
    host = fake_host(tmp_path)
    assert limits.prepare(Notes(), 1, host=host) == []
    left = limits.prepare(Notes(), 1, loop=True, host=host)
    assert len(left) == 1 and "none is free and there is no /dev/loop-control" in left[0] and "modprobe loop" in left[0]
    (tmp_path / "sys/block/loop0").mkdir()  # an unbound loop device: free
    assert limits.prepare(Notes(), 1, loop=True, host=host) == []
    (tmp_path / "sys/block/loop0/loop").mkdir()  # now bound to a file
    assert limits.prepare(Notes(), 1, loop=True, host=host) != []


def test_the_real_host_reads_without_writing():
    reading = limits.read()
    assert reading.instances and reading.watches and reading.pid_max and reading.tasks and reading.file_max
    assert reading.nofile[0] <= reading.nofile[1]


def test_the_plan_leaves_missing_figures_alone():
    assert limits.plan(Reading(root=True, nofile=(4096, 4096)), 50, loop=False) == limits.Plan((), ())


def test_the_plan_names_a_hard_open_files_limit_too_low_for_the_containers():
    plan = limits.plan(Reading(root=True, nofile=(256, 256)), 100)
    assert plan.raises == ()
    assert len(plan.short) == 1 and plan.short[0].startswith("RLIMIT_NOFILE (open files of one process")
    assert "allows 256 open files (hard limit), about 1856 needed for 100 container(s)" in plan.short[0]


# ---- explain -------------------------------------------------------------------------------------


def test_explain_names_inotify_instances_for_emfile_from_inotify_init1(tmp_path):
    host = fake_host(tmp_path, **{"fs.inotify.max_user_instances": "8192"})
    text = limits.explain(OSError(errno.EMFILE, "inotify_init1"), host=host)
    assert text is not None and "fs.inotify.max_user_instances" in text and "now 8192" in text
    assert "`sysctl -w fs.inotify.max_user_instances=8192`" in text


def test_explain_names_inotify_watches_for_enospc_from_inotify_add_watch(tmp_path):
    text = limits.explain(OSError(errno.ENOSPC, "inotify_add_watch"), host=fake_host(tmp_path))
    assert text is not None and "fs.inotify.max_user_watches" in text and "now 192536" in text


def test_explain_leaves_a_full_disk_alone(tmp_path):
    assert limits.explain(OSError(errno.ENOSPC, "No space left on device", "/var/lib/tupper/x"), host=fake_host(tmp_path)) is None
    assert limits.explain(ValueError("bad"), host=fake_host(tmp_path)) is None


def test_explain_tells_the_process_limit_from_the_system_wide_one(tmp_path):
    host = fake_host(tmp_path, rlimit=Rlimit(1024, 4096), **{"fs.inotify.max_user_instances": "8192"})
    mine = limits.explain(OSError(errno.EMFILE, "Too many open files"), host=host)
    assert mine is not None and "RLIMIT_NOFILE" in mine and "now 1024/4096 (soft/hard)" in mine
    system = limits.explain(OSError(errno.ENFILE, "Too many open files in system"), host=host)
    assert system is not None and "fs.file-max" in system and "667 files open" in system


def test_explain_takes_emfile_for_inotify_instances_while_that_limit_is_low(tmp_path):
    text = limits.explain(OSError(errno.EMFILE, "Too many open files"), host=fake_host(tmp_path))
    assert text is not None and "fs.inotify.max_user_instances" in text


def test_explain_names_the_tightest_task_limit_for_a_fork_that_failed(tmp_path):
    host = fake_host(tmp_path, tasks=32700)
    text = limits.explain(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), host=host)
    assert text is not None and "kernel.pid_max" in text and "32700 tasks run" in text
    roomy = fake_host(tmp_path / "roomy")
    assert limits.explain(BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"), host=roomy) is None, \
        "a bare EAGAIN with room for tasks is a non-blocking call, not a limit"
    forked = limits.explain("Failed to fork inner child: Resource temporarily unavailable", host=roomy)
    assert forked is not None and "kernel.pid_max" in forked


def test_explain_follows_the_cause_of_a_tupper_error(tmp_path):
    try:
        try:
            raise OSError(errno.EMFILE, "inotify_init1")
        except OSError as exc:
            raise Failed("cannot watch the container") from exc
    except Failed as exc:
        text = limits.explain(exc, host=fake_host(tmp_path))
    assert text is not None and "fs.inotify.max_user_instances" in text


def test_explain_names_loop_devices(tmp_path):
    host = fake_host(tmp_path)
    for line in ("Failed to allocate loop device: No such device",
                 "losetup: cannot find an unused loop device",
                 "mount: /var/lib/tupper: failed to setup loop device for /var/lib/tupper.img."):
        text = limits.explain(line, host=host)
        assert text is not None and "loop devices" in text and "modprobe loop" in text, line
    assert limits.explain("container t1 entered crash-loop: no free slot", host=host) is None


# ---- console logs --------------------------------------------------------------------------------


CONSOLE = """\
systemd 252.36-1~deb12u1 running in system mode (+PAM +AUDIT +SELINUX)
Detected virtualization systemd-nspawn.
Failed to allocate manager object: Too many open files
[!!!!!!] Failed to allocate manager object.
Exiting PID 1...
"""


def test_a_console_log_that_says_too_many_open_files_names_inotify_instances(tmp_path):
    host = fake_host(tmp_path, **{"fs.inotify.max_user_instances": "8192"})
    limit = limits.limit_in_log(CONSOLE, host=host)
    assert limit is not None and limit.name == "fs.inotify.max_user_instances"
    text = limits.explain_log(CONSOLE, host=host)
    assert text is not None and text.startswith("most likely the kernel limit fs.inotify.max_user_instances stopped it")


def test_a_console_log_names_inotify_watches_and_namespaces(tmp_path):
    host = fake_host(tmp_path)
    watches = "Starting systemd-journald.service...\nFailed to add inotify watch on /etc/systemd/system: No space left on device\n"
    assert limits.limit_in_log(watches, host=host) == limits.LIMITS["watches"]
    spaces = "Failed to unshare mount namespace: No space left on device\n"
    assert limits.limit_in_log(spaces, host=host) == limits.LIMITS["namespaces"]


def test_a_console_log_of_a_good_boot_names_no_limit(tmp_path):
    ok = "systemd 252 running in system mode\nWelcome to Debian GNU/Linux 12 (bookworm)!\n[  OK  ] Reached target multi-user.target.\n"
    assert limits.limit_in_log(ok, host=fake_host(tmp_path)) is None
    assert limits.explain_log("", host=fake_host(tmp_path)) is None

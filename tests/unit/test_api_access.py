"""Who may call tupperd's mutating methods: root, or members of the admin group (real users and groups)."""

import grp
import pwd

import pytest

from tupper.busnames import container_path, escape_label, unescape_label
from tupper.daemon.api import uid_allowed


def test_root_is_always_allowed():
    assert uid_allowed(0, None) and uid_allowed(0, "no-such-group")


def test_a_user_is_allowed_through_its_primary_group_only_when_that_is_the_admin_group():
    nobody = pwd.getpwnam("nobody")
    primary = grp.getgrgid(nobody.pw_gid).gr_name
    assert uid_allowed(nobody.pw_uid, primary)
    assert not uid_allowed(nobody.pw_uid, "root")
    assert not uid_allowed(nobody.pw_uid, None)
    assert not uid_allowed(nobody.pw_uid, "no-such-group")


def test_supplementary_members_are_allowed():
    for group in grp.getgrall():
        for member in group.gr_mem:
            try:
                user = pwd.getpwnam(member)
            except KeyError:
                continue
            if user.pw_uid != 0 and user.pw_gid != group.gr_gid:
                assert uid_allowed(user.pw_uid, group.gr_name)
                assert not uid_allowed(user.pw_uid, "no-such-group")
                return
    pytest.skip("no user on this host has a supplementary group")


def test_object_path_labels_escape_like_systemd_and_round_trip():
    assert escape_label("web-1") == "web_2d1"
    assert escape_label("a.b_c") == "a_2eb_5fc"
    assert container_path("web") == "/org/tupper1/container/web"
    for name in ("web-1", "a.b_c", "x", "9lives"):
        assert unescape_label(escape_label(name)) == name

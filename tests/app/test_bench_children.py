"""Child processes and allocator settings (monai_gdl_plus.app.bench.children): each child gets exactly the
environment of its setting, and the settings named are the ones run."""

from __future__ import annotations

from pathlib import Path

import pytest

from monai_gdl_plus.app.bench import children


def test_child_env_sets_exactly_the_setting(monkeypatch):
    root = str(Path(children.__file__).resolve().parents[3])  # the folder holding monai_gdl_plus/
    for parent in (None, "1", "0"):
        if parent is None:
            monkeypatch.delenv(children.THP_ENV, raising=False)
        else:
            monkeypatch.setenv(children.THP_ENV, parent)
        monkeypatch.setenv("SOME_USER_SETTING", "kept")
        default, thp = children.child_env("default"), children.child_env("thp", {"MALLOC_MMAP_THRESHOLD_": "65536"})
        assert children.THP_ENV not in default, parent
        assert thp[children.THP_ENV] == "1", parent
        assert default["SOME_USER_SETTING"] == thp["SOME_USER_SETTING"] == "kept"
        assert thp["MALLOC_MMAP_THRESHOLD_"] == "65536" and "MALLOC_MMAP_THRESHOLD_" not in default
        assert default["PYTHONPATH"].split(":")[0] == root


def test_a_real_child_sees_exactly_its_setting(monkeypatch):
    """A memory child, started by ``python -m monai_gdl_plus.app.bench``, reports THP_MEM_ALLOC_ENABLE as the
    setting says even when this process has it set to 1."""
    monkeypatch.setenv(children.THP_ENV, "1")
    argv = ["--_memory-case", "ours-dice", "--shape", "1,3,8,8,8", "--threads", "1"]
    for allocator, seen in (("default", None), ("thp", "1")):
        result = children.run_child(argv, allocator, "memory child", extra_env=children.MALLOC_ENV, timeout=300)
        assert result["thp_env"] == seen and result["peak_extra_bytes"] >= 0


def test_a_failed_child_names_what_failed_and_its_last_error_line():
    with pytest.raises(RuntimeError, match=r"^memory child failed \(exit 2\): .*invalid choice: 'nope'"):
        children.run_child(["--_memory-case", "nope", "--shape", "1,3,8,8"], "default", "memory child", timeout=300)


def test_resolve_allocators():
    assert children.resolve_allocators(None, "cpu") == ["default", "thp"]
    assert children.resolve_allocators(None, "cuda") == ["default"]
    assert children.resolve_allocators(["thp", "default,thp"], "cpu") == ["default", "thp"]
    assert children.resolve_allocators("thp", "cpu") == ["thp"]
    with pytest.raises(ValueError, match=r"`allocators` must be one of \('default', 'thp'\), got 'tph'"):
        children.resolve_allocators(["default,tph"], "cpu")
    with pytest.raises(ValueError, match="`allocators` must name at least one of"):
        children.resolve_allocators([","], "cpu")
    with pytest.raises(ValueError, match="`allocators` 'thp' sets PyTorch's CPU allocator .* device 'cuda'"):
        children.resolve_allocators(["default", "thp"], "cuda")

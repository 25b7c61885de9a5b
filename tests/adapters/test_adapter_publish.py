"""Publishing an adapter is all or nothing: a failed publish leaves the served adapter as it was."""

from __future__ import annotations

import math

import pytest

from stylear_core.adapters.format import ADAPTER_FORMAT, AdapterError
from stylear_core.adapters.io import list_adapters, read_manifest_of
from stylear_core.adapters.publish import check_parity, publish_adapter


def adapter_source(directory, marker: bytes):
    """A minimal servable-looking adapter directory: LoRA weights file (contents ``marker``) and a manifest."""
    directory.mkdir()
    (directory / "lora.safetensors").write_bytes(marker)
    (directory / "manifest.json").write_text(f'{{"format": "{ADAPTER_FORMAT}", "kind": "style"}}')
    return directory


@pytest.fixture
def published(tmp_path):
    """An adapters root that already serves ``my-style`` (weights ``old``)."""
    root = tmp_path / "adapters"
    publish_adapter(adapter_source(tmp_path / "v1", b"old"), root, "my-style")
    return root


def assert_old_adapter_served(root):
    assert sorted(p.name for p in root.iterdir()) == ["my-style"]  # no partial or temporary directory
    assert (root / "my-style" / "lora.safetensors").read_bytes() == b"old"
    assert [a["name"] for a in list_adapters(root)] == ["my-style"]


def test_a_copy_that_fails_midway_leaves_the_published_adapter_intact(tmp_path, published):
    source = adapter_source(tmp_path / "v2", b"new")
    (source / "zz_broken").symlink_to(tmp_path / "missing")  # copied after the weights, then fails
    with pytest.raises(OSError):
        publish_adapter(source, published, "my-style")
    assert_old_adapter_served(published)


def test_a_manifest_that_cannot_be_written_leaves_the_published_adapter_intact(tmp_path, published):
    source = adapter_source(tmp_path / "v2", b"new")
    with pytest.raises(KeyError):
        publish_adapter(source, published, "my-style", manifest={"name": "my-style"})  # no "format"
    assert_old_adapter_served(published)


def test_a_refused_parity_gate_publishes_nothing(tmp_path, published):
    source = adapter_source(tmp_path / "v2", b"new")
    for parity in (1e-3, math.nan):
        with pytest.raises(RuntimeError, match="served adapter differs"):
            check_parity(parity, 1e-4, source)
            publish_adapter(source, published, "my-style")
    assert_old_adapter_served(published)
    assert check_parity(1e-6, 1e-4, source) == 1e-6


def test_a_publish_replaces_the_adapter_and_its_manifest(tmp_path, published):
    source = adapter_source(tmp_path / "v2", b"new")
    target = publish_adapter(source, published, "my-style", manifest={"format": ADAPTER_FORMAT, "name": "x"})
    assert sorted(p.name for p in published.iterdir()) == ["my-style"]
    assert (target / "lora.safetensors").read_bytes() == b"new"
    assert read_manifest_of(target)["name"] == "x" and "kind" not in read_manifest_of(target)
    with pytest.raises(AdapterError):
        publish_adapter(source, published, "../outside")

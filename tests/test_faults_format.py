"""Faults of the bundle format, the converter and pull --shard (issue #21): each test shows the fault is
gone (it fails on the code before the fix)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from test_faults import bundle, ckpt, cli, converted, one_line_error  # noqa: E402,F401  (fixtures)
from test_hub import REPO, hf_env, hub, publish  # noqa: E402,F401  (fixtures: a Hub server on 127.0.0.1)

import flashmoe  # noqa: E402
from flashmoe.convert.converter import convert_checkpoint  # noqa: E402
from flashmoe.errors import BundleError  # noqa: E402
from flashmoe.format import Bundle, BundleWriter, validate_manifest  # noqa: E402
from flashmoe.format.manifest import MANIFEST, expert_path  # noqa: E402
from flashmoe.format.experts import file_record_digests  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


# ---- pull --shard never writes through a link in the user's directory --------------------------------
def test_pull_shard_replaces_a_link_never_writes_its_target(bundles, hub, tmp_path):  # noqa: F811
    from flashmoe.hub.shard import pull_shard

    src = Path(shutil.copytree(bundles[8], tmp_path / "src"))
    publish(src)
    part = pull_shard(REPO, 0, 2, tmp_path / "part", token=False, progress=False)
    rel = expert_path(1)
    good = (part / rel).read_bytes()
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"the user's own file" * 100)
    before = victim.read_bytes()
    (part / rel).unlink()
    (part / rel).symlink_to(victim)
    stale = part / (expert_path(2) + ".partial")  # a stale temporary name that is a link: never opened
    stale.symlink_to(victim)
    pull_shard(REPO, 0, 2, part, token=False, progress=False)
    assert victim.read_bytes() == before
    assert not (part / rel).is_symlink() and (part / rel).read_bytes() == good
    assert not stale.exists() and not stale.is_symlink()


def test_pull_shard_refuses_a_linked_experts_folder(bundles, hub, tmp_path):  # noqa: F811
    from flashmoe.hub.shard import pull_shard

    src = Path(shutil.copytree(bundles[8], tmp_path / "src"))
    publish(src)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    part = tmp_path / "part"
    part.mkdir()
    (part / "experts").symlink_to(elsewhere)
    with pytest.raises(BundleError, match="experts is a link to .*bundle's folders must be real folders"):
        pull_shard(REPO, 0, 2, part, token=False, progress=False)
    assert list(elsewhere.iterdir()) == []


def test_whole_pull_never_repairs_through_a_linked_folder(bundles, hub, tmp_path):  # noqa: F811
    """A pulled bundle whose experts/ was replaced by a link to a folder of other files: the re-pull removes
    the link itself (never deleting or re-downloading the files through it) and puts a real folder there."""
    from flashmoe.hub import pull_bundle

    src = Path(shutil.copytree(bundles[8], tmp_path / "src"))
    publish(src)
    out = pull_bundle(REPO, progress=False, token=False, local_dir=tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for f in (out / "experts").iterdir():  # the user's own files under the same names
        (elsewhere / f.name).write_bytes(b"mine")
    shutil.rmtree(out / "experts")
    (out / "experts").symlink_to(elsewhere)
    pull_bundle(REPO, progress=False, token=False, local_dir=out)
    assert all(f.read_bytes() == b"mine" for f in elsewhere.iterdir())
    assert (out / "experts").is_dir() and not (out / "experts").is_symlink()
    assert Bundle.open(out).verify(progress=False) == []


# ---- BundleWriter: new temporary files only, links replaced, not followed -------------------------------
def test_bundle_writer_never_writes_through_links(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = tmp_path / "b"
    out.mkdir()
    (out / "config.json").symlink_to(victim)  # the final name is a link: replaced, not followed
    (out / "tokenizer.json.partial").symlink_to(victim)  # a stale temporary name is a link: removed
    bw = BundleWriter(out)
    bw.write_bytes("config.json", b"{}")
    bw.copy(victim, "tokenizer.json")
    assert victim.read_bytes() == b"keep"
    assert not (out / "config.json").is_symlink() and (out / "config.json").read_bytes() == b"{}"
    assert (out / "tokenizer.json").read_bytes() == b"keep"
    assert bw.files["config.json"]["size"] == 2
    (out / "dense").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BundleError, match="must be real folders"):
        bw.write_bytes("dense/global.safetensors", b"x")
    assert not (tmp_path / "elsewhere").exists()


# ---- a manifest shape that breaks quantization is refused by the validator -------------------------------
def test_head_dim_that_breaks_dense_quantization_is_invalid(bundle):
    m = json.loads((bundle / MANIFEST).read_text())
    assert any(k.endswith("self_attn.o_proj") for k in m["dense"]["quantized"])
    validate_manifest(m)
    m["config"]["head_dim"] = 65  # o_proj's input: heads * 65, not a multiple of group_size 64
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match=r"o_proj .* is not a multiple of group_size 64"):
        validate_manifest(m)
    one_line_error(cli("flashmoe.format.cli", bundle), "o_proj", "group_size 64")
    one_line_error(cli("flashmoe.runtime.cli", bundle, "--prompt", "hi", "--max-tokens", "1"), "o_proj")


def test_quantized_module_the_model_lacks_is_invalid(bundle):
    m = json.loads((bundle / MANIFEST).read_text())
    m["dense"]["quantized"]["layers.0.self_attn.nonsense"] = {"bits": 8, "group_size": 64}
    with pytest.raises(BundleError, match="not a Linear or embedding weight"):
        validate_manifest(m)


# ---- the tokenizer: checked at convert time, and against the manifest at run time ---------------------------
@pytest.mark.parametrize("damage,needle", [
    ("missing", "tokenizer.json is missing"),
    ("corrupt", "tokenizer.json: cannot be read"),
    ("template", "chat template does not parse"),
    ("config_template", "chat template does not parse"),
])
def test_convert_refuses_an_unusable_tokenizer(ckpt, tmp_path, damage, needle):
    src = Path(shutil.copytree(ckpt, tmp_path / "ck"))
    if damage == "missing":
        (src / "tokenizer.json").unlink()
    elif damage == "corrupt":
        (src / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    elif damage == "template":
        (src / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    else:
        (src / "chat_template.jinja").unlink()
        cfg = json.loads((src / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% if %}"
        (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match=needle):
        convert_checkpoint(src, tmp_path / "b", progress=False)
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())
    one_line_error(cli("flashmoe.convert.cli", src, "-o", tmp_path / "b2", "-q"), needle)


def test_run_refuses_a_chat_template_the_manifest_does_not_list(bundle):
    from flashmoe.runtime.tokenizer import Tokenizer

    Tokenizer(bundle)  # as converted: fine
    tpl = bundle / "chat_template.jinja"
    tpl.write_text(tpl.read_text() + "{{ 'injected' }}")
    with pytest.raises(BundleError, match="chat_template.jinja: .*differs from the manifest"):
        Tokenizer(bundle)
    m = json.loads((bundle / MANIFEST).read_text())
    m["files"] = [f for f in m["files"] if f["path"] != "chat_template.jinja"]
    (bundle / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(BundleError, match="chat_template.jinja is not part of the bundle"):
        Tokenizer(bundle)
    one_line_error(cli("flashmoe.runtime.cli", bundle, "--prompt", "hi", "--max-tokens", "1"),
                   "chat_template.jinja is not part of the bundle")


# ---- a folder link inside a bundle: refused alike by run, verify, inspect and convert ----------------------
def test_linked_experts_folder_is_refused_everywhere(bundle, ckpt, tmp_path):
    from flashmoe.format.verify import verify

    elsewhere = tmp_path / "other-disk" / "experts"
    shutil.move(bundle / "experts", elsewhere)
    (bundle / "experts").symlink_to(elsewhere)
    refused = "experts is a link to .*a bundle's folders must be real folders"
    with pytest.raises(BundleError, match=refused):
        Bundle.open(bundle)
    with pytest.raises(BundleError, match=refused):
        flashmoe.load(bundle)
    with pytest.raises(BundleError, match=refused):  # an error, not a bad file to repair through the link
        verify(Bundle.open(bundle, check_files=False), full=True, progress=False)
    one_line_error(cli("flashmoe.format.cli", bundle), "experts is a link", "must be real folders")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir())
    with pytest.raises(BundleError, match="must be real folders"):  # a repair would write through it: refused
        convert_checkpoint(ckpt, bundle, bits=4, progress=False)
    assert sorted((p.name, p.stat().st_mtime_ns) for p in elsewhere.iterdir()) == before


def test_records_written_by_the_writer_match_the_files(bundle):
    """The CRC-32s BundleWriter kept while writing are the files' own."""
    m = json.loads((bundle / MANIFEST).read_text())
    for layer, want in enumerate(m["records"]["digests"]):
        assert file_record_digests(bundle / expert_path(layer)) == want
    assert os.path.getsize(bundle / expert_path(0)) == Bundle.open(bundle).expert_info(0).file_size


def test_disk_full_mid_write_is_one_error_and_leaves_no_partial(ckpt, converted, tmp_path, monkeypatch):
    """ENOSPC from the kernel while an expert file is written (its temporary file opened on /dev/full: the
    writer no longer writes through a `.partial` link, which is how this was simulated before)."""
    from flashmoe.format import experts as fe

    real = fe.create_partial

    def full(path, mode=0o644):
        f = real(path, mode)  # the real temporary file, so the cleanup is the real one
        f.close()
        return open("/dev/full", "wb", buffering=0)

    monkeypatch.setattr(fe, "create_partial", full)
    out = tmp_path / "b"
    with pytest.raises(BundleError, match="the disk is full .* re-run the same command: it resumes"):
        convert_checkpoint(ckpt, out, progress=False)
    assert not (out / "experts/layer-000.bin.partial").exists()
    monkeypatch.setattr(fe, "create_partial", real)
    convert_checkpoint(ckpt, out, progress=False)  # space is back: the same command finishes the bundle
    for f in json.loads((converted / MANIFEST).read_text())["files"]:
        assert (out / f["path"]).read_bytes() == (converted / f["path"]).read_bytes(), f["path"]


def test_convert_lock_file_that_is_a_link_is_refused(ckpt, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("do not truncate")
    out = tmp_path / "b"
    out.mkdir()
    (out / ".flashmoe-convert.lock").symlink_to(victim)
    with pytest.raises(BundleError, match="is a link; flashmoe-convert never writes through a link"):
        convert_checkpoint(ckpt, out, progress=False)
    assert victim.read_text() == "do not truncate"

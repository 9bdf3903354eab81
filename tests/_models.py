"""Tiny models and graphs the tests build for themselves (seeded, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
#: The word-level vocabulary of ``save_tokenizer`` (tiny_lm's embedding rows).
VOCAB = {"[PAD]": 0, "[UNK]": 1, "[BOS]": 2, "the": 3, "cat": 4, "sat": 5, "on": 6, "mat": 7, "<eos>": 8}


def make_model(nodes, inputs, outputs, initializers, opset: int = OPSET) -> onnx.ModelProto:
    """A checked ModelProto from helper parts; initializers given as {name: array}."""
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in initializers.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def tensor(name: str, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def linear_chain(tmp: Path, seed: int = 0) -> Path:
    """x[N, 6] -> MatMul(W1 [6, 5], stored in_out) -> Relu -> Gemm(W2 [4, 5], transB) -> y."""
    r = rng(seed)
    w1 = r.standard_normal((6, 5)).astype(np.float32)
    w2 = r.standard_normal((4, 5)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1),
        ],
        [tensor("x", ["N", 6])],
        [tensor("y", ["N", 4])],
        {"w1": w1, "w2": w2},
    )
    path = tmp / "chain.onnx"
    onnx.save(model, path)
    return path


def tiny_vit(img: int = 32, seed: int = 0):
    """A 2-block timm ViT with 32-d embeddings, in eval mode."""
    import timm
    import torch

    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=img, patch_size=8,
        embed_dim=32, depth=2, num_heads=2, num_classes=5,
    ).eval()


def export(model, example, path: Path, input_names=("x",), dynamic=None) -> Path:
    """Legacy-exporter ONNX file with a dynamic batch axis (transposes folded)."""
    import torch

    names = list(input_names)
    dynamic = dynamic or {n: {0: "batch"} for n in names}
    args = tuple(example) if isinstance(example, (list, tuple)) else (example,)
    torch.onnx.export(
        model, args, str(path), input_names=names, output_names=["y"],
        dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
    )
    return path


def tiny_bert(seed: int = 0):
    """A 2-layer, 32-d BERT taking (input_ids, attention_mask, token_type_ids) positionally."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    bert = BertModel(config).eval()

    class Positional(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    return Positional().eval()


TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def small_cnn():
    """(model, example) for `module:function` SPECs: Conv, grouped Conv, Linear and a head."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=2)
            self.fc = nn.Linear(8, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, x):
            x = torch.relu(self.mix(torch.relu(self.stem(x))))
            return self.head(torch.relu(self.fc(x.mean((2, 3)))))

    return Net(), torch.randn(2, 3, 16, 16)


def tied_token_classifier():
    """(model, example) for `module:function` SPECs: a token embedding tied to a Linear (as
    an lm_head is tied), a Linear and a head; input ``input_ids``."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.proj = nn.Linear(8, 20, bias=False)
            self.proj.weight = self.emb.weight
            self.fc = nn.Linear(20, 6)
            self.head = nn.Linear(6, 2)

        def forward(self, input_ids):
            return self.head(torch.relu(self.fc(self.proj(self.emb(input_ids).mean(1)))))

    torch.manual_seed(0)
    return Net(), {"input_ids": torch.randint(0, 20, (2, 5))}


def image_folder(root: Path, classes=("a", "b"), per_class: int = 6, size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder tree of random RGB PNGs."""
    from PIL import Image

    r = rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = r.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def save_tokenizer(folder, padding: int | None = None):
    """A word-level tokenizer with [PAD]/[UNK] whose post-processor adds [BOS]."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    if padding is not None:
        tok.enable_padding(pad_id=padding, pad_token="[PAD]")
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def tiny_lm(folder, with_types: bool = False, with_mask: bool = True):
    """input_ids, attention_mask -> Gather(emb) * mask -> MatMul(w1) -> Relu -> MatMul(w2) -> y."""
    r = rng(0)
    inputs = [tensor("input_ids", ["N", "S"], TensorProto.INT64),
              tensor("attention_mask", ["N", "S"], TensorProto.INT64)]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mf", "axis"], ["m"]),
        helper.make_node("Mul", ["e", "m"], ["em"]),
        helper.make_node("MatMul", ["em", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["hr"]),
        helper.make_node("MatMul", ["hr", "w2"], ["y"]),
    ]
    inits = {"emb": r.standard_normal((len(VOCAB), 6)).astype(np.float32),
             "axis": np.array([-1], np.int64),
             "w1": r.standard_normal((6, 5)).astype(np.float32),
             "w2": r.standard_normal((5, 4)).astype(np.float32)}
    if with_types:
        inputs.append(tensor("token_type_ids", ["N", "S"], TensorProto.INT64))
        nodes[3].output[0] = "em_raw"
        nodes[4:4] = [helper.make_node("Gather", ["types", "token_type_ids"], ["t"]),
                      helper.make_node("Add", ["em_raw", "t"], ["em"])]
        inits["types"] = r.standard_normal((2, 6)).astype(np.float32)
    if not with_mask:  # input_ids alone
        del inputs[1], nodes[1:4], inits["axis"]
        nodes[0].output[0] = "em"
    model = make_model(nodes, inputs, [tensor("y", ["N", "S", 4])], inits)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    save_tokenizer(folder)
    return folder / "model.onnx"


def channel_stats(widths: dict[str, int], mean_abs, sha: str = "e" * 64, samples: int = 1):
    """Statistics (``fps_onnx.stats.Stats``) of model ``sha``: for each weight key, ``width`` input
    channels whose mean |a| over ``samples`` samples is ``mean_abs(np.arange(width))``."""
    from fps_onnx.stats import ChannelStats, Stats

    stats = Stats(sha, num_samples=samples)
    for key, width in widths.items():
        acc = ChannelStats()
        acc.add(abs_sum=np.asarray(mean_abs(np.arange(width)), float) * samples, count=samples)
        stats.weights[key] = acc
    return stats

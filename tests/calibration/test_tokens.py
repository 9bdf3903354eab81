"""Token models: padded positions never count in the statistics."""

from __future__ import annotations

import numpy as np
import pytest

from _models import TOKEN_INPUTS, export, tiny_bert
from fps_onnx.calibrate import CalibrationConfig, calibrate
from fps_onnx.onnx import graph
from fps_onnx.onnx.load import load_model


@pytest.fixture(scope="module")
def bert_case(tmp_path_factory):
    import torch

    tmp = tmp_path_factory.mktemp("bert")
    model = tiny_bert()
    example = (torch.randint(0, 100, (2, 7)), torch.ones(2, 7, dtype=torch.long),
               torch.zeros(2, 7, dtype=torch.long))
    dynamic = {n: {0: "batch", 1: "sequence"} for n in TOKEN_INPUTS}
    path = export(model, example, tmp / "bert.onnx", TOKEN_INPUTS, dynamic)
    r = np.random.default_rng(0)
    ids = r.integers(1, 100, (6, 9))
    lengths = np.array([9, 3, 5, 1, 9, 6])
    mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
    ids = ids * mask
    np.savez(tmp / "tokens.npz", input_ids=ids, attention_mask=mask)
    return model, path, tmp / "tokens.npz", ids, mask


def hook_sums(model, ids, mask):
    """sum |x| per Linear input over unpadded tokens only, by module name."""
    import torch

    sums, handles = {}, []
    keep = torch.from_numpy(mask).bool()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def pre(m, args, name=name):
                if args[0].dim() != 3:
                    return  # the pooler: not in the exported graph
                x = args[0].detach().double()[keep]
                sums[name] = (x.abs().sum(0).numpy(), x.shape[0], m.weight.detach().numpy())
            handles.append(mod.register_forward_pre_hook(pre))
    with torch.no_grad():
        model(torch.from_numpy(ids), torch.from_numpy(mask), torch.zeros_like(torch.from_numpy(ids)))
    for h in handles:
        h.remove()
    return sums


def test_every_token_activation_is_masked(bert_case):
    _, path, *_ = bert_case
    model = load_model(path)
    acts = {a.tensor for s in graph.find_weights(model) for a in s.activations}
    assert graph.token_leading(model, acts, "attention_mask") == acts


def test_padded_tokens_do_not_count(bert_case):
    model, path, data, ids, mask = bert_case
    result = calibrate(path, data, CalibrationConfig(provider="cpu"))
    ref = hook_sums(model, ids, mask)
    weights = dict(graph.iter_weight_values(load_model(path), result.sites))
    assert len(result.sites) == 12
    for site in result.sites:
        (name,) = [n for n, (_, _, w) in ref.items() if w.shape == weights[site].shape
                   and np.array_equal(w, weights[site])]
        abs_sum, count, _ = ref[name]
        got = result.stats.weights[site.key]
        assert got.count == count == mask.sum()
        np.testing.assert_allclose(got.abs_sum, abs_sum, rtol=1e-4, err_msg=name)

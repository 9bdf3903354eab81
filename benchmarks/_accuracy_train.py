"""One training run of the accuracy benchmark (a child process), from the trainer's public pieces.

Modes:

* ``sparse``: the entries a mask file selects (fps_onnx.train.loop.prepare),
  with the head and biases trained fully and norms frozen (the Recipe's GPS
  defaults);
* ``probe``: the head only (no masks, biases frozen);
* ``full``: every parameter, norms included; the backbone at ``lr *
  full_lr_scale``, the head at ``lr`` (AdamW groups built here: the trainer
  has no per-group learning rates).

Training follows fps_onnx.train.loop.fit (warm-up + cosine, best epoch by
validation accuracy restored), then the test split is evaluated once.
``python benchmarks/_accuracy_train.py ARGS_JSON OUT_JSON``
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import sys
import time


def main(args_path: str, out_path: str) -> None:
    args = json.loads(Path(args_path).read_text())
    import torch

    from fps_onnx.torch.export import build_model
    from fps_onnx.torch.train import loop
    from fps_onnx.torch.train.data import open_split
    from fps_onnx.torch.train.recipe import Recipe
    from fps_onnx.torch.train.run import image_spec

    torch.set_num_threads(int(args.get("threads", 2)))
    mode = args["mode"]
    recipe = Recipe(epochs=args["epochs"], batch_size=args["batch_size"], lr=args["lr"],
                    warmup_epochs=args["warmup_epochs"], seed=args["seed"],
                    train_bias=mode != "probe", train_norm=mode == "full", amp=False)
    splits = {k: open_split(args[k]) for k in ("train", "val", "test")}
    torch.manual_seed(recipe.seed)
    model, example = build_model(args["spec"], num_classes=args["num_classes"], img_size=args.get("image_size"))
    # build_model seeds torch with 0 before building: re-draw the new head with this run's seed
    torch.manual_seed(recipe.seed)
    model.head.reset_parameters()
    image = image_spec(model, example, args.get("image_size"))
    for split in splits.values():
        split.set_image(image)
        if isinstance(example, dict):
            split.set_inputs(list(example))

    head_names = set(loop.head_names(model))
    total = sum(p.numel() for p in model.parameters())
    backbone_weights = sum(p.numel() for n, p in model.named_parameters()
                           if p.ndim >= 2 and n not in head_names)
    if mode == "sparse":
        trainable = loop.prepare(model, args["masks"], recipe)
    else:  # loop.prepare refuses masks that select nothing: freeze by hand
        dense = sorted(head_names) if mode == "probe" else [n for n, _ in model.named_parameters()]
        for name, p in model.named_parameters():
            p.requires_grad_(name in dense)
        trainable = loop.Trainable({}, dense, sorted(head_names))
    head = set(trainable.head)
    if mode == "full":

        def make_optimizer(net, rec):
            named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in named if n in head], "lr": rec.lr},
                {"params": [p for n, p in named if n not in head], "lr": rec.lr * args["full_lr_scale"]},
            ]
            return torch.optim.AdamW(groups, lr=rec.lr, weight_decay=rec.weight_decay)

        loop.make_optimizer = make_optimizer
    if not recipe.train_norm and os.environ.get("ACCURACY_FROZEN_BN", "eval") == "eval":
        _frozen_batchnorm_in_eval(model, torch)
    params = dict(model.named_parameters())
    if mode == "full":
        count = total
    else:
        count = trainable.selected + sum(params[n].numel() for n in trainable.dense)

    def loader(split, train):
        g = torch.Generator().manual_seed(recipe.seed)
        return torch.utils.data.DataLoader(split, recipe.batch_size, shuffle=train, generator=g)

    start = time.perf_counter()
    history = loop.fit(model, loader(splits["train"], True), loader(splits["val"], False), recipe=recipe,
                       device="cpu", on_epoch=lambda r: print(json.dumps(r), flush=True))
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    test = loop.evaluate(model, loader(splits["test"], False), "cpu", recipe)
    result = {
        "test_accuracy": test,
        "best_epoch": history["best_epoch"],
        "best_val_accuracy": max(r["val_accuracy"] for r in history["epochs"]),
        "epochs": history["epochs"],
        "train_seconds": train_s,
        "test_seconds": time.perf_counter() - start,
        "trainable": count,
        "selected": trainable.selected,
        "dense_tensors": len(trainable.dense),
        "total_params": total,
        "backbone_weights": backbone_weights,
        "frozen_batchnorm": "eval" if not recipe.train_norm and os.environ.get("ACCURACY_FROZEN_BN", "eval") == "eval"
        else "train",
        "recipe": {k: getattr(recipe, k) for k in ("epochs", "batch_size", "lr", "warmup_epochs", "seed",
                                                   "train_head", "train_bias", "train_norm")},
    }
    tmp = out_path + ".tmp"
    Path(tmp).write_text(json.dumps(result, indent=1))
    os.replace(tmp, out_path)


def _frozen_batchnorm_in_eval(model, torch) -> None:
    """Keep frozen BatchNorm layers in eval mode while training (running statistics, no updates).

    fit() calls model.train() every epoch, which would normalise with batch
    statistics and move the running ones (EfficientNet's momentum is 0.01),
    so features at training and at test time differ.
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    plain_train = model.train

    def train(mode: bool = True):
        plain_train(mode)
        for m in norms:
            m.eval()
        return model

    model.train = train


if __name__ == "__main__":
    main(*sys.argv[1:3])

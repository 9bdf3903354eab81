"""Sparse fine-tuning with the Hugging Face Trainer on the entries a mask file selects.

    python examples/hf_trainer.py [--masks masks.safetensors] [-o hf_trainer_out]

prepare -> Trainer -> merge -> save_pretrained, on a tiny BERT classifier built
from a config (random weights, random token data: nothing is downloaded). With
``--masks`` the masks are read from a file keyed by this model's parameter
names (in real use: ``fps-onnx select model.onnx data/ --torch-model hf:PATH -o
masks.safetensors``); without it a stand-in file is written first, keeping the
2 largest-magnitude entries of each output neuron of every encoder Linear weight.
The script checks that no unselected entry moved, then saves an ordinary
transformers model folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import fps_onnx


def tiny_bert() -> transformers.BertForSequenceClassification:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def stand_in_masks(model: torch.nn.Module, path: Path) -> None:
    """Top-2 |w| per output neuron of every encoder Linear weight, as a mask file (each
    row's selected positions, sorted: the index form of a mask)."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".encoder." in f".{name}.":
            magnitude = module.weight.detach().abs()
            top = torch.sort(-magnitude, dim=1, stable=True).indices[:, :2]  # ties: the lower index
            masks[f"{name}.weight"] = (tuple(magnitude.shape), top.sort(dim=1).values.numpy())
    fps_onnx.save_masks(fps_onnx.MaskFile.from_indices(masks, {}, {"method": "magnitude", "level": "neuron"}), path)


def dataset(n: int = 64, length: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, length), generator=g)
    labels = (ids[:, 0] > 50).long()  # learnable: the label is a property of the first token
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", type=Path, help="Mask file keyed by the model's parameter names.")
    parser.add_argument("-o", "--output", type=Path, default=Path("hf_trainer_out"))
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    args.output.mkdir(parents=True, exist_ok=True)

    model = tiny_bert()
    masks_path = args.masks
    if masks_path is None:
        masks_path = args.output / "masks.safetensors"
        stand_in_masks(model, masks_path)
    masks = fps_onnx.load_masks(masks_path)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}

    # 1. selected entries become k-sized trainable deltas (plus, by default, the head and biases)
    trainable = fps_onnx.prepare(model, masks_path)

    # 2. any Trainer setup (its default optimizer, fused AdamW, works)
    training = transformers.TrainingArguments(
        output_dir=str(args.output / "trainer"), max_steps=args.steps, per_device_train_batch_size=16,
        learning_rate=5e-3, weight_decay=0.1, report_to="none",
        save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=training, train_dataset=dataset())
    result = trainer.train()

    # 3. write the deltas into the weights: an ordinary model again
    fps_onnx.merge(model)
    model.save_pretrained(args.output / "model")

    after = model.state_dict()
    moved = frozen_moved = 0
    for name in masks.keys():
        changed = (after[name] != before[name]).reshape(-1).numpy()
        selected_moved = int(changed[masks.indices(name)].sum())  # the flat indices of the selection
        moved += selected_moved
        frozen_moved += int(changed.sum()) - selected_moved
    if frozen_moved:
        raise SystemExit(f"{frozen_moved} unselected entries moved")
    optimizer_state = sum(s["exp_avg"].numel() for s in trainer.optimizer.state.values() if "exp_avg" in s)
    summary = {"selected": trainable.selected, "moved": moved, "frozen_moved": frozen_moved,
               "trained_fully": len(trainable.dense), "optimizer_state_entries": optimizer_state,
               "train_loss": result.training_loss, "saved": str(args.output / "model")}
    print(f"{trainable.selected:,} selected entries ({moved:,} moved, no unselected entry moved), "
          f"{len(trainable.dense)} tensors trained fully, optimizer state {optimizer_state:,} entries, "
          f"train loss {result.training_loss:.3f}; saved {summary['saved']}")
    return summary


if __name__ == "__main__":
    main()

"""CSLTrainer on a tiny causal LM (built from a config, CPU): per-example CSL from token
losses, through the logits path and through linear_cross_entropy."""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from csl_fast.integrations.huggingface import CSLTrainer

N, LEN, VOCAB = 12, 8, 24


class Texts(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (N, LEN), generator=g)
        self.labels = self.ids.clone()
        self.labels[:, :2] = -100  # prompt
        self.labels[::3, -3:] = -100  # padding

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i], "index": i}


def _train(tmp_path, fused: bool):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=LEN,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        save_strategy="no",
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    trainer = CSLTrainer(
        model=model, args=args, train_dataset=Texts(), csl_linear_cross_entropy=fused
    )
    trainer.train()
    return trainer.csl_tracker


def test_causal_lm_records_summed_token_loss(tmp_path):
    logits_path = _train(tmp_path / "a", fused=False)
    data = Texts()
    # Shifted: position t predicts labels[t + 1]; 2 epochs.
    supervised = (data.labels[:, 1:] != -100).sum(1).float() * 2
    assert logits_path.csl_count.tolist() == supervised.tolist()
    assert logits_path.epoch == 2
    assert bool((logits_path.csl > 0).all())
    assert logits_path.num_classes == VOCAB
    fused_path = _train(tmp_path / "b", fused=True)
    assert fused_path.csl_count.tolist() == supervised.tolist()
    torch.testing.assert_close(fused_path.csl, logits_path.csl, rtol=1e-3, atol=1e-3)

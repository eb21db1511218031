"""Mean per-token KL(p_reference ‖ p_model) against scipy.stats.entropy and a direct float64 computation."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_tiny_llama
from scipy.special import softmax
from scipy.stats import entropy

from kfade.data.formatting import IGNORE_INDEX, QAFormatter, qa_batches
from kfade.errors import ConfigError
from kfade.eval.divergence import mean_token_kl, mean_token_kls

ROWS = [{"question": "Where was Alia Verne born?", "answer": "Alia Verne was born in Port Lumen."},
        {"question": "What genre does Tomas Reed write?", "answer": "Mystery novels."},
        {"question": "Capital of France?", "answer": "Paris is the capital of France."}]


class BigramModel(torch.nn.Module):
    """Logits depend only on the current token: ``logits[b, t] = table[input_ids[b, t]]``."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(torch.as_tensor(table, dtype=torch.float32))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def test_handcrafted_case_matches_scipy_entropy():
    rng = np.random.default_rng(0)
    reference_table, model_table = rng.normal(size=(4, 5)), rng.normal(size=(4, 5)) * 2
    # batch 1 scores the predictions made at tokens 1 and 2, batch 2 the one made at token 3
    batches = [
        {"input_ids": torch.tensor([[0, 1, 2, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long),
         "labels": torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 3]])},
        {"input_ids": torch.tensor([[3, 0]]), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "labels": torch.tensor([[IGNORE_INDEX, 0]])},
    ]
    per_token = [entropy(softmax(reference_table[t]), softmax(model_table[t])) for t in (1, 2, 3)]
    got = mean_token_kl(BigramModel(reference_table), BigramModel(model_table), batches)
    assert got == pytest.approx(np.mean(per_token), rel=1e-5)  # the mean over tokens, not over batches


def kl_float64(reference_model, model, batches):
    """Direct computation: every model's logits upcast to float64, KL summed over label positions."""
    total, count = 0.0, 0
    with torch.no_grad():
        for b in batches:
            inputs = {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}
            log_p = torch.log_softmax(reference_model(**inputs).logits.double()[:, :-1], -1)
            log_q = torch.log_softmax(model(**inputs).logits.double()[:, :-1], -1)
            mask = b["labels"][:, 1:] != IGNORE_INDEX
            total += (log_p.exp() * (log_p - log_q)).sum(-1)[mask].sum().item()
            count += int(mask.sum())
    return total / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_llamas_match_float64_computation(tokenizer, dtype):
    batches = qa_batches(ROWS, QAFormatter(tokenizer), batch_size=2)
    reference = make_tiny_llama(tokenizer, seed=0)
    model = make_tiny_llama(tokenizer, seed=1, dtype=dtype)
    got = mean_token_kl(reference, model, batches)
    assert got > 1e-3
    assert got == pytest.approx(kl_float64(reference, model, batches), rel=1e-5)


def test_identical_models_have_zero_kl_and_modes_are_restored(tokenizer):
    batches = qa_batches(ROWS, QAFormatter(tokenizer), batch_size=3)
    model = make_tiny_llama(tokenizer).train()
    assert mean_token_kl(model, model, batches) == pytest.approx(0.0, abs=1e-7)
    assert all(m.training for m in model.modules())


def test_batches_without_labels_are_rejected(tokenizer):
    batch = qa_batches(ROWS[:1], QAFormatter(tokenizer), batch_size=1)[0]
    batch["labels"][:] = IGNORE_INDEX
    model = make_tiny_llama(tokenizer)
    with pytest.raises(ConfigError, match="no label tokens"):
        mean_token_kl(model, model, [batch])


def test_several_references_share_the_models_pass(tokenizer):
    batches = qa_batches(ROWS, QAFormatter(tokenizer), batch_size=2)
    references = {"a": make_tiny_llama(tokenizer, seed=0), "b": make_tiny_llama(tokenizer, seed=2)}
    model = make_tiny_llama(tokenizer, seed=1)
    passes = []
    model.register_forward_hook(lambda *_: passes.append(1))
    got = mean_token_kls(references, model, batches)
    assert len(passes) == len(batches)  # one pass of the model a batch, not one per reference
    assert got == {name: mean_token_kl(ref, model, batches) for name, ref in references.items()}

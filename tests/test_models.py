"""Model loading by local path (with clear errors), and the tiny trainer's stop-at-memorisation rule."""

import dataclasses

import pytest
import torch
from conftest import make_tiny_llama
from transformers import LlamaForCausalLM

from kfade.data.formatting import QAFormatter, collate, pad_id
from kfade.errors import ConfigError
from kfade.models.load import load_model
from kfade.models.logits import label_logits
from kfade.models.mini import trained_tiny_model
from kfade.models.tiny import TinyLlamaSpec
from kfade.models.train import TrainRecipe, train_causal_lm


def test_local_model_round_trip_in_the_requested_dtype(tokenizer, tmp_path):
    model = make_tiny_llama(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, tok = load_model(str(tmp_path), dtype="bfloat16")
    assert next(loaded.parameters()).dtype == torch.bfloat16 and not loaded.training
    assert tok.pad_token_id == tokenizer.pad_token_id
    for (name, p), q in zip(model.named_parameters(), loaded.parameters(), strict=True):
        torch.testing.assert_close(p.to(torch.bfloat16), q, msg=name)


@pytest.mark.parametrize(("setup", "message"), [
    ("missing", "no such local path"),
    ("no_tokenizer", "no tokenizer"),
    ("no_config", "no config.json"),
])
def test_bad_model_paths_are_one_line_errors(tokenizer, tmp_path, setup, message):
    path = tmp_path / "model"
    if setup != "missing":
        path.mkdir()
        if setup == "no_tokenizer":
            make_tiny_llama(tokenizer).save_pretrained(path)
    with pytest.raises(ConfigError, match=message) as err:
        load_model(str(path))
    assert str(err.value).startswith("model.path=") and "\n" not in str(err.value)


def test_bad_dtype_names_the_key(tokenizer, tmp_path):
    make_tiny_llama(tokenizer).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="model.dtype"):
        load_model(str(tmp_path), dtype="float8")


def test_training_memorises_then_stops(tokenizer):
    rows = [("Where was Alia Verne born?", "Port Lumen."), ("What genre does Tomas Reed write?", "Mystery.")]
    formatter = QAFormatter(tokenizer)
    features = [formatter.encode(q, a) for q, a in rows]
    model = make_tiny_llama(tokenizer)
    stats = train_causal_lm(model, features, pad_id(tokenizer), TrainRecipe(max_epochs=300, lr=1e-2, warmup_steps=1,
                                                                             batch_size=2), progress=False)
    assert stats.accuracy >= 0.99 and stats.epochs < 300  # stopped at memorisation, not at the epoch cap
    assert 0 < stats.loss < 1.0
    for q, a in rows:  # the answers are reproduced greedily
        prompt = torch.tensor([formatter.prompt_ids(q)])
        out = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=pad_id(tokenizer))
        assert tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip() == a


def test_bad_recipe_names_the_key(tokenizer):
    with pytest.raises(ConfigError, match="model.recipe.lr"):
        train_causal_lm(make_tiny_llama(tokenizer), [], 0, TrainRecipe(lr=0.0), progress=False)


def test_finetuning_starts_from_the_given_base_model(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("KFADE_CACHE", str(tmp_path))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    spec = TinyLlamaSpec(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=64)
    base = trained_tiny_model("t-base", tokenizer_dir, [], ["Paris is the capital of France."] * 4, spec,
                              TrainRecipe(max_epochs=3, lr=1e-2, warmup_steps=1, batch_size=2))
    rows = [{"question": "Where was Alia Verne born?", "answer": "Port Lumen."}]
    still = TrainRecipe(max_epochs=1, lr=1e-12, warmup_steps=1, batch_size=2)  # a step too small to move weights
    finetuned = trained_tiny_model("t-ref", tokenizer_dir, rows, [], spec, still, init_from=base)
    scratch = trained_tiny_model("t-ref", tokenizer_dir, rows, [], spec, still)
    assert finetuned != scratch  # the base is part of the cache key
    rehearsing = dataclasses.replace(still, replay=1)
    texts = ["Paris is the capital of France."]
    assert trained_tiny_model("t-ref", tokenizer_dir, rows, [], spec, rehearsing, init_from=base,
                              replay=texts) not in (finetuned, scratch)  # so are the rehearsal and its texts
    weights = [LlamaForCausalLM.from_pretrained(d).state_dict() for d in (base, finetuned, scratch)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-6) for k in weights[0])
    assert not all(torch.allclose(weights[0][k], weights[2][k], atol=1e-3) for k in weights[0])


def _text_nll(model, features, pad):
    with torch.no_grad():
        out = label_logits(model, collate(features, pad))
        return float(torch.nn.functional.cross_entropy(out.logits, out.labels))


def test_replay_rehearses_the_base_text_and_is_left_out_of_the_stats(tokenizer):
    """``recipe.replay`` sequences of the base's text join each epoch: finetuning forgets that text less, while the
    reported loss is the QA answers' alone; ``replay=0`` trains exactly as without a replay pool."""
    formatter, pad = QAFormatter(tokenizer), pad_id(tokenizer)
    text = [formatter.encode_text(t) for t in ["Paris is the capital of France.", "Water boils at one hundred."]]
    qa = [formatter.encode(q, a) for q, a in [("Where was Alia Verne born?", "Port Lumen."),
                                              ("What genre does Tomas Reed write?", "Mystery.")]]
    torch.manual_seed(0)
    base = make_tiny_llama(tokenizer)
    train_causal_lm(base, text, pad, TrainRecipe(max_epochs=60, lr=1e-2, warmup_steps=1, batch_size=2,
                                                 target_accuracy=1.0), progress=False)
    finetuned = {}
    for replay in (0, 2):
        model = make_tiny_llama(tokenizer)
        model.load_state_dict(base.state_dict())
        recipe = TrainRecipe(max_epochs=40, lr=1e-2, warmup_steps=1, batch_size=2, target_accuracy=1.0, replay=replay)
        finetuned[replay] = (model, train_causal_lm(model, qa, pad, recipe, progress=False, replay=text))
    assert _text_nll(finetuned[2][0], text, pad) < 0.5 * _text_nll(finetuned[0][0], text, pad)
    for model, stats in finetuned.values():  # the last epoch's loss is the QA loss, not a mix with the text's
        assert stats.loss == pytest.approx(_text_nll(model, qa, pad), rel=0.5)
    plain = make_tiny_llama(tokenizer)
    plain.load_state_dict(base.state_dict())
    train_causal_lm(plain, qa, pad, TrainRecipe(max_epochs=40, lr=1e-2, warmup_steps=1, batch_size=2,
                                                target_accuracy=1.0), progress=False)
    for p, q in zip(plain.parameters(), finetuned[0][0].parameters(), strict=True):
        assert torch.equal(p, q)

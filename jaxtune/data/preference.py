"""Preference pairs for DPO: a prompt with a chosen and a rejected response, as two causal-LM rows each.

Pair i is rows 2i (prompt + chosen) and 2i + 1 (prompt + rejected) of one LMExamples, so one forward pass
scores both; each row's loss_mask covers its response tokens only (and the end token after them), never the
prompt, so a row's summed log-probability is log pi(response | prompt). Rows are padded, never packed.

The reference model's log-probabilities of each row, once computed (train/reference.py), live beside the rows
and travel in every batch as `ref_logps`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxtune.data import lm, origin
from jaxtune.errors import UserError

Ids = list[int]


@dataclasses.dataclass(frozen=True)
class Pairs:
  """N preference pairs as 2N causal-LM rows (chosen, rejected, chosen, ...)."""
  rows: lm.LMExamples
  # float32 2N: the reference model's summed response log-probability of each row; NaN until computed
  ref_logps: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))

  def __post_init__(self) -> None:
    if len(self.ref_logps) != len(self.rows):
      object.__setattr__(self, "ref_logps", np.full(len(self.rows), np.nan, np.float32))

  def __len__(self) -> int:
    return len(self.rows) // 2

  @property
  def seq_len(self) -> int:
    return self.rows.seq_len

  @property
  def max_token_id(self) -> int:
    return self.rows.max_token_id

  @functools.cached_property
  def lengths(self) -> np.ndarray:
    """Real tokens per pair (both rows): what a batch of pairs trains on."""
    return self.rows.lengths.reshape(-1, 2).sum(axis=1)


def encode_pair(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, use_chat_template: bool,
                where: origin.At | str) -> tuple[Ids, Ids, Ids]:
  """(prompt ids, chosen ids, rejected ids) of one row, the responses ending in their end token.

  Text: [BOS if usual] + prompt, then each response tokenised on its own + [EOS], as causal_lm's prompt/response
  rows (and generation) see them; with use_chat_template a user and an assistant turn. Chat rows (TRL's
  conversational form: the prompt a list of messages, each response a list holding the assistant's turn): the
  template's rendering, the response from the end of the prompt rendered with its generation prompt."""
  if isinstance(chosen, (list, tuple)) or isinstance(prompt, (list, tuple)):
    return _chat_pair(prompt, chosen, rejected, tokenizer, where)
  for column, text in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
    if not isinstance(text, str) or not text.strip():
      raise UserError(f"{where} has an empty or non-text {column} ({text!r}); fill or drop that row.")
  if use_chat_template:
    pieces = [lm.encode_instruction(prompt, r, tokenizer, 1 << 30, True, where) for r in (chosen, rejected)]
    start = min(int(np.argmax(mask)) for _, mask in pieces)  # the assistant turn's first token
    ids = [tokens.tolist() for tokens, _ in pieces]
    if ids[0][:start] != ids[1][:start]:
      raise UserError(f"{where}: the chat template renders the prompt differently before the two "
                      "responses; use a template that renders earlier turns unchanged.")
    return ids[0][:start], ids[0][start:], ids[1][start:]
  head = [tokenizer.bos_token_id] if lm.adds_bos(tokenizer) else []
  prompt_ids = head + tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
  end = [lm.eos_id(tokenizer)]
  response = lambda text: tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] + end
  return prompt_ids, response(chosen), response(rejected)


def _chat_pair(prompt: Any, chosen: Any, rejected: Any, tokenizer: Any, where: Any) -> tuple[Ids, Ids, Ids]:
  """encode_pair for chat rows: the prompt's messages, then each response's."""
  if isinstance(prompt, str):  # a plain prompt with chat responses: the user's turn
    prompt = [{"role": "user", "content": prompt}]
  for column, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
    if not isinstance(messages, (list, tuple)) or not messages:
      raise UserError(f"{where} has {column} {messages!r}: chat rows need a non-empty list of "
                      "{role, content} messages in prompt, chosen and rejected; fix the row.")
  out = []
  for response in (chosen, rejected):
    tokens, mask = lm.encode_messages([*prompt, *response], tokenizer, 1 << 30, where)
    start = lm.chat_prompt_len(prompt, [*prompt, *response], tokenizer, where)
    if not mask[start:].any():
      raise UserError(f"{where}: a response has no assistant turn; chosen and rejected must each hold "
                      "the assistant's message.")
    out.append(tokens.tolist())
  if out[0][:start] != out[1][:start]:
    raise UserError(f"{where}: the prompt renders differently before the two responses; fix the row.")
  return out[0][:start], out[0][start:], out[1][start:]


def assemble(triples: Sequence[tuple[Ids, Ids, Ids]], seq_len: int, name: str) -> Pairs:
  """Pairs from (prompt, chosen, rejected) ids: rows cut to seq_len tokens (the response's end is dropped, as TRL's
  keep_start truncation); a prompt that leaves a response no token within seq_len is an error naming its row."""
  examples = []
  for row, (prompt, *responses) in enumerate(triples):
    for response in responses:
      if not response:
        raise UserError(f"data split {origin.at(name, row)} has an empty response (no tokens); fill or drop that "
                        "row.")
      if len(prompt) >= seq_len:
        raise UserError(f"data split {origin.at(name, row)}: its prompt is {len(prompt)} tokens, which leaves its "
                        f"responses no room within data.max_len={seq_len}; raise data.max_len, shorten the prompt, "
                        "or drop the row.")
      tokens = np.asarray(prompt + response, np.int32)
      mask = np.concatenate([np.zeros(len(prompt), np.float32), np.ones(len(response), np.float32)])
      examples.append((tokens, mask))
  return Pairs(lm.pad_rows(examples, seq_len))


def collate(data: Pairs, pairs: np.ndarray, batch_size: int, buckets: Sequence[int] = (),
            part: slice = slice(None)) -> dict[str, np.ndarray]:
  """The causal-LM batch of `pairs` (each a chosen then a rejected row: 2 x batch_size rows) with `ref_logps`;
  `part` is this process's share of the batch_size pairs. Missing pairs are padding (loss_mask 0)."""
  rows = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
  start, stop, _ = part.indices(batch_size)
  batch = lm.collate(data.rows, rows, 2 * batch_size, buckets, slice(2 * start, 2 * stop))
  mine = np.arange(2 * start, 2 * stop)
  real = rows[mine[mine < len(rows)]]
  batch["ref_logps"] = np.zeros(len(mine), np.float32)
  batch["ref_logps"][:len(real)] = np.nan_to_num(data.ref_logps[real])  # NaN: not computed (a live reference)
  return batch

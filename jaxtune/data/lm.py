"""Causal-LM rows: plain text packed into fixed-length rows, or prompt/response and chat examples padded.

Every row is next-token prediction inside segments: row r trains on predicting targets[r, t] (which
is tokens[r, t + 1]) from tokens[r, :t + 1] of the same segment, weighted by loss_mask[r, t].
Attention must be causal AND within one segment (segment_ids equal and non-zero) so that packed
documents never see each other. The loss is normalised by the number of target tokens of the global
batch (see `token_mean`), never by rows or by padded length.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import datasets
import jax.numpy as jnp
import numpy as np

from jaxtune.data import cache, origin
from jaxtune.data.batching import pad_length
from jaxtune.errors import UserError

# (tokens, target_mask) of one document or example; target_mask[i] = 1 where tokens[i] is trained on
Example = tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass(frozen=True)
class LMExamples:
  """N rows of L tokens; row r predicts targets[r, t] from tokens[r, :t+1] of segment segment_ids[r, t]."""
  tokens: np.ndarray  # int32 N x L input ids; padding holds id 0 (segment 0 hides it)
  targets: np.ndarray  # int32 N x L, targets[:, t] = tokens[:, t + 1]; the last column is 0
  segment_ids: np.ndarray  # int32 N x L: 1, 2, ... per document within a row, 0 on padding
  positions: np.ndarray  # int32 N x L, 0 at each segment start, so always < L
  loss_mask: np.ndarray  # float32 N x L, 1 where targets[:, t] is a trained token of tokens[:, t]'s segment
  truncated_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # cut at L
  no_loss_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))  # 0 targets left
  ROW_FIELDS: ClassVar[tuple[str, ...]] = ("tokens", "targets", "segment_ids", "positions", "loss_mask")

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def seq_len(self) -> int:
    return self.tokens.shape[1]

  @functools.cached_property  # a cached split (data/cache.py) seeds it rather than reading every row
  def max_token_id(self) -> int:
    return int(self.tokens.max(initial=0))

  @functools.cached_property  # collate reads it for every batch
  def lengths(self) -> np.ndarray:
    """Real (non-padding) tokens per row; padding is always at the end of a row."""
    return (self.segment_ids > 0).sum(axis=1).astype(np.int32)


def token_mean(loss_BxL: Any, loss_mask_BxL: Any) -> Any:
  """sum(loss * loss_mask) / sum(loss_mask) over the GLOBAL batch: the mean over true target tokens.

  Not a mean over B x L (padding would dilute it) nor a mean of per-row means (short rows would
  weigh more). With gradient accumulation, sum the numerator and the denominator over all
  microbatches and divide once. A batch without target tokens gives 0 rather than NaN.
  """
  return jnp.sum(loss_BxL * loss_mask_BxL) / jnp.maximum(jnp.sum(loss_mask_BxL), 1.0)


def eos_id(tokenizer: Any) -> int:
  if tokenizer.eos_token_id is None:
    raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token, which causal-LM data needs to end "
                    "each document; set eos_token in its tokenizer_config.json.")
  return int(tokenizer.eos_token_id)


def adds_bos(tokenizer: Any) -> bool:
  """Whether the tokenizer defines a BOS token and puts it in front of text by itself (Llama does, GPT-2 not)."""
  bos = tokenizer.bos_token_id
  return bos is not None and tokenizer("a", verbose=False)["input_ids"][:1] == [bos]


def encode_documents(texts: Sequence[str], tokenizer: Any, name: str, column: str = "text") -> list[np.ndarray]:
  """Token ids of each document: [BOS if the tokenizer adds one] + text + [EOS], no other special tokens."""
  _check_strings(texts, column, name)
  head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
  tail = [eos_id(tokenizer)]
  ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
  return [np.asarray(head + row + tail, np.int32) for row in ids]


def encode_instruction(prompt: str, response: str, tokenizer: Any, max_len: int, use_chat_template: bool = False,
                       where: str = "this example") -> Example:
  """(tokens, target_mask) of prompt then response, the loss only on the response and its end token.

  Without a chat template: [BOS if usual] + prompt + response + [EOS], prompt and response tokenised
  separately, as at generation time (put any separator at the end of the prompt). With one: the
  template's rendering of a user and an assistant message, trained on the assistant's turn.
  """
  if use_chat_template:
    return encode_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                           tokenizer, max_len, where)
  head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
  prompt_ids = head + tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"]
  answer_ids = tokenizer(response, add_special_tokens=False, verbose=False)["input_ids"] + [eos_id(tokenizer)]
  tokens = np.asarray(prompt_ids + answer_ids, np.int32)
  mask = np.concatenate([np.zeros(len(prompt_ids), np.float32), np.ones(len(answer_ids), np.float32)])
  return tokens[:max_len], mask[:max_len]


def encode_prompt(prompt: str, tokenizer: Any, use_chat_template: bool = False) -> np.ndarray:
  """The prompt part of `encode_instruction` alone: what generation continues from."""
  if use_chat_template:
    text = _render(tokenizer, [{"role": "user", "content": prompt}], True, "this prompt")
    return np.asarray(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], np.int32)
  head = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
  return np.asarray(head + tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"], np.int32)


def encode_messages(messages: Sequence[dict[str, Any]], tokenizer: Any, max_len: int,
                    where: str = "this example") -> Example:
  """(tokens, target_mask) of a chat rendered by the tokenizer's template, trained on every assistant turn.

  Each assistant turn's span runs from the end of the prefix rendered with the generation prompt to
  the end of the prefix that includes the turn, less trailing whitespace after its end-of-turn token;
  both prefixes must tokenise to prefixes of the whole chat, or the template cannot be masked this way.
  """
  if tokenizer.chat_template is None:
    raise UserError(f"tokenizer {tokenizer.name_or_path!r} has no chat_template; use prompt/response columns "
                    "without use_chat_template, or a tokenizer that has one.")
  messages = _check_messages(messages, where)
  text = _render(tokenizer, messages, False, where)
  tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # the template places BOS
  mask = np.zeros(len(tokens), np.float32)
  for i, message in enumerate(messages):
    if message["role"] != "assistant":
      continue
    start = _prefix_len(tokenizer, messages[:i], True, text, tokens, where)
    last = i + 1 == len(messages)
    end = len(tokens) if last else _prefix_len(tokenizer, messages[:i + 1], False, text, tokens, where)
    while end > start and not tokenizer.decode(tokens[end - 1:end]).strip():
      end -= 1  # the newline a template puts after the end-of-turn token is formatting, not the answer
    mask[start:end] = 1
  return np.asarray(tokens, np.int32)[:max_len], mask[:max_len]


def chat_prompt_len(prompt: Sequence[dict[str, Any]], messages: Sequence[dict[str, Any]], tokenizer: Any,
                    where: str = "this example") -> int:
  """Tokens of `prompt` rendered with the generation prompt, checked to be a prefix of the rendering of `messages`
  (the prompt and a reply): where the reply starts in encode_messages(messages)'s tokens."""
  messages = _check_messages(messages, where)
  text = _render(tokenizer, messages, False, where)
  tokens = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
  return _prefix_len(tokenizer, _check_messages(prompt, where), True, text, tokens, where)


class Packer:
  """Fills rows of exactly seq_len tokens with documents in order, each row a list of segments.

  A document that crosses the end of a row continues as a new segment (positions from 0) at the start
  of the next; the token at the row end has no target there. `pack` and the streamed train split
  (stream.py) both pack through it, so a stream's rows are the rows `pack` makes of the same documents.
  """

  def __init__(self, seq_len: int):
    self.seq_len = seq_len
    self.row: list[Example] = []  # the row being filled
    self.room = seq_len

  def add(self, tokens: np.ndarray, mask: np.ndarray, start: int = 0) -> Iterator[tuple[list[Example], int]]:
    """Puts tokens[start:] in; yields (a full row, how many of `tokens` are used by then) as each row fills."""
    while start < len(tokens):
      take = min(self.room, len(tokens) - start)
      self.row.append((tokens[start:start + take], mask[start:start + take]))
      start, self.room = start + take, self.room - take
      if self.room == 0:
        yield self.row, start
        self.row, self.room = [], self.seq_len


def pack(docs: Sequence[np.ndarray], seq_len: int, target_masks: Sequence[np.ndarray] | None = None) -> LMExamples:
  """Concatenates documents into rows of exactly seq_len tokens (see Packer), padding only the last row.

  target_masks default to all ones."""
  masks = target_masks if target_masks is not None else [np.ones(len(d), np.float32) for d in docs]
  packer = Packer(seq_len)
  rows = [row for doc, mask in zip(docs, masks, strict=True) for row, _ in packer.add(doc, mask)]
  return _assemble(rows + ([packer.row] if packer.row else []), seq_len)


def pad_rows(examples: Sequence[Example], seq_len: int) -> LMExamples:
  """One example per row, cut to seq_len (keeping the start) and padded after it."""
  return _assemble([[(tokens[:seq_len], mask[:seq_len])] for tokens, mask in examples], seq_len)


def _assemble(rows: Sequence[Sequence[Example]], seq_len: int) -> LMExamples:
  shape = (len(rows), seq_len)
  tokens, segment_ids, positions = (np.zeros(shape, np.int32) for _ in range(3))
  trained = np.zeros(shape, np.float32)  # target_mask laid out like tokens
  for r, segments in enumerate(rows):
    t = 0
    for s, (ids, mask) in enumerate(segments, 1):
      k = len(ids)
      tokens[r, t:t + k], segment_ids[r, t:t + k], trained[r, t:t + k] = ids, s, mask
      positions[r, t:t + k] = np.arange(k)
      t += k
  targets = np.zeros(shape, np.int32)
  targets[:, :-1] = tokens[:, 1:]
  same_segment = (segment_ids[:, :-1] == segment_ids[:, 1:]) & (segment_ids[:, :-1] > 0)
  loss_mask = np.zeros(shape, np.float32)
  loss_mask[:, :-1] = same_segment * trained[:, 1:]
  return LMExamples(tokens, targets, segment_ids, positions, loss_mask)


def collate(data: LMExamples, rows: np.ndarray, batch_size: int, buckets: Sequence[int] = (),
            part: slice = slice(None)) -> dict[str, np.ndarray]:
  """Numpy batch, each B x L: input_ids, targets, segment_ids, positions, loss_mask; missing rows are padding.

  L is seq_len, or the smallest bucket holding the longest row of the global batch; only rows
  `part` of the batch are built (a process's share). Padding rows have loss_mask 0, so a short
  final eval batch adds nothing to `token_mean`.
  """
  length = pad_length(int(data.lengths[rows].max()), buckets, data.seq_len) if len(rows) else data.seq_len
  mine = np.arange(batch_size)[part]  # positions in the global batch; those >= len(rows) are padding
  real = rows[mine[mine < len(rows)]]
  fields = {"input_ids": data.tokens, "targets": data.targets, "segment_ids": data.segment_ids,
            "positions": data.positions, "loss_mask": data.loss_mask}
  batch = {}
  for key, array in fields.items():
    batch[key] = np.zeros((len(mine), length), array.dtype)
    batch[key][:len(real)] = array[real, :length]
  return batch


@dataclasses.dataclass(frozen=True)
class Form:
  """Which columns make a causal-LM example: a text column, prompt + response, or messages (exactly one)."""
  text_column: str | None = None  # plain text: one document per row
  prompt_column: str | None = None
  response_column: str | None = None
  messages_column: str | None = None
  use_chat_template: bool = False
  pack_text: bool = True  # text documents are packed into full rows; otherwise one example per row

  def check(self, name: str) -> None:
    forms = [self.text_column is not None, self.prompt_column is not None or self.response_column is not None,
             self.messages_column is not None]
    if sum(forms) != 1 or (forms[1] and (self.prompt_column is None or self.response_column is None)):
      raise UserError(f"data split {name}: give exactly one of a text column, a prompt and a response column, "
                      "or a messages column.")

  @property
  def columns(self) -> list[str]:
    return [c for c in (self.text_column, self.prompt_column, self.response_column, self.messages_column)
            if c is not None]

  @property
  def packs(self) -> bool:
    return self.text_column is not None and self.pack_text

  def check_columns(self, column_names: Sequence[str], name: str) -> None:
    for column in self.columns:
      if column not in column_names:
        raise UserError(f"data split {name} has no column {column!r} (it has {list(column_names)}); set the "
                        "column names of the data section to existing columns.")

  def encode(self, columns: dict[str, Sequence[Any]], tokenizer: Any, seq_len: int, name: str) -> list[Example]:
    """The examples of some rows: whole documents when packing, else cut to seq_len + 1 tokens (see `_padded`)."""
    if self.text_column is not None:
      docs = encode_documents(columns[self.text_column], tokenizer, name, self.text_column)
      keep = None if self.pack_text else seq_len + 1
      return [(d[:keep], np.ones(len(d[:keep]), np.float32)) for d in docs]
    if self.messages_column is not None:
      return [encode_messages(m, tokenizer, seq_len + 1, origin.At(name, row))
              for row, m in enumerate(columns[self.messages_column])]
    prompts, responses = columns[self.prompt_column], columns[self.response_column]
    _check_strings(prompts, self.prompt_column, name)
    _check_strings(responses, self.response_column, name)
    return [encode_instruction(p, r, tokenizer, seq_len + 1, self.use_chat_template, origin.At(name, row))
            for row, (p, r) in enumerate(zip(prompts, responses))]


def load_lm_split(ds: datasets.Dataset, tokenizer: Any, name: str, seq_len: int, *, text_column: str | None = None,
                  prompt_column: str | None = None, response_column: str | None = None,
                  messages_column: str | None = None, use_chat_template: bool = False,
                  pack_text: bool = True, cache_dir: str = "") -> LMExamples:
  """LM rows from one of: a text column (packed, or one document per row), prompt + response, or messages.

  With `cache_dir` (data.cache_dir) the rows come from their cache entry (data/cache.py), built on a miss a chunk
  of documents at a time (`encoded_chunks`): a corpus larger than memory is never held whole."""
  form = Form(text_column, prompt_column, response_column, messages_column, use_chat_template, pack_text)
  check_split(ds, form, name)

  def whole() -> LMExamples:
    examples = form.encode({c: ds[c] for c in form.columns}, tokenizer, seq_len, name)
    if form.packs:
      return pack([tokens for tokens, _ in examples], seq_len)
    return _padded(examples, seq_len, name)

  if not cache_dir:
    return whole()
  parts = {"task": "causal_lm", "form": dataclasses.asdict(form), "seq_len": seq_len,
           "tokenizer": cache.tokenizer_digest(tokenizer), "code": cache.code_digest(__name__)}
  return cache.Store(cache_dir).get(cache.key(rows=cache.rows_digest(ds), **parts),
                                    lambda: encoded_chunks(ds, form, tokenizer, seq_len, name, whole),
                                    {**parts, "split": name})


def encoded_chunks(ds: datasets.Dataset, form: Form, tokenizer: Any, seq_len: int, name: str,
                   whole: Callable[[], LMExamples]) -> Iterator[LMExamples]:
  """`load_lm_split`'s rows, cache.CHUNK_ROWS documents at a time: packed rows continue across chunks (one
  Packer), the cut and lossless rows are numbered within the split. A bad row past the first chunk re-encodes the
  split whole (`whole`) so that its error numbers the row as without the cache."""
  packer, no_loss = Packer(seq_len), 0
  for start in range(0, len(ds), cache.CHUNK_ROWS):
    part = ds.select(range(start, min(start + cache.CHUNK_ROWS, len(ds))))
    try:
      examples = form.encode({c: part[c][:] for c in form.columns}, tokenizer, seq_len, name)
    except UserError:
      if start:
        whole()
      raise
    if form.packs:  # as `pack`: every token of a document is trained on
      rows = [row for tokens, _ in examples for row, _ in packer.add(tokens, np.ones(len(tokens), np.float32))]
      if rows:
        yield _assemble(rows, seq_len)
      continue
    data = pad_rows(examples, seq_len)
    lossless = np.flatnonzero(data.loss_mask.sum(axis=1) == 0)
    no_loss += len(lossless)
    yield dataclasses.replace(data, truncated_rows=start + np.flatnonzero([len(t) > seq_len for t, _ in examples]),
                              no_loss_rows=start + lossless)
  if packer.row:
    yield _assemble([packer.row], seq_len)
  if not form.packs and no_loss == len(ds):
    _no_targets(name, seq_len)


def check_split(ds: datasets.Dataset, form: Form, name: str) -> None:
  """The form names one kind of example, the split has rows and the form's columns."""
  form.check(name)
  if len(ds) == 0:
    raise UserError(f"data split {name} has no rows; point it at a non-empty file.")
  form.check_columns(ds.column_names, name)


def _padded(examples: Sequence[Example], seq_len: int, name: str) -> LMExamples:
  """Pads examples to seq_len rows, recording which were cut and which lost every target.

  Examples come encoded with max_len seq_len + 1: the one extra token tells whether a row was cut.
  """
  data = pad_rows(examples, seq_len)
  truncated = np.flatnonzero([len(tokens) > seq_len for tokens, _ in examples])
  no_loss = np.flatnonzero(data.loss_mask.sum(axis=1) == 0)
  if len(no_loss) == len(data):
    _no_targets(name, seq_len)
  return dataclasses.replace(data, truncated_rows=truncated, no_loss_rows=no_loss)


def _no_targets(name: str, seq_len: int) -> None:
  raise UserError(f"data split {name}: no row has a response/assistant token within the first {seq_len} tokens; "
                  "raise the maximum length, shorten the prompts, or check the rows have assistant turns.")


def _check_strings(values: Sequence[Any], column: str, name: str) -> None:
  for row, text in enumerate(values):
    if not isinstance(text, str) or not text.strip():
      raise UserError(f"data split {origin.at(name, row)} has an empty or non-text {column!r} ({text!r}); "
                      "fill or drop that row.")


def _check_messages(messages: Any, where: str) -> list[dict[str, str]]:
  """Only role and content reach the template (columnar formats add None for keys other rows have)."""
  if not isinstance(messages, (list, tuple)) or not messages:
    raise UserError(f"{where} has messages {messages!r}, not a non-empty list of {{role, content}}; fix the row.")
  for m in messages:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise UserError(f"{where} has a message {m!r} without a text role and content; fix the row.")
  return [{"role": m["role"], "content": m["content"]} for m in messages]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, where: str) -> str:
  try:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
  except Exception as e:  # templates raise their own errors (e.g. roles must alternate)
    raise UserError(f"{where}: the chat template rejected its messages ({type(e).__name__}: {e}); fix the row."
                    ) from None


def _prefix_len(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, text: str,
                tokens: list[int], where: str) -> int:
  """Token count of the rendered prefix, checked to be a prefix of the whole chat's tokens."""
  prefix = _render(tokenizer, messages, generation_prompt, where)
  ids = tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"]
  if not text.startswith(prefix) or tokens[:len(ids)] != ids:
    raise UserError(f"{where}: the chat template is not prefix-stable (rendering the first {len(messages)} "
                    "message(s) is not a prefix of rendering them all), so assistant turns cannot be masked; use "
                    "a template that renders earlier turns unchanged, or prompt/response columns without it.")
  return len(ids)

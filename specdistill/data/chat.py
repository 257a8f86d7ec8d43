"""Token ids + assistant-only loss mask from the target tokenizer's own chat template.

No separator strings are hard-coded. For each assistant message i we render, with the template,
  head_i = messages[:i] + the generation prompt   (ends where the assistant's text starts)
  upto_i = messages[:i+1]                          (ends after the assistant's end-of-turn)
and the characters between them are what the assistant "says". Both must be prefixes of the
full rendering (the template is prefix-stable); then the full text is tokenized once and the
character spans become token spans through the tokenizer's offsets. Within a span, tokens after
the last special token (ChatML's newline after <|im_end|>) are template formatting, not something
the drafter predicts, so the span ends at that end-of-turn token. Header tokens of the generation
prompt are never loss tokens. A template injecting a default system prompt (SmolLM2's) is handled
for free: the system text is in every prefix rendering.

If a template is not prefix-stable (some re-render earlier turns), the assistant content is
located in the full text by search instead; if even that fails the conversation is skipped as
`template_error` with the reason.

Prompt truncation (`truncate_prompt`): when the first assistant reply does not fit in max_length
because the prompt before it is long, the oldest characters of the prompt's message contents are
cut (user messages first, earliest first; system messages only if that is not enough; the
template's own text, headers and injected system prompt are never touched). Where to cut is found
on the message text (from the tokenized tail of the content, then checked, and lowered if needed,
by rendering the shortened messages with the template and tokenizing), so no separator is
assumed; the shortened conversation is then encoded like any other, so its mask comes from the
same derivation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from specdistill.data.stats import SkipCounter


class TemplateAlignError(ValueError):
    """The chat template's rendering cannot be aligned with the messages."""


@dataclass
class Encoded:
    input_ids: np.ndarray  # (T,) int32
    loss_mask: np.ndarray  # (T,) uint8, 1 = assistant token (content + end-of-turn)
    turns: int  # assistant turns with at least one loss token
    truncated: bool


def _render(tok, messages, add_generation_prompt=False) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class ChatEncoder:
    """Turns normalised conversations into (input_ids, loss_mask) with truncation rules."""

    def __init__(self, tokenizer, max_length: int = 512, min_loss_tokens: int = 4, truncate_prompt: bool = True):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the target tokenizer has no chat_template; set one (tokenizer.chat_template = ...) "
                             "so the loss mask can follow the model's own conversation format")
        if max_length < 2:
            raise ValueError(f"data.max_length ({max_length}) must be >= 2")
        self.tok = tokenizer
        self.max_length = max_length
        self.min_loss_tokens = max(1, min_loss_tokens)
        self.truncate_prompt = truncate_prompt
        ids = set(tokenizer.all_special_ids)
        for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(t, "special", False):
                ids.add(int(i))
        self.special_ids = np.array(sorted(ids), dtype=np.int64)
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        # Rendering every prefix and tokenizing whole threads is wasted work past max_length tokens,
        # so a first pass only renders the messages within a character budget (English averages
        # ~4-5 characters a token); a conversation that then has no more than max_length tokens
        # but lost messages to the budget is redone in full, so the result is the same as without it.
        # The first pass also cuts the rendered text near the budget where the tokens before the cut
        # cannot change: right before a special token (split out before anything else), or at a
        # pre-token boundary of the form "<non-space>| <letter>", which the GPT-2, Llama-3 and Qwen
        # split regexes all keep whatever surrounds it (unlike e.g. Llama-3's 3-digit groups,
        # whose alignment depends on where a window starts). Without a pre-tokenizer, or with a
        # normalizer (which can move characters), no cut is made. (Pruning assumes a prefix-stable
        # template; for others it means the turns are rendered as if the conversation ended there.)
        self.char_budget = max_length * 6
        backend = self.backend
        self.pre = None
        if backend is not None and backend.normalizer is None and backend.pre_tokenizer is not None:
            self.pre = backend.pre_tokenizer
        # an added token that strips whitespace to its left would swallow what precedes a cut
        added = {t.content: t for t in getattr(tokenizer, "added_tokens_decoder", {}).values()}
        self.special_strings = sorted(
            {t for t in tokenizer.all_special_tokens if t}
            | {c for c, t in added.items() if getattr(t, "special", False)}
        )
        self.special_strings = [c for c in self.special_strings if not getattr(added.get(c), "lstrip", False)]
        self.stats = {"boundary_straddles": 0, "searched_spans": 0, "re_rendered": 0}

    # ---- rendering -------------------------------------------------------------------------

    def _prune(self, messages: list[dict]) -> list[dict]:
        """The leading messages whose content fits the character budget (at least one reply)."""
        total = 0
        for i, m in enumerate(messages):
            if total > self.char_budget and any(x["role"] == "assistant" for x in messages[:i]):
                return messages[:i]
            total += len(m["content"])
        return messages

    def render(self, messages: list[dict]) -> tuple[str, list[tuple[int, int, bool]]]:
        """Full text and one (start, end, exact) character span per assistant message."""
        full = _render(self.tok, messages)
        spans = []
        prev = 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            head = _render(self.tok, messages[:i], add_generation_prompt=True) if i else ""
            upto = _render(self.tok, messages[: i + 1])
            if upto.startswith(head) and full.startswith(upto) and len(upto) > len(head) >= prev:
                spans.append((len(head), len(upto), True))
                prev = len(upto)
                continue
            # not prefix-stable: find the content itself after the previous assistant span
            for needle in (m["content"], m["content"].strip()):
                pos = full.find(needle, prev) if needle else -1
                if pos >= 0:
                    spans.append((pos, pos + len(needle), False))
                    prev = pos + len(needle)
                    self.stats["searched_spans"] += 1
                    break
            else:
                raise TemplateAlignError(
                    f"assistant message {i} is not a prefix-consistent part of the template output and its "
                    "text was not found in the rendering")
        return full, spans

    # ---- tokenizing ------------------------------------------------------------------------

    def _cut(self, text: str) -> str:
        """A prefix of `text` of about char_budget characters whose tokens are a prefix of text's."""
        p, margin = self.char_budget, 128
        if self.pre is None or len(text) <= p + 4 * margin:
            return text
        lo = p - margin
        window = text[lo:p + margin]
        specials = [lo + i for i in (window.find(s) for s in self.special_strings) if i > 0]
        if specials:
            return text[:min(specials)]
        # pre-token boundaries away from the window edges, of the context-free "x| word" kind
        bounds = [lo + a for _, (a, _) in self.pre.pre_tokenize_str(window)[1:]
                  if 16 <= a <= len(window) - 16 and window[a] == " " and not window[a - 1].isspace()
                  and window[a + 1].isalpha()]
        if not bounds:
            return text
        return text[:min(bounds, key=lambda q: abs(q - p))]

    def _tokenize(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(ids, start offsets) per text; batched in Rust when the tokenizer is a fast one."""
        if self.backend is not None:
            encs = self.backend.encode_batch(texts, add_special_tokens=False)
            return [(np.asarray(e.ids, dtype=np.int64), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2))
                    for e in encs]
        out = []
        for t in texts:
            enc = self.tok(t, add_special_tokens=False, return_offsets_mapping=True)
            out.append((np.asarray(enc["input_ids"], dtype=np.int64),
                        np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)))
        return out

    def _token_spans(self, ids, offsets, spans) -> list[tuple[int, int]]:
        starts = offsets[:, 0]
        ends = offsets[:, 1]
        is_special = np.isin(ids, self.special_ids)
        out = []
        for s, e, exact in spans:
            a = int(np.searchsorted(starts, s, "left"))
            b = int(np.searchsorted(starts, e, "left"))
            if a > 0 and ends[a - 1] > s:
                # BPE merged the header's last characters with the reply's first ones; the merged
                # token stays a header token (it is what the target sees before replying).
                self.stats["boundary_straddles"] += 1
            if exact:
                sp = np.nonzero(is_special[a:b])[0]
                if len(sp):
                    b = a + int(sp[-1]) + 1  # end at the end-of-turn token, drop formatting after it
            elif b < len(ids) and is_special[b]:
                b += 1  # searched content: its end-of-turn token follows it
            if b > a:
                out.append((a, b))
        return out

    def _truncate(self, n: int, tspans: list[tuple[int, int]]) -> tuple[int, bool]:
        if n <= self.max_length:
            return n, False
        fitting = [b for _, b in tspans if b <= self.max_length]
        if fitting:
            return max(fitting), True  # a turn boundary: the end of the last whole assistant turn
        return self.max_length, True  # first reply alone is too long: cut inside it

    def _render_tokenize(self, items, counter, cut: bool) -> list[tuple]:
        """[(conversation, messages)] -> [(conversation, ids, offsets, char spans, shortened)].

        `shortened` says the messages were pruned or the text cut; failures are counted and left out.
        """
        rendered = []
        for conv, messages in items:
            try:
                text, spans = self.render(messages)
            except TemplateAlignError as e:
                counter.skip("template_error", conv.where, str(e))
                continue
            except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
                counter.skip("template_error", conv.where, f"{type(e).__name__}: {e}")
                continue
            short = self._cut(text) if cut else text
            rendered.append((conv, short, spans, len(short) < len(text) or len(messages) < len(conv.messages)))
        toks = self._tokenize([t for _, t, _, _ in rendered])
        return [(c, ids, off, spans, sh) for (c, _, spans, sh), (ids, off) in zip(rendered, toks)]

    def _encode_all(self, conversations: list, counter) -> list[tuple[object, np.ndarray, list]]:
        """[(conversation, ids, token spans of its assistant turns)], untruncated; failures are counted."""
        first = self._render_tokenize([(c, self._prune(c.messages)) for c in conversations], counter, cut=True)
        # a conversation whose shortened first pass did not reach max_length tokens is redone whole
        redo = [c for c, ids, _, _, short in first if short and len(ids) <= self.max_length]
        self.stats["re_rendered"] += len(redo)
        again = {id(c): r[:3] for c, *r in self._render_tokenize([(c, c.messages) for c in redo], counter, cut=False)}
        out = []
        redo_ids = {id(c) for c in redo}
        for conv, ids, offsets, spans, _ in first:
            if id(conv) in redo_ids:
                if id(conv) not in again:
                    continue  # the full rendering failed (already counted)
                ids, offsets, spans = again[id(conv)]
            out.append((conv, ids, self._token_spans(ids, offsets, spans)))
        return out

    def _sample(self, ids, tspans) -> tuple[np.ndarray, np.ndarray, int, bool]:
        """(ids, loss mask, turns, truncated) of one encoded conversation cut to max_length."""
        n, truncated = self._truncate(len(ids), tspans)
        mask = np.zeros(n, dtype=np.uint8)
        turns = 0
        for a, b in tspans:
            if a < n:
                mask[a:min(b, n)] = 1
                turns += 1
        return ids[:n], mask, turns, truncated

    # ---- prompt truncation -----------------------------------------------------------------

    def _turn_ends(self, messages: list[dict]) -> tuple[int, list[int]]:
        """Token start of the first assistant reply and the end of each assistant turn after it."""
        text, spans = self.render(messages)
        (ids, offsets), = self._tokenize([text])
        tspans = self._token_spans(ids, offsets, spans)
        if not tspans:
            raise TemplateAlignError("no assistant tokens")
        return tspans[0][0], [b for _, b in tspans]

    def _head_tokens(self, messages: list[dict]) -> int:
        """Tokens before the reply to `messages`: the rendering with the generation prompt."""
        (ids, _), = self._tokenize([_render(self.tok, messages, add_generation_prompt=True)])
        return len(ids)

    def _shorten_prompt(self, messages: list[dict], start: int | None) -> list[dict] | None:
        """`messages` with the oldest prompt characters cut so the first reply gets its room, or None.

        `start` is the first reply's token start in the full encoding (None: past max_length).
        The room after the prompt's fixed part (the rendering with every cuttable content emptied)
        goes at most 3/4 to the replies (at least min_loss_tokens): the first reply and the whole
        turns after it that fit in that share, or the share itself when the first reply is longer
        (it is then cut inside). The prompt keeps the newest characters that fit in the rest.
        """
        k = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), 0)
        order = [i for i in range(k) if messages[i]["role"] == "user" and messages[i]["content"]]
        order += [i for i in range(k) if messages[i]["role"] != "user" and messages[i]["content"]]
        # the replies' share is at most max(min_loss_tokens, 3/4 of max_length): a prompt within the
        # rest is never cut (this spares the renderings for short prompts before long replies)
        most = max(self.min_loss_tokens, self.max_length - self.max_length // 4)
        if not order or (start is not None and start <= self.max_length - most):
            return None
        try:
            # only the first max_length tokens after the prompt matter: measure the turns within
            # the character budget (the first reply cut to it)
            bare = [dict(m, content="") if i in order else m for i, m in enumerate(messages[:k])]
            bare.append(dict(messages[k], content=messages[k]["content"][:self.char_budget]))
            total = len(messages[k]["content"])  # a cut first reply is measured alone
            for m in messages[k + 1:]:
                if total > self.char_budget:
                    break
                bare.append(m)
                total += len(m["content"])
            fixed, ends = self._turn_ends(bare)
            room = self.max_length - fixed
            cap = max(self.min_loss_tokens, room - room // 4)
            share = max([e - fixed for e in ends if e - fixed <= cap], default=cap)
            limit = self.max_length - share  # the first reply may start at token `limit` at the latest
            if start is not None and start <= limit:
                return None  # the prompt is within its share already: cutting it gains nothing
            msgs = [dict(m) for m in messages[:k]]
            for i in order:
                text = msgs[i]["content"]
                msgs[i]["content"] = ""
                base = self._head_tokens(msgs)
                if base > limit:
                    continue  # emptying this message is not enough: move on to the next
                msgs[i]["content"] = text[len(text) - self._longest_tail(msgs, i, text, limit, base):]
                break
            return msgs + list(messages[k:])
        except Exception:  # the template refused a shortened prompt: leave the conversation as it is
            return None

    def _longest_tail(self, msgs: list[dict], i: int, text: str, limit: int, base: int) -> int:
        """About the largest n such that the prompt with msgs[i] = text[-n:] has at most `limit` tokens.

        `base` is the prompt's token count with msgs[i] empty. The text's tail is tokenized once to
        find where the last `limit - base` tokens start; the joins with the template can move that
        by a token or so, so the prompt is re-rendered to check, and the guess lowered by the excess
        (a binary search on the character cut if that does not settle).
        """
        def head(n: int) -> int:
            msgs[i]["content"] = text[len(text) - n:]
            return self._head_tokens(msgs)

        want = limit - base
        size = min(len(text), 6 * want + 64)
        while True:  # a tail with a few tokens more than wanted, so its first tokens are not used
            (ids, offsets), = self._tokenize([text[len(text) - size:]])
            if len(ids) > want + 2 or size == len(text):
                break
            size = min(len(text), 2 * size)
        for _ in range(4):
            if want <= 0:
                return 0
            n = size if want >= len(ids) else size - int(offsets[len(ids) - want][0])
            cut = len(text) - n
            if 0 < cut and not text[cut - 1].isspace():
                # start at a word when one begins shortly after the cut
                ws = next((j for j in range(cut, min(cut + 32, len(text))) if text[j].isspace()), None)
                if ws is not None:
                    n = len(text[ws:].lstrip())
            h = head(n)
            if h <= limit:
                return n
            want -= max(1, h - limit)  # (dropping a word's leading space can cost a token)
        lo, hi = 0, n  # head(0) fits (checked by the caller), head(n) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if head(mid) <= limit:
                lo = mid
            else:
                hi = mid
        return lo

    def encode_batch(self, conversations: list, counter) -> list[tuple[object, Encoded]]:
        """Encode a batch of `Conversation`s; bad ones are counted on `counter` and left out."""
        items = self._encode_all(conversations, counter)
        shortened = {}
        if self.truncate_prompt:
            saved = dict(self.stats)  # alignment stats describe each conversation's own encoding once
            todo, origin = [], {}
            for conv, _, tspans in items:
                if not tspans or tspans[0][1] > self.max_length:  # the first reply does not fit
                    msgs = self._shorten_prompt(conv.messages, tspans[0][0] if tspans else None)
                    if msgs is not None:
                        todo.append(replace(conv, messages=msgs))
                        origin[id(todo[-1])] = id(conv)
            for c, ids, tspans in self._encode_all(todo, SkipCounter(log_first=0)):
                shortened[origin[id(c)]] = (ids, tspans)
            self.stats = saved
        out = []
        for conv, ids, tspans in items:
            ids, mask, turns, truncated = self._sample(ids, tspans)
            if id(conv) in shortened:
                alt = self._sample(*shortened[id(conv)])
                if int(alt[1].sum()) > int(mask.sum()):  # never worse than leaving the prompt whole
                    ids, mask, turns, truncated = alt[0], alt[1], alt[2], True
                    if int(mask.sum()) >= self.min_loss_tokens:
                        counter.note("prompt_truncated")
            if int(mask.sum()) < self.min_loss_tokens:
                reason = "too_long" if truncated else "too_short"
                counter.skip(reason, conv.where, f"{int(mask.sum())} loss tokens after truncation to "
                                                 f"{self.max_length} (need {self.min_loss_tokens})")
                continue
            out.append((conv, Encoded(ids.astype(np.int32), mask, turns, truncated)))
        return out
